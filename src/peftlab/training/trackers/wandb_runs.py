"""Weights & Biases: config, metrics, the record as the run's summary, metrics.json and plots as run
files; a sweep's trials share a group, and the sweep adds a summary run."""
from __future__ import annotations

import shutil
from pathlib import Path

from peftlab.training.trackers import Tracker, register


@register
class WandB(Tracker):
    name, module, extra = "wandb", "wandb", "wandb"

    def __init__(self, cfg, run_dir: Path):
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

    @classmethod
    def sweep_finish(cls, sweep, figures: dict, texts: dict, files: list[Path], complete: bool) -> None:
        """A summary run in the sweep's group (its trials' runs share the group)."""
        run = sweep.guard(cls)
        run.start(f"{sweep.name}-summary", sweep.params, sweep, job_type="sweep")
        run.final(figures, texts, 0)
        run.upload(files, sweep.dir)
        run.close(True)
