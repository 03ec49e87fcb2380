"""One registry of fine-tuning methods. Adding a method is one new file in this folder that calls
`register(Method(...))`: every module of the folder is imported before the registry is first asked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from peftlab.config.choices import register_choices
from peftlab.discovery import import_all
from peftlab.errors import UserError


@dataclass(frozen=True)
class Method:
    """Everything callers need to know about a method: they ask it, and never switch on its name."""
    name: str
    summary: str
    default_learning_rate: float
    # (model, method config, device) -> the model to train, with requires_grad set
    apply: Callable
    # (method config, device, model name, label names) -> (extra from_pretrained kwargs, what was requested:
    # {"requested", "reason", "skipped_for_width"}); what was used is read from the built model's modules
    load_kwargs: Callable = field(default=lambda cfg, device, model_name, label_names: ({}, {}))
    saves_adapter: bool = True  # adapter/ (PEFT format) beside the base, or a whole model/
    trains_backbone: bool = False  # every weight trains (weight gradients for the whole model)
    hyperparameters: tuple[str, ...] = ()  # the method.* config fields that apply to it
    adapter_kind: str = ""  # what its trainable non-head parameters are called, e.g. "LoRA"
    # "module:Class" of its own training recipe (a Trainer subclass in peftlab.training); "": the standard loop
    trainer: str = ""
    pooled_head: bool = False  # classifies from the pooled embedding even where model.head=auto would not
    gradient_checkpointing: bool = False  # its recipe recomputes activations (unless model.gradient_checkpointing says)

    @property
    def has_rank(self) -> bool:
        return "r" in self.hyperparameters

    def flops_per_token(self, non_embedding_params: int) -> float:
        """Training FLOPs per real token: 2N forward + 2N backward through activations, + 2N for weight
        gradients when the backbone trains (adapters' own weight gradients are <1% of N, left out)."""
        return float((6 if self.trains_backbone else 4) * non_embedding_params)


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    _METHODS[method.name] = method
    return method




def _load_all() -> None:
    import_all("peftlab.models.methods")


def names() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def find(name: str) -> Method | None:
    """The method, or None for a name this version does not know (e.g. in an old or foreign run)."""
    _load_all()
    return _METHODS.get(name)


register_choices("method.name", names)  # config validates method.name against these


def get(name: str) -> Method:
    _load_all()
    if name not in _METHODS:
        raise UserError(f"unknown method {name!r} (allowed: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]
