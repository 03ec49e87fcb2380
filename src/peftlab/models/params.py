"""Exact trainable-parameter counts before training: the model is built on the meta device (shapes
only, no weights read or allocated), the method applied as in training, and counted with the same
`count_parameters` the training run records in metrics.json. `peftlab params` and sweep budgets use it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from peftlab.config import Config
from peftlab.errors import UserError

# Label sets of well-known datasets, so that counting needs no download (only their number matters).
KNOWN_LABELS = {
    "bbc_news": ["business", "entertainment", "politics", "sports", "tech"],
    "ag_news": ["World", "Sports", "Business", "Sci/Tech"],
    "imdb": ["neg", "pos"],
}


def _known_model_config(name: str):
    """Shapes of common hub models (their published config.json), used only when the hub cannot be
    reached: enough to count parameters offline."""
    from transformers import BertConfig, RobertaConfig

    if name == "bert-base-uncased":
        return BertConfig()
    if name == "roberta-base":
        return RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                             pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return None


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


@dataclass
class Count:
    trainable: int
    total: int
    trainable_pct: float
    adapter: int
    head: int
    other: int
    per_module: dict[str, int] = field(default_factory=dict)  # adapter parameters per module type
    model_type: str = ""
    num_layers: int = 0
    num_labels: int = 0
    offline_shape: bool = False  # the model's shape came from peftlab's copy of its config



def label_names_for(cfg: Config) -> list[str]:
    """The dataset's label names: from the data itself when it is local, else from the list of known
    datasets, else by loading it (which may download)."""
    d = cfg.data
    if d.path is None and d.hub_subset is None and d.name in KNOWN_LABELS:
        return KNOWN_LABELS[d.name]
    return _load_labels(d.model_dump_json())


@lru_cache(maxsize=16)
def _load_labels(data_json: str) -> list[str]:
    from peftlab.config.schema import DataConfig
    from peftlab.data import load_data

    d = DataConfig.model_validate_json(data_json)
    return list(load_data(d, 0).label_names)


def _model_config(model_name: str, label_names: tuple[str, ...]):
    """The model's transformers config with our labels; for a few well-known hub models, peftlab's copy
    of their published shape when the hub (and the local cache) cannot provide it."""
    from peftlab.models.loading import model_config

    try:
        return model_config(model_name, list(label_names)), False
    except UserError:
        known = _known_model_config(model_name)
        if known is None:
            raise
    known.num_labels = len(label_names)
    known.id2label = dict(enumerate(label_names))
    known.label2id = {n: i for i, n in enumerate(label_names)}
    return known, True


def meta_model(cfg: Config, label_names: list[str] | None = None) -> tuple[torch.nn.Module, list[str], bool]:
    """The base classifier (before any method) on the meta device, and its head module names."""
    from transformers import AutoModelForSequenceClassification

    from peftlab.models.architectures import head_module_names
    from peftlab.models.loading import quiet_transformers

    quiet_transformers()
    labels = tuple(label_names if label_names is not None else label_names_for(cfg))
    config, offline = _model_config(cfg.model.name, labels)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return model, head_module_names(model), offline


def _is_adapter(name: str) -> bool:
    return bool(re.search(r"\.(lora_[A-Za-z_]+|ia3_l)\b", name))


def _module_type(name: str) -> str:
    """encoder.layer.3.attention.self.query.lora_A.default.weight -> attention.self.query"""
    m = re.search(r"\.\d+\.(.+?)\.(?:lora_|ia3_)", name)
    return m.group(1) if m else name.split(".lora_")[0].split(".ia3_")[0].split(".")[-1]


def count_config(cfg: Config, label_names: list[str] | None = None) -> Count:
    """The exact trainable count of `cfg`'s model with its method applied, built without weights."""
    from peftlab.models.architectures import num_hidden_layers
    from peftlab.models.methods import registry

    method = registry.get(cfg.method.name)
    model, heads, offline = meta_model(cfg, label_names)
    n_layers = num_hidden_layers(model)
    model_type = model.config.model_type
    num_labels = model.config.num_labels
    with torch.device("meta"):
        model = method.apply(model, cfg.method, torch.device("cpu"))
    counted = count_parameters(model)
    adapter = head = other = 0
    per_module: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or ".original_module." in name:
            continue
        n = p.numel()
        parts = name.split(".")
        if _is_adapter(name):
            adapter += n
            kind = _module_type(name)
            per_module[kind] = per_module.get(kind, 0) + n
        elif any(h in parts for h in heads):
            head += n
        else:
            other += n
    if adapter + head + other != counted["trainable"]:  # cannot happen: the same parameters, split three ways
        raise RuntimeError("parameter breakdown does not add up")
    return Count(counted["trainable"], counted["total"], counted["trainable_pct"], adapter, head, other,
                 per_module, model_type, n_layers, num_labels, offline)
