"""TensorBoard: scalars, the config as text and the HParams tab; event files under tracking.log_dir/<run>,
else RUN_DIR/tensorboard. It has no runs of sweeps: `tensorboard --logdir SWEEP_DIR/trials` shows the trials
side by side."""
from __future__ import annotations

from pathlib import Path

import yaml

from peftlab.runs.rundir import RunDir
from peftlab.training.trackers import Tracker, as_text, register


@register
class TensorBoard(Tracker):
    name, module, extra = "tensorboard", "torch.utils.tensorboard", "tensorboard"

    def __init__(self, cfg, run_dir: Path):
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
