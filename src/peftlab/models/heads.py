"""The head that fits the checkpoint (docs/few-shot.md). A sentence-transformers checkpoint (MiniLM,
MPNet: its modules.json lists a Pooling module, and maybe Normalize) was trained to produce one
embedding per text, the mean of its token states (then unit length); its [CLS] pooler was never
trained. Such a model classifies from that embedding: `install` makes the backbone hand the
classification head the pooled embedding in place of its token states, so that every path through
the model (training, predict, serve's mixed batches, merged and ONNX exports) computes the same thing.
Other checkpoints keep their own head.

This file imports only torch and transformers: a merged export of a pooled run ships it as its remote
code (peftlab_head.py; config.json's auto_map), so transformers loads the folder without peftlab
(trust_remote_code=True)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

REMOTE_FILE = "peftlab_head.py"  # this file's name in a merged export
CONFIG_KEY = "peftlab_head"  # in config.json: the pooling the model's head reads
POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


def checkpoint_pooling(folder: str | Path) -> dict | None:
    """{"pooling": mean|cls|max, "normalize": bool, "source": ...} for a sentence-transformers checkpoint
    folder (modules.json with a Pooling module), else None."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    if "Pooling" not in kinds:
        return None
    try:
        pooling = json.loads((folder / kinds["Pooling"].get("path", "") / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pooling = {"pooling_mode_mean_tokens": True}  # sentence-transformers' own default
    mode = next((name for key, name in POOLINGS.items() if pooling.get(key)), None)
    if mode is None:
        return None  # a pooling this head does not compute (e.g. mean_sqrt_len, weighted mean)
    normalize = "Normalize" in kinds
    head = {"kind": "pooled", "pooling": mode, "normalize": normalize,
            "source": f"{kinds['Pooling'].get('path') or '.'}/config.json, modules.json"}
    width = pooling.get("word_embedding_dimension") or _hidden_size(folder)
    if normalize and width:
        # unit length, times sqrt(width): entries of order 1, as the [CLS] pooler's tanh gives, so that a
        # head trained at the methods' usual learning rates is not starved of scale (the direction, and so
        # every cosine similarity, is the checkpoint's own)
        head["scale"] = round(float(width) ** 0.5, 6)
    return head


def _hidden_size(folder: Path) -> int | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, ValueError):
        return None


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """[batch, seq, hidden] token states -> [batch, hidden], over the real (mask 1) tokens."""
    if mode == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    weights = mask[:, :, None].to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def embed(hidden: torch.Tensor, mask: torch.Tensor | None, head: dict) -> torch.Tensor:
    pooled = pool(hidden, mask, head["pooling"])
    if head.get("normalize"):
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled * head["scale"] if head.get("scale") else pooled


def _pooled_output(head: dict):
    def hook(module, args, kwargs, output):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooled = embed(output[0], mask, head)
        # every place a classification head reads: pooler_output (BERT), the first token (RoBERTa, MPNet), the
        # last real one (decoders), the mean (ModernBERT): the embedding at every position (a view, no copy)
        output["last_hidden_state"] = pooled[:, None, :].expand(-1, output[0].shape[1], -1)
        output["pooler_output"] = pooled
        return output

    return hook


def install(model: torch.nn.Module, head: dict | None) -> torch.nn.Module:
    """Make a *ForSequenceClassification model classify from the pooled embedding `head` describes
    (None or kind != pooled: unchanged). Idempotent; recorded in model.config (config.json)."""
    if not head or head.get("kind") != "pooled" or getattr(model, "_peftlab_head", None):
        return model
    backbone = model.base_model
    backbone.register_forward_hook(_pooled_output(head), with_kwargs=True)
    model._peftlab_head = head
    setattr(model.config, CONFIG_KEY, dict(head))
    return model


def installed(model: torch.nn.Module) -> dict | None:
    """The pooled head a model (or a peft model around it) classifies from, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "_peftlab_head", None)


def install_saved(model: torch.nn.Module) -> torch.nn.Module:
    """A model loaded from a folder whose config.json records a pooled head: install it again."""
    return install(model, getattr(model.config, CONFIG_KEY, None))


# the architectures sentence-transformers checkpoints use, and the common decoders (a few-shot or
# model.head=pooled run of one): Pooled<name> is the class a merged export's auto_map names
POOLED_BASES = ("BertForSequenceClassification", "MPNetForSequenceClassification",
                "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
                "DistilBertForSequenceClassification", "LlamaForSequenceClassification",
                "MistralForSequenceClassification", "Qwen2ForSequenceClassification",
                "Qwen3ForSequenceClassification", "GemmaForSequenceClassification", "Gemma2ForSequenceClassification",
                "Gemma3TextForSequenceClassification", "Phi3ForSequenceClassification",
                "Olmo2ForSequenceClassification")


def __getattr__(name: str):
    """Pooled<Arch>ForSequenceClassification, made on first use (importing every architecture's modeling
    code up front would cost each peftlab process seconds)."""
    import transformers

    base = getattr(transformers, name[len("Pooled"):], None) if name.startswith("Pooled") else None
    if name[len("Pooled"):] not in POOLED_BASES or base is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        install_saved(self)

    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__})
    globals()[name] = cls
    return cls
