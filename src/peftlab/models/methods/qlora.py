"""QLoRA (Dettmers et al. 2023): LoRA on a 4-bit NF4 backbone via bitsandbytes, on a GPU or a CPU
(bitsandbytes >= 0.48 runs NF4 and int8 layers on CPU in plain PyTorch).

Whether 4-bit (then 8-bit) can run here is found by trying it: a small bitsandbytes layer of that kind,
forward and backward, on the run's device. Where neither can (no bitsandbytes, a device it does not
support) it falls back to the unquantized model, warns, and says why; metrics.json's quantization is then
read from the built model's modules (models/quantized.py), never from the request. Kept out of
quantization: the head (a quantized head breaks training, peft #1720) and linear layers whose widths
bitsandbytes cannot take (not multiples of 64). The unquantized rest is stored in the run's compute dtype
(bf16 on a GPU, fp32 on a CPU), which is also what the 4-bit weights are dequantized to.
"""
import functools
import importlib.util
import warnings

import torch

from peftlab.models.methods import lora
from peftlab.models.methods.registry import Method, register
from peftlab.models.quantized import narrow_linears

# head modules across architectures; kept in full precision
HEAD_NAMES = ["classifier", "pre_classifier", "pooler", "head", "score", "out_proj"]


def compute_dtype(device) -> torch.dtype:
    """What the unquantized weights are stored in and the 4-bit ones dequantized to: a GPU run computes in
    bf16 (autocast), a CPU run in fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@functools.lru_cache(maxsize=None)
def _trial(bits: int, device_type: str, index: int | None) -> str | None:
    """None when a bitsandbytes layer of `bits` trains on the device (forward and backward of a 64x64
    layer), else why not."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        import bitsandbytes as bnb

        dtype = compute_dtype(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. int8's "inputs will be cast to float16"
            if bits == 4:
                layer = bnb.nn.Linear4bit(64, 64, compute_dtype=dtype, quant_type="nf4").to(device)
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to(device)
            x = torch.randn(2, 64, device=device, dtype=dtype, requires_grad=True)
            layer(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return f"{bits}-bit bitsandbytes layers give no usable gradient on {device.type}"
    except Exception as e:  # noqa: BLE001 - no backend for the device, a missing kernel, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{bits}-bit bitsandbytes layers do not run on {device.type} here ({first[:160]})"
    return None


def _why_not(bits: int, device) -> str | None:
    return _trial(bits, device.type, device.index)


def quantization_kwargs(bits: int, skip: list[str] = (), dtype: torch.dtype = torch.bfloat16):
    from transformers import BitsAndBytesConfig

    skip = HEAD_NAMES + [n for n in skip if n not in HEAD_NAMES]
    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return {"quantization_config": q, "dtype": dtype}


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
            return quantization_kwargs(bits, skip, compute_dtype(device)), {
                "requested": requested, "skipped_for_width": skip, "reason": "; ".join(reasons) or None}
        reasons.append(why)
    reason = reasons[0]
    warnings.warn(f"qlora: {reason}; training LoRA on the unquantized model instead", stacklevel=2)
    return {}, {"requested": requested, "reason": reason}


def prepare(model):
    """peft's prepare_model_for_kbit_training without its upcast of every non-quantized weight to fp32
    (bitsandbytes #1569: more memory than bf16 LoRA): the backbone is frozen and stays as loaded (bf16 on a
    GPU);
    train.frozen_dtype=fp32 restores the upcast, so both can be measured."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def apply(model, cfg, device):
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare(model)
        for module in model.modules():
            # bitsandbytes repacks a CPU 4-bit weight for its AVX512-bf16 inference kernel at the first
            # no-grad forward (an evaluation), and that kernel has no backward: training after it would
            # silently stop the gradient below each layer. Kept in the trainable layout.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return lora.apply(model, cfg, device)


register(Method(name="qlora", summary="LoRA on a 4-bit NF4 backbone", default_learning_rate=1e-3,
                apply=apply, load_kwargs=load_kwargs,
                hyperparameters=lora.HYPERPARAMETERS + ("bits",), adapter_kind="LoRA",
                # the QLoRA recipe (Dettmers et al. 2023; peft's prepare_model_for_kbit_training): activations,
                # not weights, are most of a training step's memory, so a 4-bit backbone alone saves little
                gradient_checkpointing=True))
