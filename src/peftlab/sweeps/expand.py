"""A sweep config -> the deterministic list of runs it asks for.

`sweep.grid` maps config keys (section.key) to lists of values; every combination is one
configuration, and `sweep.seeds` repeats each configuration once per seed. Names say the
configuration: `lora-r8-a16-seed1`. `sweep.space` (with `n_trials`) is sampled by Optuna instead;
its configurations are made here from the sampled values too (`configuration_from_params`).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.config import Config
from peftlab.config.load import build_config, config_tree, set_in
from peftlab.errors import UserError

# short labels of common keys in run names; other keys use their last part
ABBREVIATIONS = {
    "method.r": "r", "method.alpha": "a", "method.dropout": "d", "method.layers": "L",
    "method.target_modules": "t", "method.rank_pattern": "rp", "method.bits": "bits",
    "train.learning_rate": "lr", "train.epochs": "ep", "train.batch_size": "bs", "train.weight_decay": "wd",
    "train.max_steps": "steps", "data.max_length": "len", "data.max_train_samples": "n",
    "distill.alpha": "kda", "distill.temperature": "T",
}
TEACHER_UNIT = "teacher"


@dataclass
class Run:
    """One training run: one run directory `trials/<name>`."""
    name: str
    seed: int
    tree: dict  # the full config tree of the run (output.dir filled in when the sweep directory is known)


@dataclass
class Unit:
    """What one worker claims at a time: one run (grid), or one sampled configuration with all its seeds."""
    key: str
    group: str  # configuration name, without the seed
    overrides: dict  # grid key -> value, for the record
    runs: list[Run] = field(default_factory=list)
    depends_on: str | None = None  # a unit that must complete first (a teacher trained in this sweep)
    budget_exempt: bool = False


# --- naming ------------------------------------------------------------------------------------

def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+]+", "_", text).strip("_") or "x"


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(format_value(v) for v in value) or "none"
    if isinstance(value, dict):
        return "_".join(f"{_clean(str(k).split('.')[-1])}{format_value(v)}" for k, v in value.items()) or "none"
    return _clean(str(value))


def label(key: str, value: Any) -> str:
    """The part of a run name that says one grid value: method.r=8 -> 'r8'."""
    if key == "method.name":
        return format_value(value)
    if key == "distill.teacher":
        if value is None:
            return "nokd"
        return "kd" if value == TEACHER_UNIT else f"kd-{_clean(Path(str(value)).name)}"
    if key == "method.target_modules" and isinstance(value, (list, tuple)):
        return "t" + "+".join(_clean(str(v).split(".")[-1] if str(v).count(".") <= 1 else str(v)) for v in value)
    if isinstance(value, dict) and "." not in key:  # a whole section, e.g. method: {name: lora, r: 8}
        parts = [label(f"{key}.{k}", v) for k, v in value.items()]
        return "-".join(p for p in parts if p)
    prefix = ABBREVIATIONS.get(key, _clean(key.split(".")[-1]))
    return f"{prefix}{format_value(value)}"


def configuration_name(base: dict, choice: dict[str, Any]) -> str:
    """Method first (from the choice, else from the base config), then one label per other key."""
    parts = []
    whole_method = choice.get("method")
    if "method.name" not in choice and not (isinstance(whole_method, dict) and "name" in whole_method):
        parts.append(format_value((base.get("method") or {}).get("name", "lora")))
    for key, value in choice.items():
        parts.append(label(key, value))
    return "-".join(p for p in parts if p)


# --- config trees ------------------------------------------------------------------------------

def _deep_merge(node: dict, value: dict) -> None:
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(node.get(k), dict) and k != "rank_pattern":
            _deep_merge(node[k], v)
        else:
            node[k] = copy.deepcopy(v)


def apply_choice(tree: dict, choice: dict[str, Any]) -> dict:
    """A copy of `tree` with each `section.key: value` of the choice set (a whole-section dict merges)."""
    out = copy.deepcopy(tree)
    for key, value in choice.items():
        parts = [p for p in key.split(".") if p]
        if len(parts) == 1 and isinstance(value, dict):
            node = out.setdefault(parts[0], {})
            if not isinstance(node, dict):
                out[parts[0]] = node = {}
            _deep_merge(node, value)
        else:
            set_in(out, parts, copy.deepcopy(value))
    return out


def check_key(key: str, where: str) -> None:
    parts = [p for p in key.split(".") if p]
    if not parts or parts[0] == "sweep":
        raise UserError(f"{where}: key {key!r} cannot be swept (give config keys like method.r or train.learning_rate)")
    if parts[0] not in Config.model_fields:
        raise UserError(f"{where}: unknown key {key!r} (sections: {', '.join(k for k in Config.model_fields if k != 'sweep')})")


def base_tree(cfg: Config) -> dict:
    """The config every run starts from: the sweep block itself is not part of a run's config."""
    tree = config_tree(cfg)
    tree["sweep"] = {}
    tree.setdefault("output", {})["dir"] = None
    return tree


def grid_choices(grid: dict[str, list]) -> list[dict[str, Any]]:
    for key, values in grid.items():
        check_key(key, "sweep.grid")
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep.grid: {key!r} needs a non-empty list of values, e.g. {key}: [8, 16]")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def _validate(tree: dict, name: str) -> dict:
    """Validate one run's config; returns the normalised tree (every field present)."""
    cfg = build_config(tree, f"sweep configuration {name!r}")
    return config_tree(cfg)


def expand_grid(cfg: Config) -> list[Unit]:
    """Grid sweep (or a single configuration repeated over seeds): one unit per (configuration, seed),
    in a fixed order; a sweep teacher (sweep.teacher) comes first."""
    sweep = cfg.sweep
    base = base_tree(cfg)
    units: list[Unit] = []
    if sweep.teacher is not None:
        for key in sweep.teacher:
            check_key(key, "sweep.teacher")
        teacher_choice = {**sweep.teacher}
        tree = apply_choice(base, teacher_choice)
        set_in(tree, ["distill", "teacher"], None)
        tree = _validate(tree, TEACHER_UNIT)
        units.append(Unit(TEACHER_UNIT, TEACHER_UNIT, teacher_choice, [Run(TEACHER_UNIT, tree["train"]["seed"], tree)],
                          budget_exempt=True))

    choices = grid_choices(sweep.grid) if sweep.grid else [{}]
    groups = _unique([configuration_name(base, c) for c in choices])
    if TEACHER_UNIT in groups and sweep.teacher is not None:
        raise UserError("sweep: a configuration is named 'teacher', which is the sweep teacher's name; rename it")
    seeds = list(sweep.seeds) or [None]
    for group, choice in zip(groups, choices):
        teacher = choice.get("distill.teacher", (base.get("distill") or {}).get("teacher"))
        depends = TEACHER_UNIT if teacher == TEACHER_UNIT and sweep.teacher is not None else None
        if teacher == TEACHER_UNIT and sweep.teacher is None and not Path(TEACHER_UNIT).exists():
            raise UserError("sweep: distill.teacher 'teacher' refers to the sweep teacher, but sweep.teacher is not set "
                            "(set sweep.teacher to the overrides of a teacher run, e.g. {method.name: full})")
        for seed in seeds:
            name = group if seed is None else f"{group}-seed{seed}"
            tree = apply_choice(base, choice)
            if seed is not None:
                set_in(tree, ["train", "seed"], seed)
            tree = _validate(tree, name)
            units.append(Unit(name, group, choice, [Run(name, tree["train"]["seed"], tree)], depends_on=depends))
    return units


# --- search spaces -----------------------------------------------------------------------------

def encode_choice(value: Any) -> Any:
    """Optuna categorical choices must be None, bool, int, float or str: lists and dicts go as JSON."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else "json:" + json.dumps(value)


def decode_choice(value: Any) -> Any:
    return json.loads(value[5:]) if isinstance(value, str) and value.startswith("json:") else value


def distributions(cfg: Config) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, dim in cfg.sweep.space.items():
        check_key(key, "sweep.space")
        try:
            if dim.type == "categorical":
                out[key] = CategoricalDistribution([encode_choice(c) for c in dim.choices])
            elif dim.type == "int":
                out[key] = IntDistribution(int(dim.low), int(dim.high), log=dim.log)
            else:
                out[key] = FloatDistribution(float(dim.low), float(dim.high), log=dim.log)
        except ValueError as e:
            raise UserError(f"sweep.space {key!r}: {e}") from None
    return out


def space_unit(cfg: Config, slot: int, params: dict) -> Unit:
    """The unit for search slot `slot` with sampled `params` (Optuna's encoded values)."""
    base = base_tree(cfg)
    choice = {k: decode_choice(params[k]) for k in cfg.sweep.space if k in params}
    group = f"trial{slot:03d}-{configuration_name(base, choice)}"
    runs = []
    for seed in list(cfg.sweep.seeds) or [None]:
        name = group if seed is None else f"{group}-seed{seed}"
        tree = apply_choice(base, choice)
        if seed is not None:
            set_in(tree, ["train", "seed"], seed)
        tree = _validate(tree, name)
        runs.append(Run(name, tree["train"]["seed"], tree))
    return Unit(f"slot{slot}", group, choice, runs)


def plan_fingerprint(cfg: Config, units: list[Unit]) -> str:
    """What must be the same for two sweep processes to share one study."""
    def trained(tree: dict) -> dict:  # where a run is logged is not what it trains
        return {k: v for k, v in tree.items() if k != "tracking"}

    if cfg.sweep.space:
        what = {"base": trained(base_tree(cfg)), "space": {k: v.model_dump() for k, v in cfg.sweep.space.items()},
                "n_trials": cfg.sweep.n_trials, "seeds": cfg.sweep.seeds}
    else:
        what = [(u.key, [trained(r.tree) for r in u.runs]) for u in units]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
