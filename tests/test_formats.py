"""Data formats own their facts (data/formats/): each names its suffixes and reads a file into a frame;
data/sources.py picks one by suffix. A format added at run time is read like the built-in ones."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from peftlab.config.schema import DataConfig
from peftlab.data import formats, load_data
from peftlab.data.sources import read_table
from peftlab.errors import UserError


def test_the_built_in_formats_and_what_messages_say():
    assert [f.name for f in formats.formats()] == ["CSV", "TSV", "JSON Lines", "Parquet"]
    assert formats.supported() == ".csv, .tsv, .jsonl, .json, .parquet (the first four may also end in .gz)"
    assert formats.of_path(Path("a/TRAIN.CSV.GZ"))[1] == ".csv"
    assert formats.of_path(Path("train.parquet.gz")) is None  # Parquet compresses itself
    assert formats.of_path(Path("train.xlsx")) is None


def test_a_new_format_is_one_registration(tmp_path):
    """A made-up format (one 'label<TAB>text' pair per line) read end to end by load_data, then removed."""
    def read(path, suffix, keep_blank_rows):
        rows = [line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if line]
        return pd.DataFrame({"label": [r[0] for r in rows], "text": [r[1] for r in rows]})

    fmt = formats.register(formats.Format("label-tab-text", (".ltt",), read, gzip=False))
    try:
        lines = [f"{'ab'[i % 2]}\ttext number {i} about {'ab'[i % 2]}" for i in range(40)]
        (tmp_path / "train.ltt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert read_table(tmp_path / "train.ltt").shape == (40, 2)
        data = load_data(DataConfig(path=str(tmp_path)), seed=1)
        assert data.label_names == ["a", "b"] and len(data.train) + len(data.validation) + len(data.test) == 40
        assert ".ltt" in formats.supported()
    finally:
        formats._FORMATS.remove(fmt)
    with pytest.raises(UserError, match="unsupported file type"):
        read_table(tmp_path / "train.ltt")
