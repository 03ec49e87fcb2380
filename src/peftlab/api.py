"""The Python API: what the commands do, as calls that return objects (for notebooks and scripts).

    import peftlab
    cfg = peftlab.load_config("configs/demo.yaml", overrides=["method.r=8", "train.epochs=1"])
    run = peftlab.train(cfg, output_dir="runs/x")     # a peftlab.Run
    run.metrics.test.macro_f1                        # the typed record (metrics.json)
    run.history()                                    # history.jsonl as a pandas DataFrame
    run.predict(["Shares fell 5%"])                  # [{label, confidence, probabilities}]
    run = peftlab.load_run("runs/x")
    peftlab.sweep("configs/study-methods-offline.yaml", output_dir="sweeps/m")
    peftlab.report(["sweeps/m"], output="report.html")

Bad input raises peftlab.UserError, whose message is the one line the CLI prints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from peftlab.config import Config, load_config as _load_config
from peftlab.config.load import build_config
from peftlab.errors import UserError
from peftlab.runs.record import RunRecord
from peftlab.runs.rundir import RunDir, default_run_dir

ConfigLike = Config | dict | str | Path | None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """A validated Config from a YAML file (optional) and `section.key=value` overrides."""
    return _load_config(path, list(overrides))


def _as_config(config: ConfigLike, overrides: Iterable[str] = ()) -> Config:
    if isinstance(config, Config):
        return _with_overrides(config, overrides)
    if isinstance(config, dict):
        return _with_overrides(build_config(config, "config dict"), overrides)
    return load_config(config, overrides)


def _with_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    overrides = list(overrides)
    if not overrides:
        return cfg.model_copy(deep=True)
    from peftlab.config.load import parse_override, set_in

    tree = cfg.model_dump(mode="json")
    for text in overrides:
        set_in(tree, *parse_override(text))
    return build_config(tree, "config with overrides")


class Run:
    """A run directory: its record, history, plots, and a predictor loaded on first use."""

    def __init__(self, path: str | Path):
        self.dir = RunDir(path)
        self._metrics: RunRecord | None = None
        self._predictor = None

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def metrics(self) -> RunRecord:
        if self._metrics is None:
            self._metrics = self.dir.record()
        return self._metrics

    @property
    def config(self) -> Config:
        return self.dir.config()

    @property
    def status(self) -> str:
        return self.metrics.status

    def history(self):
        """history.jsonl as a DataFrame: one row per loss reading (kind "step") and per epoch ("epoch",
        with the validation scores flattened into validation_accuracy, validation_macro_f1, ...)."""
        import pandas as pd

        return pd.json_normalize(self.dir.history(), sep="_")

    @property
    def plots(self) -> list[Path]:
        return sorted(self.dir.plots.glob("*.png"))

    def predictor(self, batch_size: int = 64):
        if self._predictor is None:
            from peftlab.runs.trained import load_predictor

            self._predictor = load_predictor(self.path, batch_size=batch_size)
        return self._predictor

    def predict(self, texts: str | Iterable[str]) -> list[dict[str, Any]]:
        """One {label, confidence, probabilities} per text, through the same path as `peftlab predict`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.predictor().predict(texts)

    def _repr_html_(self) -> str:  # a notebook shows the headline figures
        m = self.metrics
        if not m.completed:
            return f"<b>peftlab run</b> {self.path}: {m.status} {m.error or m.reason or ''}"
        return (f"<b>peftlab run</b> {self.path}: {m.method} on {m.model}, {m.dataset}; test accuracy "
                f"{m.test.accuracy:.4f}, macro-F1 {m.test.macro_f1:.4f}; {m.params.trainable:,} trainable "
                f"parameters; {m.efficiency.train_seconds:.1f} s")

    def __repr__(self) -> str:
        return f"peftlab.Run({str(self.path)!r})"


def train(config: ConfigLike = None, output_dir: str | Path | None = None, overrides: Iterable[str] = (),
          resume: bool = False, progress: bool = True, callbacks: list = ()) -> Run:
    """Train, evaluate and record one run; `config` is a Config, a dict of sections, a YAML path or
    None (the defaults). `resume=True` continues the interrupted run in `output_dir`."""
    from peftlab.training.distributed import start_run
    from peftlab.training.trainer import train as _train

    if resume:
        if output_dir is None:
            raise UserError("resume=True needs output_dir: the run directory to continue")
        run_dir, cfg = RunDir(output_dir), None
    else:
        cfg = _as_config(config, overrides)
        run_dir = RunDir(output_dir or cfg.output.dir or default_run_dir(cfg.method.name))
    cfg, resume = start_run(run_dir, cfg, resume)  # under torchrun: rank 0 opens it, the others wait
    _train(cfg, run_dir, resume=resume, progress=progress, callbacks=callbacks)
    return Run(run_dir.path)


def load_run(path: str | Path) -> Run:
    """An existing run directory (completed or not: `run.status` says)."""
    run = Run(path)
    if not run.dir.metrics_file.exists() and not run.dir.config_file.exists():
        raise UserError(f"{str(path)!r}: not a peftlab run directory (no metrics.json or config.yaml)")
    return run


def sweep(config: ConfigLike, output_dir: str | Path | None = None, overrides: Iterable[str] = (),
          storage: str | None = None, progress: bool = True, **options) -> dict:
    """Run (or finish) a sweep; returns sweep.json's content. `options` are sweep.runner.Options fields."""
    from peftlab.sweeps.runner import Options, run_sweep

    cfg = _as_config(config, overrides)
    config_path = Path(config) if isinstance(config, (str, Path)) else None
    stem = config_path.stem if config_path else "sweep"
    out = Path(output_dir or cfg.output.dir or Path("sweeps") / stem)
    return run_sweep(cfg, Options(out_dir=out, storage=storage, progress=progress, config_path=config_path, **options))


def report(paths: str | Path | Iterable[str | Path], output: str | Path = "report.html") -> Path:
    """One self-contained HTML report (and a .md beside it) comparing every run under `paths`."""
    from peftlab.reports import build_report

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    html_path, _ = build_report([Path(p) for p in paths], Path(output))
    return html_path
