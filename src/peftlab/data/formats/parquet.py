"""Parquet (not gzipped: it compresses itself)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from peftlab.data.formats import Format, register


def read(path: Path, suffix: str, keep_blank_rows: bool) -> pd.DataFrame:
    return pd.read_parquet(path)


register(Format("Parquet", (".parquet",), read, gzip=False))
