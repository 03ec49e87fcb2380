"""CSV and TSV: a header row, then one row per text. A .csv whose header has semicolons and no comma is
semicolon-separated (spreadsheets in many locales save "CSV" that way)."""
from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd

from peftlab.data.formats import Format, register


def _separator(path: Path, suffix: str) -> str:
    """Tab for .tsv; for .csv a comma, or a semicolon when the header has semicolons and no comma."""
    if suffix == ".tsv":
        return "\t"
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:
            header = f.readline()
    except OSError:
        return ","
    return ";" if ";" in header and "," not in header else ","


def read(path: Path, suffix: str, keep_blank_rows: bool) -> pd.DataFrame:
    # Only an empty field is missing: a text that reads "NA" or "null" is still a text.
    # utf-8-sig: a byte-order mark (as spreadsheets and Windows editors write) is not part of the header
    return pd.read_csv(path, sep=_separator(path, suffix), keep_default_na=False, na_values=[""],
                       encoding="utf-8-sig", skip_blank_lines=not keep_blank_rows)


register(Format("CSV", (".csv",), read))
register(Format("TSV", (".tsv",), read))
