"""peftlab plan --budget N [CONFIG] [--set k=v ...] [--top K]"""
from __future__ import annotations

from peftlab.cli import add_config_arguments
from peftlab.cli._checks import at_least_two, positive_int
from peftlab.cli.params import labels_arg
from peftlab.config import load_config
from peftlab.errors import UserError


def add_parser(sub):
    p = sub.add_parser("plan", help="the highest-capacity LoRA configurations that fit a parameter budget",
                       description="List LoRA configurations (rank x target modules x layers) whose exact trainable "
                                   "count fits the budget, most adapter capacity first. Each count is measured on "
                                   "a meta-device build of the configured model (no weights loaded).")
    add_config_arguments(p)
    p.add_argument("--budget", type=positive_int, metavar="N", help="most trainable parameters (default: budget.max_trainable_params)")
    p.add_argument("--top", type=positive_int, default=10, metavar="K", help="how many configurations to list (default 10)")
    p.add_argument("--num-labels", type=at_least_two, metavar="N", help="number of classes (default: read from the dataset)")
    return p


def run(args) -> int:
    from peftlab.models.plan import plan

    cfg = load_config(args.config, args.overrides)
    budget = args.budget if args.budget is not None else cfg.budget.max_trainable_params
    if budget is None:
        raise UserError("plan: give --budget N (or budget.max_trainable_params in the config)")
    chosen, head = plan(cfg, budget, args.top, labels_arg(args.num_labels))
    print(f"model {cfg.model.name}: classification head {head:,} trainable parameters (always trained)")
    if not chosen:
        raise UserError(f"plan: no LoRA configuration fits {budget:,} trainable parameters (the head alone has "
                        f"{head:,}); raise --budget")
    head_row = ["#", "trainable", "of budget", "adapter", "r", "target modules", "layers"]
    rows = [[str(i + 1), f"{c.trainable:,}", f"{100 * c.trainable / budget:.1f}%", f"{c.adapter:,}", str(c.r),
             ",".join(c.target_modules), "all" if c.layers is None else ",".join(map(str, c.layers))]
            for i, c in enumerate(chosen)]
    widths = [max(len(x) for x in col) for col in zip(head_row, *rows)]
    print(f"LoRA configurations within {budget:,} trainable parameters (exact counts), most capacity first:")
    if cfg.method.rank_pattern:
        print("  (module types with their own rank, from the config's method.rank_pattern: "
              + ", ".join(f"{k}={v}" for k, v in cfg.method.rank_pattern.items()) + ")")
    print("  ".join(x.ljust(w) for x, w in zip(head_row, widths)))
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
    print("to use #1: " + " ".join(f"--set {s}" for s in chosen[0].overrides))
    return 0
