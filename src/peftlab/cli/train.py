"""peftlab train [CONFIG] [--set k=v ...] [--output-dir DIR] | --resume RUN_DIR"""
from __future__ import annotations

import traceback

from peftlab.cli import add_config_arguments
from peftlab.config import load_config
from peftlab.config.load import build_config
from peftlab.errors import UserError
from peftlab.runs.rundir import RunDir, default_run_dir


def add_parser(sub):
    p = sub.add_parser("train", help="fine-tune, evaluate and save one run")
    add_config_arguments(p)
    p.add_argument("--output-dir", help="run directory (default runs/<timestamp>-<method>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last epoch checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def summary_table(m: dict) -> str:
    eff, params, test = m["efficiency"], m["params"], m["test"]
    base = (m.get("baseline") or {}).get("test")
    rows = [
        ("method / model", f"{m['method']} / {m['model']}"),
        ("dataset", m["dataset"]),
        ("trainable params", f"{params['trainable']:,} of {params['total']:,} ({params['trainable_pct']:.4f}%)"),
        ("validation acc / macro-F1", f"{m['validation']['accuracy']:.4f} / {m['validation']['macro_f1']:.4f} (best epoch {m['best_epoch']})"),
        ("test acc / macro-F1", f"{test['accuracy']:.4f} / {test['macro_f1']:.4f}"),
    ]
    if base:
        rows.append(("baseline test acc / macro-F1", f"{base['accuracy']:.4f} / {base['macro_f1']:.4f} (before fine-tuning)"))
    rows += [
        ("train time", f"{eff['train_seconds']:.1f}s  ({eff['train_samples_per_second']:.1f} samples/s, {eff['train_tokens_per_second']:,.0f} tokens/s)"),
        ("peak memory", f"{eff['peak_memory_bytes'] / 2**20:,.0f} MiB ({eff['peak_memory_kind']}, {eff['device']})"),
    ]
    q = m.get("quantization") or {}
    if q.get("requested"):
        rows.append(("quantization", f"requested {q['requested']}, used {q['used']}" + (f" ({q['reason']})" if q.get("reason") else "")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run(args) -> int:
    from peftlab.training.loop import train

    if args.resume:
        if args.config or args.overrides:
            raise UserError("--resume takes the run's saved config.yaml: drop CONFIG and --set")
        run_dir = RunDir(args.resume)
        run_dir.require_resumable()
        cfg = build_config(run_dir.config_tree(), str(run_dir.config_file))
    else:
        cfg = load_config(args.config, args.overrides)
        out = args.output_dir or cfg.output.dir or default_run_dir(cfg.method.name)
        cfg.output.dir = str(out)
        run_dir = RunDir(out).create()
    try:
        metrics = train(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    except BaseException as e:
        # a failed run must never look complete: record why, with status "failed"
        if run_dir.status() != "completed":
            run_dir.write_metrics({"status": "failed", "error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc(), "run_dir": str(run_dir.path)})
        raise
    print(summary_table(metrics))
    print(f"run directory: {run_dir.path}")
    return 0
