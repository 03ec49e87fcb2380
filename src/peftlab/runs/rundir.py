"""The run directory: the on-disk record every other command reads.

    config.yaml       resolved config
    history.jsonl     step rows (loss, lr) and epoch rows (validation metrics)
    checkpoints/      last.pt (resume) and best.pt (best validation epoch), removed when the run completes
    adapter/ | model/ the trained adapter (PEFT format) or full model, with tokenizer
    predictions.csv   test rows with predicted label, confidence and class probabilities
    plots/            PNG charts
    metrics.json      the contract; written last and atomically, so its presence with
                      status "completed" means the run is complete
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml

from peftlab.errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- files -------------------------------------------------------------------------------
    config_file = property(lambda self: self.path / "config.yaml")
    history_file = property(lambda self: self.path / "history.jsonl")
    metrics_file = property(lambda self: self.path / "metrics.json")
    predictions_file = property(lambda self: self.path / "predictions.csv")
    checkpoints = property(lambda self: self.path / "checkpoints")
    plots = property(lambda self: self.path / "plots")

    def weights_dir(self, saves_adapter: bool) -> Path:
        return self.path / ("adapter" if saves_adapter else "model")

    # --- lifecycle ---------------------------------------------------------------------------
    def create(self) -> "RunDir":
        if self.metrics_file.exists() or self.history_file.exists():
            raise UserError(f"output directory {str(self.path)!r} already holds a run: choose another --output-dir, "
                            f"or continue it with --resume {self.path}")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output directory {str(self.path)!r} cannot be written ({e.strerror}): "
                            f"choose a writable --output-dir") from None
        return self

    def require_resumable(self) -> None:
        if not self.config_file.exists():
            raise UserError(f"--resume {str(self.path)!r}: no config.yaml there, so it is not a peftlab run directory")
        if self.status() == "completed":
            raise UserError(f"--resume {str(self.path)!r}: this run already completed; nothing to resume")

    def status(self) -> str | None:
        if not self.metrics_file.exists():
            return None
        try:
            return json.loads(self.metrics_file.read_text()).get("status")
        except (OSError, ValueError):
            return None

    # --- records -----------------------------------------------------------------------------
    def append_history(self, row: dict) -> None:
        with open(self.history_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_history(self, upto_step: int) -> None:
        """On resume, drop rows written after the checkpoint we go back to."""
        kept = [r for r in self.history() if r["step"] <= upto_step]
        atomic_write_text(self.history_file, "".join(json.dumps(r) + "\n" for r in kept))

    def history(self) -> list[dict]:
        """Rows of history.jsonl; a line torn by a kill mid-write is skipped."""
        if not self.history_file.exists():
            return []
        rows = []
        for line in self.history_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_text(self.metrics_file, json.dumps(metrics, indent=2) + "\n")

    def metrics(self) -> dict:
        return json.loads(self.metrics_file.read_text())

    def config_tree(self) -> dict:
        return yaml.safe_load(self.config_file.read_text())

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, name: str, state: dict) -> None:
        self.checkpoints.mkdir(exist_ok=True)
        path = self.checkpoints / f"{name}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, name: str) -> dict | None:
        path = self.checkpoints / f"{name}.pt"
        return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
