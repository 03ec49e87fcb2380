"""MLflow: params, metrics (buffered), the record's texts as tags, metrics.json and plots as artifacts;
a sweep is a parent run of its trials' runs."""
from __future__ import annotations

import atexit
import re
import time
from pathlib import Path

from peftlab.training.trackers import Tracker, as_text, register


@register
class MLflow(Tracker):
    name, module, extra = "mlflow", "mlflow", "mlflow"

    def __init__(self, cfg, run_dir: Path):
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
        if getattr(group, "mlflow_parent", None):  # a sweep's trial: under the sweep's run
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

    @classmethod
    def sweep_start(cls, sweep) -> None:
        """The sweep's parent run (found again when the sweep is resumed, or by another worker): every
        trial's run goes under it."""
        parent = sweep.guard(cls)
        parent.start(sweep.name, sweep.params, None, sweep.tags, reuse="peftlab.sweep")
        sweep.mlflow_parent = parent.backend.run_id if parent.backend is not None else None
        sweep.mlflow_run = parent
        atexit.register(parent.close, False)  # a sweep that dies: its parent run says failed

    @classmethod
    def sweep_finish(cls, sweep, figures: dict, texts: dict, files: list[Path], complete: bool) -> None:
        parent = sweep.mlflow_run
        parent.final(figures, texts, 0)
        parent.upload(files, sweep.dir)
        atexit.unregister(parent.close)
        if complete:  # else other workers still hold trials: the last one ends the parent
            parent.close(True)


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^\w\-./ :]", "_", key)  # the characters MLflow accepts in metric and tag names
