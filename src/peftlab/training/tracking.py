"""Experiment tracking: each run logged to TensorBoard, MLflow and/or Weights & Biases (`tracking.backends`).

One Trainer callback per backend. What a run logs, under these names in every backend:

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
import json
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from peftlab.config import Config
from peftlab.errors import UserError
from peftlab.runs.record import RunRecord
from peftlab.runs.rundir import RunDir

# backend -> (module it needs, the extra that installs it)
BACKENDS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}
SCORES = ("accuracy", "macro_f1", "loss")  # what on_epoch_end's scores hold besides details


class TrackingWarning(UserWarning):
    pass


def require(backends: list[str]) -> None:
    """All requested backends importable, or one UserError line saying what to install."""
    for name in backends:
        module, extra = BACKENDS[name]
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - not installed, or installed broken: same advice
            raise UserError(f"tracking.backends: {name} cannot be imported ({type(e).__name__}: {e}); install it "
                            f"with pip install 'peftlab[{extra}]', or remove {name} from tracking.backends") from None


def config_params(cfg: Config) -> dict[str, Any]:
    """The resolved config as {section.key: value}; dict and list values are kept whole."""
    return {f"{s}.{k}": v for s, section in cfg.model_dump(mode="json").items() for k, v in section.items()}


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


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


# --- backends: start, log, flush, final, upload, end ------------------------------------------
class TensorBoard:
    def __init__(self, cfg: Config, run_dir: Path):
        self.log_dir = Path(cfg.tracking.log_dir) if cfg.tracking.log_dir else None
        self.run_dir = run_dir

    def start(self, name: str, params: dict, group=None, tags: dict | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir / name if self.log_dir else RunDir(self.run_dir).tensorboard_dir))
        self.params = params
        # four leading spaces: TensorBoard renders the text as Markdown, and this keeps it a code block
        self.writer.add_text("config", "\n".join("    " + line for line in yaml.safe_dump(params).splitlines()))

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()  # else TensorBoard sees new points only every 2 minutes

    def final(self, numbers: dict, texts: dict, step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.log(numbers, step)
        self.writer.add_text("record", "\n".join(f"    {k}: {v}" for k, v in texts.items()))
        # the HParams tab: config against the test figures (scalars logged just above)
        scalar = (str, int, float, bool)
        hp = {k: v if isinstance(v, scalar) else as_text(v) for k, v in self.params.items()}
        for summary in hparams(hp, {k: v for k, v in numbers.items() if k.startswith("test.")}):
            self.writer.file_writer.add_summary(summary)

    def upload(self, files: list[Path], base: Path) -> None:
        pass  # TensorBoard keeps scalars and text, not files

    def end(self, ok: bool) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, cfg: Config, run_dir: Path):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(cfg.tracking.mlflow_uri)  # None: MLflow's own default
        self.project = cfg.tracking.project
        self.pending, self.flushed = [], time.monotonic()

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.project)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.project)
        except MlflowException:  # another process (a sweep worker) created it a moment ago
            return self.client.get_experiment_by_name(self.project).experiment_id

    def start(self, name: str, params: dict, group=None, tags: dict | None = None, reuse: str | None = None) -> None:
        """A new run; with `reuse` (a tag key), the run already holding that tag, if any (a resumed sweep)."""
        from mlflow.entities import Param

        exp, tags = self._experiment(), dict(tags or {})
        if group is not None and group.mlflow_parent:
            tags["mlflow.parentRunId"] = group.mlflow_parent
        found = self.client.search_runs([exp], f"tags.`{reuse}` = '{tags[reuse]}'", max_results=1) if reuse else []
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp, run_name=name, tags=tags).info.run_id
        items = [Param(k, as_text(v)[:6000]) for k, v in params.items()]  # MLflow's longest param value
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, values: dict, step: int) -> None:
        """Buffered: one write to the store costs ~30 ms (SQLite, here), so loss readings go out at most
        every 5 s, and at each epoch's end."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
        if time.monotonic() - self.flushed > 5 or len(self.pending) > 900:  # MLflow: 1,000 metrics a batch
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending, self.flushed = [], time.monotonic()

    def final(self, numbers: dict, texts: dict, step: int) -> None:
        from mlflow.entities import RunTag

        self.log(numbers, step)
        self.flush()
        self.client.log_batch(self.run_id, tags=[RunTag(_mlflow_key(k), v[:8000]) for k, v in texts.items()])

    def upload(self, files: list[Path], base: Path) -> None:
        for f in files:
            folder = f.parent.relative_to(base).as_posix()
            self.client.log_artifact(self.run_id, str(f), None if folder == "." else folder)

    def end(self, ok: bool) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^\w\-./ :]", "_", key)  # the characters MLflow accepts in metric and tag names


class WandB:
    def __init__(self, cfg: Config, run_dir: Path):
        self.project, self.dir = cfg.tracking.project, run_dir

    def start(self, name: str, params: dict, group=None, tags: dict | None = None, job_type: str = "train") -> None:
        import wandb

        # reinit="create_new": a sweep runs several trials in one process, each its own W&B run
        self.run = wandb.init(project=self.project, name=name, group=group.name if group else None,
                              job_type=job_type, config=params, dir=str(self.dir), reinit="create_new")

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass  # W&B writes in the background already

    def final(self, numbers: dict, texts: dict, step: int) -> None:
        self.run.summary.update({**numbers, **texts})

    def upload(self, files: list[Path], base: Path) -> None:
        for f in files:
            # copied into the W&B run's own folder rather than linked (wandb.save's way), so an offline run
            # moved to another machine to be synced keeps them
            copy = Path(self.run.dir) / f.relative_to(base)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, copy)
            self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def end(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


CLASSES = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


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
        self.backend = Guarded(name, lambda: CLASSES[name](cfg, self.run_dir), f"run '{title}'")
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
    """The sweep as one tracked run: the MLflow parent of every trial's run (found again when the sweep is
    resumed, or by another worker), the W&B group of its trials plus a summary run at the end. TensorBoard
    has no parents: `tensorboard --logdir SWEEP_DIR/trials` shows the trials side by side."""

    def __init__(self, cfg: Config, sweep_dir: str | Path, study: str, storage: str):
        require(cfg.tracking.backends)
        self.cfg, self.dir, self.name = cfg, Path(sweep_dir), cfg.tracking.run_name or study
        self.tags = {"peftlab.sweep": f"{study} @ {storage}"}  # the Optuna study, which every worker shares
        self.mlflow_parent, self.parent = None, None
        if "mlflow" in cfg.tracking.backends:
            self.parent = Guarded("mlflow", lambda: MLflow(cfg, self.dir), f"sweep {self.name}")
            self.parent.start(self.name, config_params(cfg), None, self.tags, reuse="peftlab.sweep")
            self.mlflow_parent = self.parent.backend.run_id if self.parent.backend is not None else None
            atexit.register(self.parent.close, False)  # a sweep that dies: its parent run says failed

    def finish(self, summary: dict) -> None:
        """Each configuration's mean and std over seeds (sweep.json's configurations) and sweep.json itself,
        on the parent; the parent ends once the sweep is complete (other workers may still be running)."""
        figures, texts = aggregates(summary), {"best": (summary.get("best") or {}).get("name") or ""}
        files = [p for p in [self.dir / "sweep.json"] if p.is_file()]
        if self.parent is not None:
            self.parent.final(figures, texts, 0)
            self.parent.upload(files, self.dir)
            atexit.unregister(self.parent.close)
            if summary.get("complete"):  # else other workers still hold trials: the last one ends the parent
                self.parent.close(True)
        if "wandb" in self.cfg.tracking.backends:
            run = Guarded("wandb", lambda: WandB(self.cfg, self.dir), f"sweep {self.name}")
            run.start(f"{self.name}-summary", config_params(self.cfg), self, job_type="sweep")
            run.final(figures, texts, 0)
            run.upload(files, self.dir)
            run.close(True)


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
