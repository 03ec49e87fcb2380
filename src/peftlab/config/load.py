"""Read a YAML config, apply `--set section.key=value` overrides, validate, save."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftlab.config.choices import choices
from peftlab.config.schema import Config
from peftlab.errors import UserError


def _allowed(model: type[BaseModel], path: tuple) -> str:
    """Describe what is allowed at a failing location: the field names or the literal values."""
    cls: Any = model
    for part in path[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            break
        cls = field.annotation
    fields = getattr(cls, "model_fields", None)
    if fields is None:
        return ""
    last = path[-1] if path else None
    if last in fields:
        ann = fields[last].annotation
        literal = [a for a in typing.get_args(ann)] if typing.get_origin(ann) is typing.Literal else []
        return f" (allowed: {', '.join(map(str, literal))})" if literal else ""
    return f" (allowed keys: {', '.join(fields)})"


def _validation_message(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not isinstance(p, int) or p == e["loc"][-1])
    key = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{_allowed(Config, loc)}"
    value = e.get("input")
    return f"{source}: bad value {value!r} for '{key}': {e['msg']}{_allowed(Config, loc)}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'method.r=8' -> (['method', 'r'], 8); the value is read as YAML ('[query,value]' is a list)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set method.r=8")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def set_in(tree: dict, parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        node = tree.get(p)
        if not isinstance(node, dict):
            node = tree[p] = {}
        tree = node
    tree[parts[-1]] = value


def read_yaml(path: str | Path, what: str = "config file",
              hint: str = "pass an existing YAML file (examples in configs/)") -> dict:
    """A YAML mapping from a file, or a one-line UserError naming `what` the file is for."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} not found: {hint}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} {str(p)!r}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {str(p)!r}: expected a mapping of sections (data:, model:, method:, ...)"
                        if what == "config file" else f"{what} {str(p)!r}: expected a YAML mapping")
    return data


def build_config(tree: dict, source: str = "config") -> Config:
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(_validation_message(e, source)) from None
    allowed = choices("method.name")  # registered by models/methods/registry.py
    if allowed is not None and cfg.method.name not in allowed:
        raise UserError(f"{source}: unknown method.name {cfg.method.name!r} (allowed: {', '.join(allowed)})")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The one way to obtain a Config: file (optional) + overrides, validated."""
    tree = read_yaml(path) if path else {}
    for text in overrides:
        parts, value = parse_override(text)
        set_in(tree, parts, value)
    source = str(path) if path else "config"
    if overrides:
        source += " with --set"
    return build_config(tree, source)


def config_tree(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: str | Path) -> None:
    from peftlab.files import write_text

    write_text(path, yaml.safe_dump(config_tree(cfg), sort_keys=False))
