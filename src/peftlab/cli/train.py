"""peftlab train [CONFIG] [--set k=v ...] [--output-dir DIR] | --resume RUN_DIR"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from peftlab.cli import add_config_arguments, exit_code, interrupted
from peftlab.cli._checks import positive_int
from peftlab.config import load_config
from peftlab.errors import UserError

if TYPE_CHECKING:  # the run directory brings torch and transformers: imported when a command runs
    from peftlab.runs.record import RunRecord


# out of memory: what to lower (cli/__init__.py prints it in one line)
MEMORY_HINT = "lower train.batch_size or data.max_length (--set), or eval.batch_size"


def add_parser(sub):
    p = sub.add_parser("train", help="fine-tune, evaluate and save one run")
    add_config_arguments(p)
    p.add_argument("--output-dir", help="run directory (default runs/<timestamp>-<method>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last epoch checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="train in N local processes (DDP through torchrun; gloo on CPU, NCCL on GPUs); "
                        "the global batch stays train.batch_size (default 1)")
    return p


def summary_table(m: RunRecord) -> str:
    eff, params, test = m.efficiency, m.params, m.test
    rows = [
        ("method / model", f"{m.method} / {m.model}"),
        ("dataset", m.dataset),
        ("trainable params", f"{params.trainable:,} of {params.total:,} ({params.trainable_pct:.4f}%)"),
        ("validation acc / macro-F1", f"{m.validation.accuracy:.4f} / {m.validation.macro_f1:.4f} (best epoch {m.best_epoch})"),
        ("test acc / macro-F1", f"{test.accuracy:.4f} / {test.macro_f1:.4f}"),
    ]
    rows += m.kind.summary_rows(test)  # the task's own figures (multi-label: micro-F1, ...)
    at = m.test_at_threshold
    if at is not None:
        rule = f"threshold {at.threshold:.4f}" if at.threshold is not None else f"{len(at.thresholds)} label thresholds"
        figures = f"micro-F1 {at.micro_f1:.4f}" if at.micro_f1 is not None else f"acc {at.accuracy:.4f}"
        rows.append((f"test at {'tuned' if at.tuned_for != 'fixed' else 'fixed'} threshold",
                     f"macro-F1 {at.macro_f1:.4f}, {figures} ({rule})"))
    if m.baseline:
        base = m.baseline.test
        rows.append(("baseline test acc / macro-F1", f"{base.accuracy:.4f} / {base.macro_f1:.4f} (before fine-tuning)"))
    rows += [
        ("train time", f"{eff.train_seconds:.1f}s  ({eff.train_samples_per_second:.1f} samples/s, {eff.train_tokens_per_second:,.0f} tokens/s)"),
        ("peak memory", f"{eff.peak_memory_bytes / 2**20:,.0f} MiB ({eff.peak_memory_kind}, {eff.device})"),
    ]
    q = m.quantization
    if q and q.requested:
        rows.append(("quantization", f"requested {q.requested}, used {q.used}" + (f" ({q.reason})" if q.reason else "")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _launch(args, out: str | None) -> int:
    """Start this same command in --nproc processes (the output directory decided once, here)."""
    import subprocess

    from peftlab.training.distributed import launch_command

    argv = ["train"] + ([args.config] if args.config else []) + sum((["--set", o] for o in args.overrides), [])
    argv += (["--resume", args.resume] if args.resume else ["--output-dir", out]) + (["--no-progress"] if args.no_progress else [])
    with subprocess.Popen(launch_command(args.nproc, argv)) as launcher:
        try:
            return launcher.wait()
        except KeyboardInterrupt:  # the ranks record the interruption; torchrun passes SIGTERM on to them
            launcher.terminate()
            launcher.wait()
            raise


def run(args) -> int:
    from peftlab.runs.rundir import RunDir, default_run_dir

    from peftlab.training.distributed import launched, setup, start_run
    from peftlab.training.trainer import train

    if args.resume and (args.config or args.overrides):
        raise UserError("--resume takes the run's saved config.yaml: drop CONFIG and --set")
    cfg = None if args.resume else load_config(args.config, args.overrides)
    out = args.resume or str(args.output_dir or cfg.output.dir or default_run_dir(cfg.method.name))
    if args.nproc > 1 and not launched():
        return _launch(args, out)
    run_dir = RunDir(out)
    cfg, resume = start_run(run_dir, cfg, bool(args.resume))
    try:
        record = train(cfg, run_dir, resume=resume, progress=not args.no_progress)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (errors.Terminated)
        done = "its epoch checkpoints are" if (run_dir.checkpoints / "last.pt").exists() else "no epoch has finished, so nothing is"
        print(f"peftlab train: {interrupted(e)}; {done} in {run_dir.path}: continue with "
              f"peftlab train --resume {run_dir.path}", file=sys.stderr)
        return exit_code(e)
    if not setup().main:
        return 0  # rank 0 reports
    print(summary_table(record))
    print(f"run directory: {run_dir.path}")
    return 0
