"""peftlab config [CONFIG] [--set k=v ...]: print the resolved config, each field with its description."""
from __future__ import annotations

import json

from peftlab.cli import add_config_arguments
from peftlab.config import load_config
from peftlab.config.schema import Config


def add_parser(sub):
    p = sub.add_parser("config", help="print the resolved config (all defaults, with descriptions)")
    add_config_arguments(p)
    return p


def annotated_yaml(cfg: Config) -> str:
    lines = []
    for section, field in Config.model_fields.items():
        lines.append(f"{section}:")
        value = getattr(cfg, section)
        for name, sub in type(value).model_fields.items():
            shown = json.dumps(getattr(value, name) if not hasattr(getattr(value, name), "model_dump")
                               else getattr(value, name).model_dump(mode="json"), default=str)
            comment = f"  # {sub.description}" if sub.description else ""
            lines.append(f"  {name}: {shown}{comment}")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    print(annotated_yaml(load_config(args.config, args.overrides)), end="")
    return 0
