"""What peftlab knows per architecture (encoders and decoder language models): default adapter targets,
where the layers are, and what the classification head reads.

PEFT's own defaults cover BERT/RoBERTa but not DistilBERT, MPNet or ModernBERT (and its
`layers_to_transform` needs the right `layers_pattern`, peft #1024 / #2155), so they live here.
A decoder (llama, qwen, gemma, ...) classifies from its last real token: transformers' *ForSequenceClassification
takes the rightmost position whose id is not the pad id, so the model's pad id must be the tokenizer's
(models/loading.py sees to it), and left or right padding then give the same logits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from peftlab.errors import UserError


@dataclass(frozen=True)
class Architecture:
    lora_targets: tuple[str, ...]
    ia3_targets: tuple[str, ...]
    ia3_feedforward: tuple[str, ...]
    # the sequence-classification head reads only the first token's final hidden state (BERT's pooler,
    # the RoBERTa/ELECTRA heads: features[:, 0]), and the last layer's attention output is a *SelfOutput
    first_token_head: bool = False
    # LoRA placements `peftlab plan` tries, from least to most; empty: one per linear layer name
    plan_module_sets: tuple[tuple[str, ...], ...] = ()
    # position ids start after padding_idx (RoBERTa, MPNet): that many positions are never usable
    positions_after_padding: bool = False
    # a decoder language model: the head reads the last real token, found by the pad id (see above)
    decoder: bool = False


# module sets for BERT-like encoders (output.dense also matches attention.output.dense)
_BERT_MODULE_SETS = (
    ("query",), ("value",), ("query", "value"), ("query", "key"), ("query", "key", "value"),
    ("query", "key", "attention.output.dense"), ("query", "key", "value", "attention.output.dense"),
    ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
)
_BERT_LIKE = Architecture(("query", "value"), ("key", "value", "output.dense"), ("output.dense",),
                          first_token_head=True, plan_module_sets=_BERT_MODULE_SETS)

_ROBERTA_LIKE = replace(_BERT_LIKE, positions_after_padding=True)

# decoders: attention q/k/v/o and a gated MLP (gate, up, down); the default LoRA targets are q and v (the
# LoRA paper's, and what peft defaults to for llama), IA3 peft's (keys, values, the MLP's down projection)
_DECODER_MODULE_SETS = (
    ("q_proj",), ("v_proj",), ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
_LLAMA_LIKE = Architecture(("q_proj", "v_proj"), ("k_proj", "v_proj", "down_proj"), ("down_proj",),
                           plan_module_sets=_DECODER_MODULE_SETS, decoder=True)
# fused projections: one qkv_proj (Phi-3) and one gate_up_proj (Phi-3, GLM)
_PHI3_LIKE = Architecture(("qkv_proj",), ("qkv_proj", "down_proj"), ("down_proj",), decoder=True,
                          plan_module_sets=(("qkv_proj",), ("qkv_proj", "o_proj"),
                                            ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")))
_GLM_LIKE = replace(_LLAMA_LIKE, plan_module_sets=_DECODER_MODULE_SETS[:-1] + (
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),))

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT_LIKE,
    "roberta": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,
    "camembert": _ROBERTA_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": Architecture(("q_lin", "v_lin"), ("k_lin", "v_lin", "lin2"), ("lin2",)),
    "deberta-v2": Architecture(("query_proj", "value_proj"), ("key_proj", "value_proj", "output.dense"), ("output.dense",)),
    "mpnet": Architecture(("q", "v"), ("k", "v", "output.dense"), ("output.dense",), positions_after_padding=True),
    "modernbert": Architecture(("Wqkv", "Wo"), ("Wqkv", "mlp.Wo"), ("mlp.Wo",)),
    **{name: _LLAMA_LIKE for name in (
        "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo",
        "olmo2", "olmo3", "smollm3", "stablelm", "helium", "exaone4", "seed_oss")},
    "phi3": _PHI3_LIKE,
    "glm": _GLM_LIKE,
    "glm4": _GLM_LIKE,
    "phi": Architecture(("q_proj", "v_proj"), ("k_proj", "v_proj", "fc2"), ("fc2",), decoder=True),
    "starcoder2": Architecture(("q_proj", "v_proj"), ("k_proj", "v_proj", "c_proj"), ("c_proj",), decoder=True),
}

ALL_LINEAR = "all-linear"  # method.target_modules=all-linear: every linear layer of the blocks (peft's word)


def architecture_facts(model: torch.nn.Module) -> Architecture | None:
    """What peftlab knows about this model's architecture, or None."""
    config = getattr(model, "config", None)
    return ARCHITECTURES.get(getattr(config, "model_type", None))


def is_decoder(config) -> bool:
    """A decoder language model, whose head reads the last real token: known ones by their facts; others
    when transformers has a causal language model and no masked one for their type (BERT has both)."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type].decoder
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def position_limit(config) -> int | None:
    """The most tokens the model can read (max_position_embeddings, less RoBERTa/MPNet's padding
    offset), or None when its config does not say."""
    n = getattr(config, "max_position_embeddings", None)
    if not n:
        return None
    facts = ARCHITECTURES.get(getattr(config, "model_type", None))
    if facts is not None and facts.positions_after_padding:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def check_max_length(config, max_length: int, model_name: str) -> None:
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise UserError(f"data.max_length={max_length} is more than {model_name!r} can read ({limit} tokens): "
                        f"set data.max_length to at most {limit}")


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct short names of the Linear layers inside the encoder layers (what target_modules can name)."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layer" in full:
            parts = full.split(".")
            # the part after the layer index, e.g. attention.self.query
            idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
            names.add(".".join(parts[idx + 1:]) if idx is not None else parts[-1])
    return sorted(names)


def architecture_of(model: torch.nn.Module) -> Architecture:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"architecture {model_type!r} has no default adapter targets: set method.target_modules to some of "
            f"its linear layers ({', '.join(linear_layer_names(model))}) or to {ALL_LINEAR}"
        )
    return ARCHITECTURES[model_type]


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Top-level modules with parameters outside the backbone: the classification head
    (classifier, score, pre_classifier, pooler, head, ...). Always trained and saved."""
    prefix = model.base_model_prefix
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


def layers_pattern(model: torch.nn.Module) -> str:
    """The module-path segment that holds the layer index ('layer' in bert.encoder.layer.3, 'layers' in
    ModernBERT), read from the model itself so peft's layers_to_transform matches (peft #1024)."""
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            m = re.search(r"(?:^|\.)([^.]+)\.\d+\.", full)
            if m:
                return m.group(1)
    raise UserError(f"method.layers: no numbered layers found in {model.config.model_type!r}")


def num_hidden_layers(model: torch.nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers")


def resolve_targets(model: torch.nn.Module, requested: list[str] | None, default: str) -> list[str]:
    """method.target_modules as module names: the architecture's `default` field (lora_targets, ia3_targets)
    when not set, and `all-linear` spelled out as every linear layer of the blocks (so counts, plans and
    saved adapters name them; on any architecture, known or not)."""
    if not requested:
        return list(getattr(architecture_of(model), default))
    if ALL_LINEAR in requested:
        if len(requested) > 1:
            raise UserError(f"method.target_modules: {ALL_LINEAR} already names every linear layer; give it alone")
        return linear_layer_names(model)
    return list(requested)


def check_targets(model: torch.nn.Module, targets: list[str], layers: list[int] | None) -> None:
    """Fail early, with the names that exist, when targets or layers match nothing."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(
            f"method.target_modules {missing} match no linear layer of {model.config.model_type!r}: "
            f"choose from {', '.join(linear_layer_names(model))}, or {ALL_LINEAR}"
        )
    if layers:
        n = num_hidden_layers(model)
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise UserError(f"method.layers {bad} out of range: this model has layers 0..{n - 1}")
