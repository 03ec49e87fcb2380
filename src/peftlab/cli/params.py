"""peftlab params [CONFIG] [--set k=v ...] [--num-labels N]"""
from __future__ import annotations

from peftlab.cli import add_config_arguments
from peftlab.cli._checks import at_least_two
from peftlab.config import load_config


def add_parser(sub):
    p = sub.add_parser("params", help="exact trainable-parameter count of a configuration, without training",
                       description="Build the configured model on the meta device (no weights read) with its method "
                                   "applied and print the exact trainable count: adapter, classification head, other.")
    add_config_arguments(p)
    p.add_argument("--num-labels", type=at_least_two, metavar="N", help="number of classes (default: read from the dataset)")
    return p


def describe_method(m) -> str:
    """The method and the settings that apply to it (the method says which)."""
    from peftlab.models.methods import registry

    facts = registry.get(m.name)
    if not facts.hyperparameters:
        return f"{m.name} ({facts.summary})"
    text = m.name
    if "target_modules" in facts.hyperparameters:
        text += f"  targets {','.join(m.target_modules) if m.target_modules else 'default modules'}"
    if "layers" in facts.hyperparameters:
        text += f"  layers {','.join(map(str, m.layers)) if m.layers else 'all'}"
    if facts.has_rank:
        text += f"  r={m.r} alpha={m.alpha:g}"
        if m.rank_pattern:
            text += "  ranks " + ",".join(f"{k}={v}" for k, v in m.rank_pattern.items())
    return text


def labels_arg(n: int | None) -> list[str] | None:
    """--num-labels N (at least 2: checked by argparse) as placeholder label names."""
    return None if n is None else [str(i) for i in range(n)]


def run(args) -> int:
    from peftlab.models.methods import registry
    from peftlab.models.params import count_config

    cfg = load_config(args.config, args.overrides)
    c = count_config(cfg, labels_arg(args.num_labels))
    shape = " (shape from peftlab's copy of its config: the hub was not reachable)" if c.offline_shape else ""
    rows = [("model", f"{cfg.model.name} ({c.model_type}, {c.num_layers} layers){shape}"),
            ("labels", f"{c.num_labels}"),
            ("method", describe_method(cfg.method))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("trainable parameters (exact; model built on the meta device, no weights loaded):")
    kind = registry.get(cfg.method.name).adapter_kind
    adapter_name = f"adapter ({kind})" if kind else "adapter"
    lines = [(adapter_name, c.adapter), ("classification head", c.head), ("other trainable", c.other),
             ("total trainable", c.trainable)]
    for k, v in lines:
        extra = f"   {c.trainable_pct:.4f}% of {c.total:,}" if k == "total trainable" else ""
        print(f"  {k:<21} {v:>13,}{extra}")
    if c.per_module:
        print("adapter parameters per module type:")
        for k, v in sorted(c.per_module.items()):
            print(f"  {k:<32} {v:>11,}")
    budget = cfg.budget.max_trainable_params
    if budget is not None:
        verdict = f"fits ({budget - c.trainable:,} to spare)" if c.trainable <= budget else \
            f"over by {c.trainable - budget:,}: a sweep skips it"
        print(f"budget {budget:,}: {verdict}")
    return 0
