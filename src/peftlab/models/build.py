"""Config -> a model ready to train: backbone loaded (maybe quantized), method applied, head trainable,
everything on the run's device. What quantization the model got is read from its modules afterwards."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.config.schema import Config
from peftlab.errors import UserError
from peftlab.models.architectures import is_decoder
from peftlab.models.loading import head_for, load_classifier, load_tokenizer, padding
from peftlab.models.methods import registry
from peftlab.models.quantized import QUANTIZED_PARAMETERS, quantization_record
from peftlab.tasks import SINGLE_LABEL, Task


@dataclass
class BuiltModel:
    model: torch.nn.Module
    method: registry.Method
    quantization: dict
    head: dict  # what the classifier reads (models.loading.head_for), recorded in metrics.json
    gradient_checkpointing: bool = False  # model.gradient_checkpointing, or the method's choice where unset


def frozen_to(model: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Store the frozen floating-point weights in `dtype` (bf16 on a bf16 GPU run: autocast then has
    nothing to re-cast every forward, and they take half the memory); trainable ones keep fp32 for the
    optimizer. Returns how many tensors were cast."""
    if dtype is None:
        return 0
    cast = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype.is_floating_point and p.dtype != dtype and p.dtype in (torch.float32, torch.float16, torch.bfloat16):
            p.data = p.data.to(dtype)
            cast += 1
    return cast


def decoder_reading(model: torch.nn.Module, tokenizer, head: dict) -> dict:
    """For a decoder's record (metrics.json head): what its head reads (its own head: the last real token; a
    pooled head: every real token), and the pad token that tells padding apart (set from the end-of-text
    token where the tokenizer had none). Nothing for an encoder."""
    if not is_decoder(model.config):
        return {}
    reads = ("the mean of the real tokens' states (padding left out)" if head.get("kind") == "pooled"
             else "the last real token (the rightmost one that is not padding)")
    return {"reads": reads, **padding(tokenizer)}


def build_model(cfg: Config, label_names: list[str], device: torch.device, task: Task = SINGLE_LABEL,
                frozen_dtype: torch.dtype | None = None, tokenizer=None) -> BuiltModel:
    """`tokenizer`: the run's (load_tokenizer); loaded here when not given. A decoder's pad id is its."""
    method = registry.get(cfg.method.name)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.name, cfg.model.tokenizer,
                                                                       cfg.model.trust_remote_code)
    extra, request = method.load_kwargs(cfg.method, device, cfg.model.name, label_names)
    if extra:  # bitsandbytes places (and packs) on load
        extra = {**extra, "device_map": {"": device.index or 0} if device.type == "cuda" else {"": device.type}}
    if method.pooled_head and cfg.model.head == "cls":
        raise UserError(f"method {method.name} classifies from the pooled sentence embedding: set model.head=auto "
                        f"(or pooled), not cls")
    head = head_for(cfg.model.name, "pooled" if method.pooled_head else cfg.model.head)
    model = load_classifier(cfg.model.name, label_names, extra, task, head, tokenizer.pad_token_id,
                            cfg.model.trust_remote_code)
    if is_decoder(model.config) and tokenizer.pad_token_id is None:
        raise UserError(f"model {cfg.model.name!r} is a decoder, whose head finds the last real token by the pad "
                        f"token, and its tokenizer has neither a pad nor an end-of-text token: set model.tokenizer "
                        f"to one that has")
    head = {**head, **decoder_reading(model, tokenizer, head)}
    checkpointing = cfg.model.gradient_checkpointing
    if checkpointing is None:  # the method's choice, where transformers can checkpoint the architecture
        checkpointing = method.gradient_checkpointing and model.supports_gradient_checkpointing
    elif checkpointing and not model.supports_gradient_checkpointing:
        raise UserError(f"model.gradient_checkpointing: transformers cannot checkpoint {type(model).__name__} "
                        f"({cfg.model.name}): set it to false or leave it unset")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # without this, a frozen embedding gives "element 0 of tensors does not require grad" (peft #137)
        model.enable_input_require_grads()
    model = method.apply(model, cfg.method, device)
    if not extra:
        model.to(device)
    else:  # bitsandbytes placed the packed weights on load; whatever it left elsewhere follows them
        for p in model.parameters():
            if p.device != device and type(p).__name__ not in QUANTIZED_PARAMETERS:
                p.data = p.data.to(device)
    frozen_to(model, frozen_dtype)
    return BuiltModel(model=model, method=method, quantization=quantization_record(model, request), head=head,
                      gradient_checkpointing=checkpointing)
