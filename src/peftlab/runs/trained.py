"""Reload a finished run's model for inference: predict, serve, and distillation teachers use this."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.config import Config
from peftlab.config.load import build_config
from peftlab.errors import UserError
from peftlab.models.loading import is_random, load_classifier
from peftlab.runs.rundir import RunDir


@dataclass
class Trained:
    model: torch.nn.Module
    tokenizer: object
    label_names: list[str]
    config: Config
    run: RunDir


def load_trained(run_dir: str | Path, device: torch.device, merge: bool = True) -> Trained:
    """The run's model with its trained adapter (merged into the weights when that is exact and faster)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"run directory {str(run.path)!r} not found: pass a directory written by peftlab train")
    if run.status() != "completed":
        raise UserError(f"run {str(run.path)!r} is not complete (no completed metrics.json): finish it with "
                        f"peftlab train --resume {run.path}, or pick a completed run")
    metrics = run.metrics()
    cfg = build_config(run.config_tree(), str(run.config_file))
    labels = metrics["label_names"]
    if (run.path / "model").is_dir():
        weights = run.path / "model"
        model = AutoModelForSequenceClassification.from_pretrained(weights)
    else:
        weights = run.path / "adapter"
        if is_random(cfg.model.name):
            raise UserError(f"run {str(run.path)!r} used random weights ({cfg.model.name}): it is for speed "
                            f"measurements only and cannot be reloaded for predictions")
        model = PeftModel.from_pretrained(load_classifier(cfg.model.name, labels), weights)
        if merge:
            model = model.merge_and_unload()  # one matmul per layer instead of two at inference
    tokenizer = AutoTokenizer.from_pretrained(weights)
    return Trained(model.to(device).eval(), tokenizer, labels, cfg, run)
