"""QLoRA (Dettmers et al. 2023): LoRA on a 4-bit NF4 backbone via bitsandbytes.

Where 4-bit cannot run (no CUDA, no bitsandbytes) it falls back to 8-bit, then to the unquantized
model, warns, and says why; metrics.json's quantization is then read from the built model's modules
(models/quantized.py), never from the request. Kept out of quantization: the head (a quantized head
breaks training, peft #1720) and linear layers whose widths bitsandbytes cannot take (not multiples of 64).
"""
import importlib.util
import warnings

import torch

from peftlab.models.methods import lora
from peftlab.models.methods.registry import Method, register
from peftlab.models.quantized import narrow_linears

# head modules across architectures; kept in full precision
HEAD_NAMES = ["classifier", "pre_classifier", "pooler", "head", "score", "out_proj"]


def _why_not(bits: int, device) -> str | None:
    if device.type != "cuda":
        return f"{bits}-bit bitsandbytes training needs a CUDA device (this run is on {device.type})"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'peftlab[quant]')"
    return None


def quantization_kwargs(bits: int, skip: list[str] = ()):
    from transformers import BitsAndBytesConfig

    skip = HEAD_NAMES + [n for n in skip if n not in HEAD_NAMES]
    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return {"quantization_config": q, "dtype": torch.bfloat16}


def too_narrow(model_name: str, label_names: list[str]) -> list[str]:
    """The model's linear layers bitsandbytes cannot take, found on a weightless (meta) copy."""
    from transformers import AutoModelForSequenceClassification

    from peftlab.models.loading import model_config

    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(model_config(model_name, label_names))
    return narrow_linears(skeleton)


def load_kwargs(cfg, device, model_name: str = "", label_names: list[str] = ("0", "1")):
    requested = f"{cfg.bits}bit"
    reasons = []
    for bits in (4, 8) if cfg.bits == 4 else (8,):
        why = _why_not(bits, device)
        if why is None:
            narrow = too_narrow(model_name, list(label_names)) if model_name else []
            skip = [n for n in narrow if n.split(".")[-1] not in HEAD_NAMES]  # heads stay out anyway
            return quantization_kwargs(bits, skip), {"requested": requested, "skipped_for_width": skip,
                                                     "reason": "; ".join(reasons) or None}
        reasons.append(why)
    reason = reasons[0]
    warnings.warn(f"qlora: {reason}; training LoRA on the unquantized model instead", stacklevel=2)
    return {}, {"requested": requested, "reason": reason}


def prepare(model):
    """peft's prepare_model_for_kbit_training without its upcast of every non-quantized weight to fp32
    (bitsandbytes #1569: more memory than bf16 LoRA): the backbone is frozen and stays as loaded (bf16);
    train.frozen_dtype=fp32 restores the upcast, so both can be measured."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def apply(model, cfg, device):
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare(model)
    return lora.apply(model, cfg, device)


register(Method(name="qlora", summary="LoRA on a 4-bit NF4 backbone", default_learning_rate=1e-3,
                apply=apply, load_kwargs=load_kwargs,
                hyperparameters=lora.HYPERPARAMETERS + ("bits",), adapter_kind="LoRA"))
