"""Exact speed tricks on a model, used by training, evaluation and prediction alike: the last layer
computed only where the classification head reads it, and LoRA folded into the weights for inference.
Each leaves every output unchanged (tests/test_fast_path.py holds the invariants)."""
from __future__ import annotations

import contextlib
import re

import torch

from peftlab.models.architectures import architecture_facts

_LAST_ATTENTION_OUTPUT = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.attention\.output$")


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _keep_first_token(module, args):
    # (attention output, residual input), each [batch, seq, hidden] -> [batch, 1, hidden]
    if len(args) == 2 and all(isinstance(a, torch.Tensor) and a.dim() == 3 for a in args):
        return args[0][:, :1], args[1][:, :1]
    return None


def first_token_only(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle | None:
    """Compute the last encoder layer's attention-output projection, feed-forward block and layer
    norms for the first token only, where the classification head reads them: the other positions'
    final states are never used, so logits, loss and every gradient are unchanged (keys and values of
    the last layer still see every token). Saves ~1/num_layers of the work of training and inference
    on architectures with a first-token head; does nothing (returns None) on any other model.
    Returns the hook's handle: .remove() restores the full computation."""
    base = _base(model)
    facts = architecture_facts(base)
    if getattr(base, "_peftlab_head", None):  # a pooled head reads every token's final state
        return None
    if facts is None or not facts.first_token_head or not type(base).__name__.endswith("ForSequenceClassification"):
        return None
    last, index = None, -1
    for name, module in base.named_modules():
        m = _LAST_ATTENTION_OUTPUT.search(name)
        if m and int(m.group(1)) > index and type(module).__name__.endswith("SelfOutput"):
            last, index = module, int(m.group(1))
    if last is None or getattr(last, "_peftlab_first_token", False):
        return None
    handle = last.register_forward_pre_hook(_keep_first_token)
    last._peftlab_first_token = True

    class _Handle:
        def remove(self):
            handle.remove()
            last._peftlab_first_token = False

    return _Handle()


@contextlib.contextmanager
def first_token_context(model: torch.nn.Module):
    handle = first_token_only(model)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _mergeable_lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """LoRA layers whose adapter can be folded into a plain floating-point base weight (not quantized
    ones, where merging is lossy), provided no adapter is merged already."""
    if getattr(model, "peft_type", None) is None or str(getattr(model.peft_type, "value", model.peft_type)) != "LORA":
        return []
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        base = layer.get_base_layer()
        if (type(base) is not torch.nn.Linear or not base.weight.dtype.is_floating_point
                or getattr(layer, "merged_adapters", None)):
            return []
    return layers


@contextlib.contextmanager
def merged_lora(model: torch.nn.Module):
    """LoRA folded into the base weights for inference (one matmul instead of three per adapted
    layer); on exit the exact original weights are restored, bit for bit (unmerging alone would leave
    rounding residue, which would accumulate over a run's evaluations). No-op for other models."""
    layers = _mergeable_lora_layers(model)
    if not layers:
        yield
        return
    saved = [(layer.get_base_layer().weight, layer.get_base_layer().weight.detach().clone()) for layer in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def linear_weights_to(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store every nn.Linear's weight and bias in `dtype` (bf16/fp16 inference): autocast casts them to
    that dtype at every call anyway, so the outputs under autocast are the same, bit for bit, without
    the re-cast each batch. Only for a model that is then run under autocast in `dtype` alone. Returns
    how many tensors were cast."""
    cast = 0
    if dtype == torch.float32:
        return cast
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for p in (module.weight, module.bias):
                if p is not None and p.dtype == torch.float32:
                    p.data = p.data.to(dtype)
                    cast += 1
    return cast
