"""One registry of fine-tuning methods. Adding a method is one new file in this folder that calls
`register(Method(...))`, plus its name in `_MODULES` below."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from peftlab.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    default_learning_rate: float
    # (model, method config, model facts) -> the model to train, with requires_grad set
    apply: Callable
    # (method config, device) -> (extra from_pretrained kwargs, quantization record)
    load_kwargs: Callable = field(default=lambda cfg, device: ({}, {"requested": None, "used": None, "reason": None}))
    saves_adapter: bool = True


_METHODS: dict[str, Method] = {}
_MODULES = ("full", "lora", "qlora", "ia3")


def register(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def _load_all() -> None:
    if len(_METHODS) < len(_MODULES):
        for m in _MODULES:
            importlib.import_module(f"peftlab.models.methods.{m}")


def names() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get(name: str) -> Method:
    _load_all()
    if name not in _METHODS:
        raise UserError(f"unknown method {name!r} (allowed: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]
