"""The head that fits the checkpoint (docs/few-shot.md). A sentence-transformers checkpoint (MiniLM,
MPNet: its modules.json lists a Pooling module, and maybe Normalize) was trained to produce one
embedding per text, the mean of its token states (then unit length); its [CLS] pooler was never
trained. Such a model classifies from that embedding: `install` makes the backbone hand the
classification head the pooled embedding in place of its token states, so that every path through
the model (training, predict, serve's mixed batches, merged and ONNX exports) computes the same thing.
Other checkpoints keep their own head.

Saved forms. Every folder a pooled run is saved or exported in (the adapter folder, a full run's
model/, a merged export) carries this file as peftlab_head.py and a config.json whose model_type
transformers does not know (peftlab_pooled_<type>) and whose auto_map names the classes below. Loaded
with trust_remote_code=True, transformers computes what the run did (an adapter folder: the base model's
weights, then the adapter, through transformers' own PEFT support); loaded without, it refuses in a
line that says to pass trust_remote_code=True. A config.json saying model_type bert would make it build
BERT's [CLS]-pooler head instead, in silence. peftlab never runs that file: it reads such a folder
with its own classes (local_config).

This file imports only torch, transformers and the standard library: it is that remote code."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

REMOTE_FILE = "peftlab_head.py"  # this file's name in a saved folder of a pooled run
CONFIG_KEY = "peftlab_head"  # in config.json: the pooling the model's head reads
POOLED_TYPE = "peftlab_pooled_"  # config.json model_type of a pooled run's folders: this + the checkpoint's own
# the checkpoint model types whose pooled classes this file defines (sentence-transformers' architectures)
ARCHITECTURES = {"bert": "Bert", "mpnet": "MPNet", "roberta": "Roberta", "xlm-roberta": "XLMRoberta",
                 "distilbert": "DistilBert"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
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


def adapter_base(folder) -> str | None:
    """A PEFT adapter folder (adapter_config.json and no weights of its own): the base model its adapter
    goes on (adapter_config.json's base_model_name_or_path); else None."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file() or any((folder / f).exists() for f in WEIGHT_FILES):
        return None
    return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")


def _pooled_classes() -> dict[str, type]:
    """Pooled<Arch>Config and Pooled<Arch>ForSequenceClassification for the architectures
    sentence-transformers checkpoints use: the classes a saved folder's auto_map names. Pointed at an
    adapter folder (transformers' from_pretrained(ADAPTER_DIR, trust_remote_code=True)) the model class
    reads the base model's weights, and transformers then loads the adapter onto them."""
    import transformers

    out = {}
    for model_type, arch in ARCHITECTURES.items():
        config_base = getattr(transformers, f"{arch}Config", None)
        model_base = getattr(transformers, f"{arch}ForSequenceClassification", None)
        if config_base is None or model_base is None:
            continue
        config_class = type(f"Pooled{arch}Config", (config_base,), {"model_type": POOLED_TYPE + model_type})

        def __init__(self, config, *args, _base=model_base, **kwargs):
            _base.__init__(self, config, *args, **kwargs)
            install_saved(self)

        def from_pretrained(cls, path, *args, _base=model_base, **kwargs):
            base = adapter_base(path) if Path(str(path)).is_dir() else None
            if base is not None:
                # the base's own head (other labels, or none) is replaced by the adapter's
                kwargs.setdefault("ignore_mismatched_sizes", True)
                path = base
            return _base.from_pretrained.__func__(cls, path, *args, **kwargs)

        name = f"Pooled{arch}ForSequenceClassification"
        out[config_class.__name__] = config_class
        out[name] = type(name, (model_base,), {"config_class": config_class, "__init__": __init__,
                                               "from_pretrained": classmethod(from_pretrained)})
    return out


globals().update(_pooled_classes())


def save_remote_code(model: torch.nn.Module, directory: Path) -> bool:
    """A pooled model (or a peft model around one) saved into `directory`: write config.json as a pooled
    run's (model_type peftlab_pooled_<type>; auto_map to this file, copied beside it, where it defines
    the architecture's classes). The model's own config.json, if save_pretrained wrote one, is replaced.
    False (nothing written) for a model that keeps its own head."""
    if not installed(model):
        return False
    directory = Path(directory)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    data = json.loads(config.to_json_string(use_diff=False))
    own_type = data["model_type"]
    data["model_type"] = POOLED_TYPE + own_type
    arch = ARCHITECTURES.get(own_type)
    if arch is not None:
        shutil.copyfile(__file__, directory / REMOTE_FILE)
        module = REMOTE_FILE.removesuffix(".py")
        data["auto_map"] = {"AutoConfig": f"{module}.Pooled{arch}Config",
                            "AutoModelForSequenceClassification": f"{module}.Pooled{arch}ForSequenceClassification"}
        data["architectures"] = [f"Pooled{arch}ForSequenceClassification"]
    else:  # no class to load it with: transformers refuses the unknown type rather than build another head
        data.pop("auto_map", None)
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return arch is not None


def local_config(folder):
    """config.json of a pooled run's saved folder as the checkpoint's own transformers config (auto_map
    dropped; its pooled head is installed from the peftlab_head key when the model is built): how peftlab
    reads such a folder without running the code in it. None for any other folder."""
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kind = str(data.get("model_type", ""))
    if not kind.startswith(POOLED_TYPE):
        return None
    from transformers import AutoConfig

    rest = {k: v for k, v in data.items() if k not in ("model_type", "auto_map", "architectures")}
    return AutoConfig.for_model(kind.removeprefix(POOLED_TYPE), **rest)
