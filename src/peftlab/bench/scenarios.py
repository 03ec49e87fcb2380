"""Benchmark scenarios: read from a small YAML file (bench/scenarios.yaml), defaults merged in.

A scenario is data + device + parts; a part is one model on which every contender runs. Adding a
scenario is adding an entry to the file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from peftlab.config.load import read_yaml
from peftlab.errors import UserError

# keys a scenario or a part may set, with the type they must have (None: any)
SETTINGS: dict[str, Any] = {
    "baseline": str, "data": str, "train_file": str, "test_file": str, "max_train": (int, type(None)),
    "max_test": (int, type(None)), "validation_rows": int, "epochs": int, "batch_size": int, "max_length": int,
    "learning_rate": (int, float), "seed": int, "lora": dict, "repeats": int, "peftlab": dict, "variants": dict,
    "timeout_s": (int, float, type(None)), "device": str, "description": str, "model": str,
}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}
# what a setting is when neither the file's defaults nor the scenario say (the baseline's own defaults)
BUILTIN_DEFAULTS: dict[str, Any] = {
    "baseline": "../shared/bench/hf_trainer_baseline.py", "train_file": "train.jsonl.gz",
    "test_file": "test.jsonl.gz", "max_train": None, "max_test": None, "validation_rows": 256, "epochs": 1,
    "batch_size": 32, "max_length": 128, "learning_rate": 3e-4, "seed": 42,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["query", "value"]},
    "repeats": 1, "peftlab": {}, "variants": {}, "timeout_s": None,
}


@dataclass
class Part:
    """One model of a scenario, with every setting resolved (scenario defaults + part overrides)."""
    name: str
    model: str
    settings: dict[str, Any]

    def __getattr__(self, key: str) -> Any:  # part.epochs, part.lora, ...
        try:
            return self.__dict__["settings"][key]
        except KeyError:
            raise AttributeError(key) from None


@dataclass
class Scenario:
    name: str
    description: str
    device: str                      # "cpu" or "cuda"
    parts: list[Part]
    source: Path                     # the scenarios file it came from
    root: Path = field(repr=False)   # relative paths start here

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()


def default_scenarios_file() -> Path:
    """bench/scenarios.yaml of the current directory when there is one, else the repository's own."""
    here = Path("bench") / "scenarios.yaml"
    if here.is_file():
        return here
    return Path(__file__).resolve().parents[3] / "bench" / "scenarios.yaml"


def read_file(path: str | Path) -> dict:
    tree = read_yaml(path, "scenarios file", "pass one with --scenarios (see bench/scenarios.yaml)")
    if not isinstance(tree.get("scenarios"), dict) or not tree["scenarios"]:
        raise UserError(f"scenarios file {str(path)!r}: expected a mapping with a non-empty 'scenarios:' section")
    return tree


def names(path: str | Path) -> list[str]:
    return list(read_file(path)["scenarios"])


def _check(where: str, values: dict) -> None:
    for key, value in values.items():
        if key not in SETTINGS and key not in ("parts", "name"):
            raise UserError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(SETTINGS))}, parts, name)")
        kind = SETTINGS.get(key)
        if kind is not None and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{where}: {key}={value!r} has the wrong type")
    lora = values.get("lora")
    if lora is not None and set(lora) - LORA_KEYS:
        raise UserError(f"{where}: lora keys are {', '.join(sorted(LORA_KEYS))}")


def load(name: str, path: str | Path | None = None) -> Scenario:
    source = Path(path) if path else default_scenarios_file()
    tree = read_file(source)
    scenarios = tree["scenarios"]
    if name not in scenarios:
        raise UserError(f"unknown scenario {name!r} in {source} (known: {', '.join(scenarios)})")
    root = (source.parent / str(tree.get("root", "."))).resolve()
    defaults = dict(tree.get("defaults") or {})
    spec = dict(scenarios[name] or {})
    _check(f"{source}: defaults", defaults)
    _check(f"{source}: scenario {name}", spec)
    parts_spec = spec.pop("parts", None) or [{}]
    merged = {**BUILTIN_DEFAULTS, **defaults, **spec}
    merged["lora"] = {**BUILTIN_DEFAULTS["lora"], **(defaults.get("lora") or {}), **(spec.get("lora") or {})}
    for required in ("data", "device"):
        if required not in merged:
            raise UserError(f"{source}: scenario {name} needs '{required}'")
    if merged["device"] not in ("cpu", "cuda"):
        raise UserError(f"{source}: scenario {name}: device must be cpu or cuda, not {merged['device']!r}")
    parts = []
    for i, p in enumerate(parts_spec):
        if not isinstance(p, dict):
            raise UserError(f"{source}: scenario {name}: each part is a mapping like {{name: main, model: minilm-l6}}")
        _check(f"{source}: scenario {name} part {i + 1}", p)
        settings = {**merged, **{k: v for k, v in p.items() if k != "name"}}
        settings["lora"] = {**merged["lora"], **(p.get("lora") or {})}
        settings["peftlab"] = {**(merged.get("peftlab") or {}), **(p.get("peftlab") or {})}
        if "model" not in settings:
            raise UserError(f"{source}: scenario {name} part {i + 1} needs 'model'")
        if settings["epochs"] < 1 or settings["repeats"] < 1:
            raise UserError(f"{source}: scenario {name}: epochs and repeats must be at least 1")
        parts.append(Part(name=str(p.get("name") or f"part{i + 1}"), model=settings["model"], settings=settings))
    return Scenario(name=name, description=str(merged.get("description", "")), device=merged["device"],
                    parts=parts, source=source, root=root)
