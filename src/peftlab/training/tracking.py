"""Experiment tracking: each run logged to TensorBoard, MLflow and/or Weights & Biases (`tracking.backends`).

One Trainer callback per backend (the backends: training/trackers/, one file each). What a run logs, under
these names in every backend:

    params                        the resolved config, flattened: data.name, method.r, train.learning_rate, ...
    train/loss, train/lr          at every loss reading (x axis: optimizer step)
    val/accuracy, val/macro_f1, val/loss, epoch     after each epoch's validation (multi-label runs: also
                                  val/micro_f1, val/samples_f1, val/hamming_loss; accuracy is subset accuracy)
    the final record's numbers    under their metrics.json paths: test.accuracy, validation.macro_f1 (the best
                                  epoch's), params.trainable, efficiency.train_seconds, best_epoch, ...; those a
                                  run has: test.micro_f1, test.per_class.LABEL.f1, test_at_threshold.thresholds.LABEL
    metrics.json and plots/       as artifacts (MLflow) / run files (W&B)

A sweep adds one tracked run of its own (SweepTracking): the MLflow parent of its trials' runs, the W&B group
they share, with each configuration's mean and std over seeds logged to it at the end.

A backend that is not installed is a UserError before anything trains. A backend that fails later warns once
and is dropped for the rest of the run: tracking never costs a run.
"""
from __future__ import annotations

import atexit
import importlib
import warnings
from pathlib import Path
from typing import Any

from peftlab.config import Config
from peftlab.errors import UserError
from peftlab.runs.record import RunRecord
from peftlab.runs.rundir import RunDir
from peftlab.training import trackers

SCORES = ("accuracy", "macro_f1", "loss")  # what on_epoch_end's scores hold besides details


class TrackingWarning(UserWarning):
    pass


def require(backends: list[str]) -> None:
    """All requested backends importable, or one UserError line saying what to install."""
    for name in backends:
        tracker = trackers.get(name)
        module, extra = tracker.module, tracker.extra
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - not installed, or installed broken: same advice
            raise UserError(f"tracking.backends: {name} cannot be imported ({type(e).__name__}: {e}); install it "
                            f"with pip install 'peftlab[{extra}]', or remove {name} from tracking.backends") from None


def config_params(cfg: Config) -> dict[str, Any]:
    """The resolved config as {section.key: value}; dict and list values are kept whole."""
    return {f"{s}.{k}": v for s, section in cfg.model_dump(mode="json").items() for k, v in section.items()}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def record_figures(record: RunRecord) -> tuple[dict[str, float], dict[str, str]]:
    """The record's numbers and words, each under its metrics.json path (lists such as the confusion matrix or
    a multi-label run's label_confusion stay in the metrics.json artifact; figures a run lacks, None, are left
    out)."""
    flat = _flatten(record.model_dump(mode="json", exclude={"config", "traceback"}))
    numbers = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return numbers, {k: v for k, v in flat.items() if isinstance(v, str)}


def run_files(run_dir: Path) -> list[Path]:
    """What a finished run uploads: metrics.json and its plots."""
    run = RunDir(run_dir)
    return [p for p in [run.metrics_file, *run.plot_files()] if p.is_file()]


class Guarded:
    """One backend behind a guard: the first exception warns in one line and drops the backend; a run
    never fails for its tracking."""

    def __init__(self, name: str, make, what: str):
        self.name, self.what, self.backend = name, what, None
        self.backend = self.call(make)

    def call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever a tracker raises, the run goes on
            self.backend = None
            message = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"tracking: {self.name} stopped logging {self.what} ({message}); the run goes on",
                          TrackingWarning, stacklevel=2)
            return None

    def __getattr__(self, method: str):
        """guarded.log(...) calls backend.log(...) if the backend is still live, else does nothing."""
        return lambda *args, **kwargs: self.call(getattr(self.backend, method), *args, **kwargs) \
            if self.backend is not None else None

    def close(self, ok: bool) -> None:
        if self.backend is not None:
            self.end(ok)
            self.backend = None


# --- a run ---------------------------------------------------------------------------------------
class RunTracker:
    """A Trainer callback logging one run to one backend."""

    def __init__(self, name: str, cfg: Config, run_dir: Path, group: "SweepTracking | None" = None):
        self.run_dir = Path(run_dir)
        # in a sweep, trials are told apart by their run directories; tracking.run_name names the sweep
        title = self.run_dir.name if group is not None else (cfg.tracking.run_name or self.run_dir.name)
        self.backend = Guarded(name, lambda: trackers.get(name)(cfg, self.run_dir), f"run '{title}'")
        self.backend.start(title, config_params(cfg), group, {"peftlab.run_dir": str(self.run_dir.resolve())})
        atexit.register(self.on_exit)

    def on_step(self, trainer, row: dict) -> None:
        self.backend.log({"train/loss": row["loss"], "train/lr": row["lr"]}, row["step"])

    def on_epoch_end(self, trainer, epoch: int, scores: dict) -> None:
        values = {"epoch": epoch, **{f"val/{k}": scores[k] for k in SCORES},
                  **{f"val/{k}": scores[k] for k in trainer.task.tracked_scores if scores.get(k) is not None}}
        self.backend.log(values, trainer.state.step)
        self.backend.flush()

    def on_finish(self, trainer, record: RunRecord) -> None:
        self.backend.final(*record_figures(record), trainer.state.step)
        self.backend.upload(run_files(self.run_dir), self.run_dir)
        self.backend.close(True)  # a pruned run is finished too: its tags say status "pruned"
        atexit.unregister(self.on_exit)

    def on_exit(self) -> None:
        """Still open when Python exits: the run failed or was interrupted; its record, if any, says why."""
        record = RunRecord.read_or_none(RunDir(self.run_dir).metrics_file)
        if record is not None:
            self.backend.final(*record_figures(record), 0)
        self.backend.close(False)


def callbacks_for(cfg: Config, run_dir: str | Path, group: "SweepTracking | None" = None) -> list[RunTracker]:
    """The tracking callbacks of one run (none without tracking.backends); a UserError, before anything
    trains, when a requested backend is not installed."""
    require(cfg.tracking.backends)
    return [RunTracker(name, cfg, Path(run_dir), group) for name in cfg.tracking.backends]


# --- a sweep -------------------------------------------------------------------------------------
class SweepTracking:
    """The sweep as a whole, in each backend its own way (Tracker.sweep_start / sweep_finish): the MLflow
    parent of every trial's run, the W&B group of its trials plus a summary run at the end; TensorBoard has
    none. Passed to each trial's trackers as their `group`."""

    def __init__(self, cfg: Config, sweep_dir: str | Path, study: str, storage: str):
        require(cfg.tracking.backends)
        self.cfg, self.dir, self.name = cfg, Path(sweep_dir), cfg.tracking.run_name or study
        self.tags = {"peftlab.sweep": f"{study} @ {storage}"}  # the Optuna study, which every worker shares
        self.params = config_params(cfg)
        for name in cfg.tracking.backends:
            trackers.get(name).sweep_start(self)

    def guard(self, tracker: type[trackers.Tracker]) -> Guarded:
        """A run of the sweep itself in `tracker`, behind the guard that drops it on its first error."""
        return Guarded(tracker.name, lambda: tracker(self.cfg, self.dir), f"sweep {self.name}")

    def finish(self, summary: dict) -> None:
        """Each configuration's mean and std over seeds (sweep.json's configurations) and sweep.json itself,
        on the parent; the parent ends once the sweep is complete (other workers may still be running)."""
        figures, texts = aggregates(summary), {"best": (summary.get("best") or {}).get("name") or ""}
        files = [p for p in [self.dir / "sweep.json"] if p.is_file()]
        for name in self.cfg.tracking.backends:
            trackers.get(name).sweep_finish(self, figures, texts, files, bool(summary.get("complete")))


def aggregates(summary: dict) -> dict[str, float]:
    """{CONFIGURATION/validation.macro_f1.mean: ..., .../test.accuracy.std: ..., .../completed: n} from sweep.json."""
    out = {}
    for c in summary.get("configurations", []):
        out[f"{c['name']}/completed"] = c["completed"]
        for part in ("validation", "test"):
            for metric, stat in c[part].items():
                out.update({f"{c['name']}/{part}.{metric}.{k}": stat[k] for k in ("mean", "std")
                            if stat.get(k) is not None})
        if c["train_seconds"]["mean"] is not None:
            out[f"{c['name']}/train_seconds.mean"] = c["train_seconds"]["mean"]
    return out
