"""What quantization a built model really has, read from its modules (never from what was asked for),
and which linear layers bitsandbytes cannot take."""
from __future__ import annotations

import torch

# bitsandbytes' module and parameter classes, by name: no import of bitsandbytes where it is absent
FOUR_BIT = ("Linear4bit", "LinearNF4", "LinearFP4")
EIGHT_BIT = ("Linear8bitLt",)
QUANTIZED_PARAMETERS = ("Params4bit", "Int8Params")
# bitsandbytes' 4-bit kernels need input and output widths that are multiples of this (a 32-wide layer
# gave CUBLAS_STATUS_INTERNAL_ERROR on an H200)
WIDTH_MULTIPLE = 64


def narrow_linears(model: torch.nn.Module) -> list[str]:
    """Names of the nn.Linear layers whose widths are not multiples of WIDTH_MULTIPLE: left unquantized."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (m.in_features % WIDTH_MULTIPLE or m.out_features % WIDTH_MULTIPLE)]


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def quantization_record(model: torch.nn.Module, request: dict | None = None) -> dict:
    """requested (what the method asked for), used (4bit / 8bit / none, from the modules), the count and
    bytes of 4-bit and 8-bit linear layers, the frozen linear layers left in floating point (and how many of
    those for their width), and the reason when less was used than asked."""
    request = dict(request or {})
    counts = {"4bit": [0, 0], "8bit": [0, 0]}
    plain = 0
    for m in model.modules():
        kind = type(m).__name__
        # bitsandbytes' own layers only: peft's LoRA wrapper of a 4-bit layer is also called Linear4bit
        if (kind in FOUR_BIT or kind in EIGHT_BIT) and type(m).__module__.startswith("bitsandbytes"):
            entry = counts["4bit" if kind in FOUR_BIT else "8bit"]
            entry[0], entry[1] = entry[0] + 1, entry[1] + _bytes(m)
        elif type(m) is torch.nn.Linear and not m.weight.requires_grad:  # frozen backbone layers, not adapters or heads
            plain += 1
    used = "4bit" if counts["4bit"][0] else "8bit" if counts["8bit"][0] else "none"
    requested = request.get("requested")
    reason = request.get("reason")
    skipped = len(request.get("skipped_for_width") or [])
    if requested and used != requested and not reason:
        reason = f"{requested} was requested but the built model has no {requested} layers" + (
            f" ({skipped} linear layers have widths that are not multiples of {WIDTH_MULTIPLE})" if skipped else "")
    if requested is None and used == "none":
        used = None  # a method that never quantizes: nothing to say
    return {"requested": requested, "used": used, "reason": reason,
            "modules_4bit": counts["4bit"][0], "bytes_4bit": counts["4bit"][1],
            "modules_8bit": counts["8bit"][0], "bytes_8bit": counts["8bit"][1],
            "frozen_linear_unquantized": plain, "skipped_for_width": skipped}
