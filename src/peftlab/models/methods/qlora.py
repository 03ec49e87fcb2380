"""QLoRA (Dettmers et al. 2023): LoRA on a 4-bit NF4 backbone via bitsandbytes.

Where 4-bit cannot run (no CUDA, no bitsandbytes) it falls back to 8-bit, then to the unquantized
model, warns, and records requested / used / reason in metrics.json. The head stays out of
quantization: a quantized head breaks training (peft #1720).
"""
import importlib.util
import warnings

import torch

from peftlab.models.methods import lora
from peftlab.models.methods.registry import Method, register

# head modules across architectures; kept in full precision
HEAD_NAMES = ["classifier", "pre_classifier", "pooler", "head", "score", "out_proj"]


def _why_not(bits: int, device) -> str | None:
    if device.type != "cuda":
        return f"{bits}-bit bitsandbytes training needs a CUDA device (this run is on {device.type})"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'peftlab[quant]')"
    return None


def quantization_kwargs(bits: int):
    from transformers import BitsAndBytesConfig

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=HEAD_NAMES)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_NAMES)
    return {"quantization_config": q, "dtype": torch.bfloat16}


def load_kwargs(cfg, device):
    requested = f"{cfg.bits}bit"
    reasons = []
    for bits in (4, 8) if cfg.bits == 4 else (8,):
        why = _why_not(bits, device)
        if why is None:
            return quantization_kwargs(bits), {"requested": requested, "used": f"{bits}bit",
                                               "reason": "; ".join(reasons) or None}
        reasons.append(why)
    reason = reasons[0]
    warnings.warn(f"qlora: {reason}; training LoRA on the unquantized model instead", stacklevel=2)
    return {}, {"requested": requested, "used": "none", "reason": reason}


def apply(model, cfg, device):
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        # note: this upcasts non-quantized weights to fp32, which can cost more memory than bf16 LoRA
        # (bitsandbytes #1569); the benchmark measures it rather than assuming
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(model, cfg, device)


register(Method(name="qlora", summary="LoRA on a 4-bit NF4 backbone", default_learning_rate=1e-3,
                apply=apply, load_kwargs=load_kwargs,
                hyperparameters=lora.HYPERPARAMETERS + ("bits",), adapter_kind="LoRA"))
