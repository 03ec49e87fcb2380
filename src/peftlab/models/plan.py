"""`peftlab plan --budget N`: the highest-capacity LoRA configurations (rank x target modules x
layers) whose exact trainable count fits a budget.

Candidates are screened with the LoRA formula (r * (in + out) per adapted linear layer, plus the
trainable head); each one listed is then built on the meta device with peft and counted exactly, so
the figure printed is the figure training will record."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from peftlab.config import Config
from peftlab.models.params import count_config, meta_model

RANKS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Candidate:
    r: int
    target_modules: tuple[str, ...]
    layers: tuple[int, ...] | None  # None: all layers
    estimate: int  # screened with the formula
    trainable: int | None = None  # exact, from the built model
    adapter: int | None = None
    head: int | None = None
    rank_pattern: dict[str, int] | None = None  # the config's own ranks of the module types this placement adapts

    @property
    def overrides(self) -> list[str]:
        """--set overrides for this configuration (on top of the config it was planned from)."""
        sets = [f"method.r={self.r}", f"method.target_modules=[{','.join(self.target_modules)}]"]
        sets.append("method.layers=null" if self.layers is None else f"method.layers=[{','.join(map(str, self.layers))}]")
        return sets


def layer_subsets(n: int) -> list[tuple[int, ...] | None]:
    """All layers, halves, ends, every other, single layers at each end."""
    top_half = tuple(range(n - n // 2, n)) if n > 1 else None
    bottom_half = tuple(range(n // 2)) if n > 1 else None
    subsets = [None, top_half, bottom_half, (0, n - 1) if n > 2 else None, (0, 1, n - 2, n - 1) if n > 4 else None,
               tuple(range(0, n, 2)) if n > 2 else None, (n - 1,) if n > 1 else None, (0,) if n > 1 else None]
    out, seen = [], set()
    for s in subsets:
        key = tuple(range(n)) if s is None else s
        if key not in seen and (s is None or len(s) < n):
            seen.add(key)
            out.append(s)
    return out


def module_sets(model: torch.nn.Module) -> list[tuple[str, ...]]:
    from peftlab.models.architectures import architecture_facts, linear_layer_names

    known = architecture_facts(model)
    if known and known.plan_module_sets:
        return list(known.plan_module_sets)
    names = linear_layer_names(model)
    sets = [(n,) for n in names]
    if known:
        sets.insert(0, tuple(known.lora_targets))
    sets.append(tuple(names))
    return list(dict.fromkeys(sets))


def _linear_shapes(model: torch.nn.Module, heads: list[str]) -> list[tuple[str, int | None, int, int]]:
    """(full name, layer index, in_features, out_features) of every linear layer outside the head."""
    from peftlab.models.architectures import layers_pattern

    pattern = layers_pattern(model)
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in heads:
            m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)\.", name)
            out.append((name, int(m.group(1)) if m else None, module.in_features, module.out_features))
    return out


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # peft's rule for a list of target modules: the full name, or a suffix after a dot
    return any(name == t or name.endswith("." + t) for t in targets)


def candidates(cfg: Config, budget: int, label_names: list[str] | None = None) -> tuple[list[Candidate], int]:
    """Every screened candidate under the budget, best first, and the head's trainable count."""
    from peftlab.models.architectures import num_hidden_layers

    model, heads, _ = meta_model(cfg, label_names)
    head_count = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in heads)
    shapes = _linear_shapes(model, heads)
    n_layers = num_hidden_layers(model)
    pattern = dict(cfg.method.rank_pattern)  # module types with their own rank stay at it
    sets = module_sets(model)
    if cfg.method.target_modules:  # the config's own placement is a candidate too
        sets.insert(0, tuple(cfg.method.target_modules))
    subsets = layer_subsets(n_layers)
    if cfg.method.layers:
        subsets.insert(0, tuple(sorted(set(cfg.method.layers))))
    out, seen = [], set()
    for targets in dict.fromkeys(sets):
        for layers in subsets:
            if (targets, layers) in seen:
                continue
            seen.add((targets, layers))
            chosen = [s for s in shapes if _matches(s[0], targets) and (layers is None or s[1] in layers)]
            if not chosen or (layers is not None and any(s[1] is None for s in chosen)):
                continue
            fixed = per_rank = 0
            used = {}  # rank_pattern keys that match an adapted module (peft warns about the others)
            for name, _, i, o in chosen:
                key = next((key for key in pattern if re.match(rf"(.*\.)?({key})$", name)), None)
                if key is None:
                    per_rank += i + o
                else:
                    used[key] = pattern[key]
                    fixed += pattern[key] * (i + o)
            # the highest rank that fits, for each placement (targets x layers)
            fitting = [r for r in RANKS if head_count + fixed + r * per_rank <= budget]
            if fitting:
                r = max(fitting)
                out.append(Candidate(r, targets, layers, head_count + fixed + r * per_rank, rank_pattern=used))
    # most capacity first; then wider coverage (more layers, more modules); then lower rank
    out.sort(key=lambda c: (-c.estimate, -(len(c.layers) if c.layers else n_layers), -len(c.target_modules), c.r))
    return out, head_count


def plan(cfg: Config, budget: int, top: int = 10, label_names: list[str] | None = None) -> tuple[list[Candidate], int]:
    """The `top` best candidates, each counted exactly on a meta-device build (over-budget ones dropped)."""
    from peftlab.models.methods import registry

    method = cfg.method.name if registry.get(cfg.method.name).has_rank else "lora"
    found, head_count = candidates(cfg, budget, label_names)
    chosen = []
    for c in found:
        trial = cfg.model_copy(deep=True)
        trial.method.name = method
        trial.method.r = c.r
        trial.method.target_modules = list(c.target_modules)
        trial.method.layers = list(c.layers) if c.layers is not None else None
        trial.method.rank_pattern = dict(c.rank_pattern or {})
        counted = count_config(trial, label_names)
        c.trainable, c.adapter, c.head = counted.trainable, counted.adapter, counted.head
        if c.trainable <= budget:
            chosen.append(c)
        if len(chosen) >= top:
            break
    return chosen, head_count
