"""Config -> a model ready to train: backbone loaded (maybe quantized), method applied, head trainable."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.config.schema import Config
from peftlab.models.loading import load_classifier
from peftlab.models.methods import registry


@dataclass
class BuiltModel:
    model: torch.nn.Module
    method: registry.Method
    quantization: dict


def count_parameters(model: torch.nn.Module) -> dict:
    """Trainable and total parameter counts. 4-bit weights are packed two per byte; counting their
    storage elements would halve the total (peft #1020), so they are counted by their real shape."""
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue  # peft keeps a frozen copy of the head beside the trained one; not part of the model
        n = p.numel()
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None and hasattr(quant_state, "shape"):
            n = int(torch.Size(quant_state.shape).numel())
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total, "trainable_pct": round(100.0 * trainable / max(total, 1), 4)}


def build_model(cfg: Config, label_names: list[str], device: torch.device) -> BuiltModel:
    method = registry.get(cfg.method.name)
    extra, quantization = method.load_kwargs(cfg.method, device)
    if extra:
        extra = {**extra, "device_map": {"": device.index or 0}}
    model = load_classifier(cfg.model.name, label_names, extra)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # without this, a frozen embedding gives "element 0 of tensors does not require grad" (peft #137)
        model.enable_input_require_grads()
    model = method.apply(model, cfg.method, device)
    if not extra:
        model.to(device)
    return BuiltModel(model=model, method=method, quantization=quantization)
