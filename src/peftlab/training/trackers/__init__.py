"""The experiment trackers (tracking.backends), one file each in this folder: a Tracker subclass that
`register`s itself. A tracker owns its facts: the module it needs and the extra that installs it, how it
starts, logs, flushes, records the final figures, uploads files and ends a run, and what it does for a
sweep as a whole. training/tracking.py drives them and never tests which one it has. Every module of this
folder is imported before the registry is first asked; the name also goes into TrackingConfig.backends
(config/schema.py), which lists the choices."""
from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

from peftlab.errors import UserError


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class Tracker:
    """One tracked run in one backend: start, log, flush, final, upload, end. `cfg` is the run's Config."""
    name: str = ""
    module: str = ""  # what must import for the backend to work
    extra: str = ""   # pip install 'peftlab[EXTRA]' installs it

    def __init__(self, cfg, run_dir: Path):
        raise NotImplementedError

    def start(self, name: str, params: dict, group=None, tags: dict | None = None) -> None: ...
    def log(self, values: dict, step: int) -> None: ...
    def flush(self) -> None: ...
    def final(self, numbers: dict, texts: dict, step: int) -> None: ...
    def upload(self, files: list[Path], base: Path) -> None: ...
    def end(self, ok: bool) -> None: ...

    # --- a sweep: its own tracked run, if the backend has one -----------------------------------
    @classmethod
    def sweep_start(cls, sweep) -> None:
        """When a sweep starts (sweep: tracking.SweepTracking); nothing by default."""

    @classmethod
    def sweep_finish(cls, sweep, figures: dict, texts: dict, files: list[Path], complete: bool) -> None:
        """When a sweep's worker finishes, with each configuration's figures; nothing by default."""


_TRACKERS: dict[str, type[Tracker]] = {}
_LOADED: list[bool] = []


def register(tracker: type[Tracker]) -> type[Tracker]:
    _TRACKERS[tracker.name] = tracker
    return tracker


def _load_all() -> None:
    if not _LOADED:
        _LOADED.append(True)  # first: a module that asks the registry while it loads must not recurse
        package = importlib.import_module(__name__)
        for m in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{__name__}.{m.name}")


def names() -> list[str]:
    _load_all()
    return sorted(_TRACKERS)


def get(name: str) -> type[Tracker]:
    _load_all()
    if name not in _TRACKERS:
        raise UserError(f"tracking.backends: unknown tracker {name!r} (known: {', '.join(sorted(_TRACKERS))})")
    return _TRACKERS[name]
