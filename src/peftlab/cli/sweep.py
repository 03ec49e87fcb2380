"""peftlab sweep CONFIG [--set k=v ...] [--output-dir DIR] [--storage URL] [--study-name NAME] [--n-trials N]"""
from __future__ import annotations

from pathlib import Path

from peftlab.cli import add_config_arguments
from peftlab.cli._checks import output_dir, positive_float, positive_int
from peftlab.config import load_config
from peftlab.errors import UserError


def add_parser(sub):
    p = sub.add_parser("sweep", help="run a grid or a search of configurations (x seeds) as one study",
                       description="Run every configuration of sweep.grid (or sweep.n_trials samples of sweep.space) "
                                   "x sweep.seeds as ordinary run directories under DIR/trials, recorded in an Optuna "
                                   "study. Start the same command again to finish a killed sweep; start it in several "
                                   "processes (same --storage and --study-name) to split the work.")
    add_config_arguments(p)
    p.add_argument("--output-dir", help="sweep directory (default: output.dir, else sweeps/<config name>)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL shared by the workers, e.g. "
                   "postgresql://user@host/db (default: sqlite:///DIR/study.db)")
    p.add_argument("--study-name", help="study name within the storage (default: the sweep directory's name)")
    p.add_argument("--n-trials", type=positive_int, metavar="N", help="run at most N trials in this process (the study's own "
                   "size is sweep.grid x seeds, or sweep.n_trials)")
    p.add_argument("--retry-failed", action="store_true", help="run again the trials that failed with an error "
                   "(interrupted trials are always run again)")
    p.add_argument("--stale-after", type=positive_float, default=120.0, metavar="SECONDS",
                   help="a trial of a worker on another machine counts as dead after this long without a heartbeat "
                        "(a dead process on this machine is noticed at once); default 120")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args) -> int:
    from peftlab.sweeps.runner import Options, run_sweep

    if not args.config and not args.overrides:
        raise UserError("sweep: give a config file with a sweep: block (examples: configs/study-*.yaml)")
    cfg = load_config(args.config, args.overrides)
    stem = Path(args.config).stem if args.config else "sweep"
    out = output_dir(args.output_dir or cfg.output.dir or Path("sweeps") / stem, "--output-dir")
    opts = Options(out_dir=out, storage=args.storage, study_name=args.study_name, max_trials=args.n_trials,
                   progress=not args.no_progress, retry_failed=args.retry_failed, stale_after=args.stale_after,
                   config_path=Path(args.config) if args.config else None)
    summary = run_sweep(cfg, opts)
    # some runs failed (listed above): the rest finished; exit 1 so scripts notice
    return 1 if summary["counts"].get("failed") or summary["counts"].get("blocked") else 0
