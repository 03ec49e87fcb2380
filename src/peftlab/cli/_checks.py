"""The checks every command shares: numbers in range (as argparse types, so a bad value is one line
naming the option) and output paths that can really be written (before any work is done)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from peftlab.errors import UserError

_SYSTEM = (Path("/proc"), Path("/sys"), Path("/dev"))
# --precision of predict and serve (runtime.DTYPES' names, without importing torch to parse a command line)
PRECISIONS = ("auto", "fp32", "bf16")


def _number(kind, low, inclusive: bool, what: str):
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number ({what})") from None
        # nan and inf are never a setting (inf would pass a lower bound)
        if value != value or value in (float("inf"), float("-inf")) or value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"{text} is out of range ({what})")
        return value
    check.__name__ = what  # argparse names the type in its messages
    return check


positive_int = _number(int, 1, True, "a whole number of at least 1")
at_least_two = _number(int, 2, True, "a whole number of at least 2")
positive_float = _number(float, 0.0, False, "a finite number above 0")
non_negative_float = _number(float, 0.0, True, "a finite number of at least 0")


def port(text: str) -> int:
    value = _number(int, 1, True, "a port number from 1 to 65535")(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is out of range (a port number from 1 to 65535)")
    return value


def _system(path: Path) -> bool:
    resolved = path.resolve()
    return any(resolved == s or s in resolved.parents for s in _SYSTEM)


def output_file(path: str | Path, option: str, make_parent: bool = False) -> Path:
    """A file we may create or replace: its folder exists (or, with make_parent, can be made) and is
    writable, and it is not a folder."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if _system(p):
        raise UserError(f"{option} {str(p)!r} is a system path: write to a file in a folder of yours")
    if p.is_dir():
        raise UserError(f"{option} {str(p)!r} is a directory: give a file name")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{option} {str(p)!r}: {str(parent)!r} is a file, not a folder")
    if make_parent and not parent.exists():
        output_dir(parent, option)
        return p
    if not parent.is_dir():
        raise UserError(f"{option} {str(p)!r}: the folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"{option} {str(p)!r} cannot be written (permission denied): choose another path")
    return p


def output_dir(path: str | Path, option: str) -> Path:
    """A folder we may create or write into: not a file, not a system path, and creatable."""
    p = Path(path)
    if _system(p):
        raise UserError(f"{option} {str(p)!r} is a system path: choose a folder of yours")
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {str(p)!r} is a file: give a directory")
    existing = next(a for a in [p, *p.parents] if a.exists())
    if not existing.is_dir():
        raise UserError(f"{option} {str(p)!r}: {str(existing)!r} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK):
        raise UserError(f"{option} {str(p)!r} cannot be written (permission denied): choose another folder")
    return p
