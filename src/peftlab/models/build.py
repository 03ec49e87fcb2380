"""Config -> a model ready to train: backbone loaded (maybe quantized), method applied, head trainable."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.config.schema import Config
from peftlab.errors import UserError
from peftlab.models.loading import head_for, load_classifier
from peftlab.models.methods import registry


@dataclass
class BuiltModel:
    model: torch.nn.Module
    method: registry.Method
    quantization: dict
    head: dict  # what the classifier reads (models.loading.head_for), recorded in metrics.json


def build_model(cfg: Config, label_names: list[str], device: torch.device, multi_label: bool = False) -> BuiltModel:
    method = registry.get(cfg.method.name)
    extra, quantization = method.load_kwargs(cfg.method, device)
    if extra:
        extra = {**extra, "device_map": {"": device.index or 0}}
    if method.pooled_head and cfg.model.head == "cls":
        raise UserError(f"method {method.name} classifies from the pooled sentence embedding: set model.head=auto "
                        f"(or pooled), not cls")
    head = head_for(cfg.model.name, "pooled" if method.pooled_head else cfg.model.head)
    model = load_classifier(cfg.model.name, label_names, extra, multi_label, head)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # without this, a frozen embedding gives "element 0 of tensors does not require grad" (peft #137)
        model.enable_input_require_grads()
    model = method.apply(model, cfg.method, device)
    if not extra:
        model.to(device)
    return BuiltModel(model=model, method=method, quantization=quantization, head=head)
