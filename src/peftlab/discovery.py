"""Registries filled by their folder: every module of a package is imported once, before the registry
is first asked (adding a method or a task kind is one new file)."""
from __future__ import annotations

import importlib
import pkgutil

_IMPORTED: set[str] = set()


def import_all(package_name: str) -> None:
    if package_name in _IMPORTED:
        return
    _IMPORTED.add(package_name)  # first: a module that asks the registry while it loads must not recurse
    package = importlib.import_module(package_name)
    for m in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package_name}.{m.name}")
