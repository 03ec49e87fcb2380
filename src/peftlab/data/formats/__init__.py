"""The data file formats, one file each in this folder: a Format names its suffixes and reads a file into
a pandas frame (the rows as they are: columns and holes are checked after, the same way for every format).
data/sources.py picks a file's format by its suffix and never tests which one it is; a new format is one
new file here that calls `register(Format(...))` (every module of the folder is imported before the
registry is first asked)."""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

_COUNT = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


@dataclass(frozen=True)
class Format:
    name: str                 # in messages: "CSV"
    suffixes: tuple[str, ...]  # lower case, with the dot: (".csv",)
    # (path, its suffix, keep blank rows) -> the frame; UserError for what the user must fix
    read: Callable[[Path, str, bool], pd.DataFrame]
    gzip: bool = True         # may also be gzipped (".csv.gz")


_FORMATS: list[Format] = []
_LOADED: list[bool] = []


def register(fmt: Format) -> Format:
    _FORMATS.append(fmt)
    return fmt


def formats() -> list[Format]:
    """Every format: those that may be gzipped first (the order messages list them in)."""
    if not _LOADED:
        _LOADED.append(True)
        for m in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{m.name}")
    return sorted(_FORMATS, key=lambda f: not f.gzip)


def of_path(path: Path) -> tuple[Format, str] | None:
    """The format that reads `path` and the suffix that picked it, or None when none can."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name[:-3] if gz else name).suffix
    found = next((f for f in formats() if suffix in f.suffixes and (f.gzip or not gz)), None)
    return (found, suffix) if found is not None else None


def supported() -> str:
    """What messages say can be read: ".csv, .tsv, .jsonl, .json, .parquet (the first four may also end in .gz)"."""
    suffixes = [s for f in formats() for s in f.suffixes]
    gzipped = sum(len(f.suffixes) for f in formats() if f.gzip)
    return ", ".join(suffixes) + (f" (the first {_COUNT.get(gzipped, gzipped)} may also end in .gz)" if gzipped else "")
