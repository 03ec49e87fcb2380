"""Reload a finished run's model for inference: predict, serve, export, distillation teachers and the
Python API come through here. A damaged run directory is named in one line, never a traceback."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.config import Config
from peftlab.errors import UserError
from peftlab.evaluation.predict import Predictor
from peftlab.models.heads import install_saved, local_config
from peftlab.models.loading import is_random, load_classifier, quiet_transformers
from peftlab.models.speed import linear_weights_to
from peftlab.runs.record import RunRecord
from peftlab.runs.rundir import RunDir
from peftlab.runtime import Runtime


@dataclass
class Trained:
    model: torch.nn.Module
    tokenizer: object
    label_names: list[str]
    config: Config
    run: RunDir
    record: RunRecord

    def predictor(self, runtime: Runtime | None = None, batch_size: int = 64) -> Predictor:
        """With the run's calibration temperature and tuned decision threshold, when it has them. A 16-bit
        runtime stores the linear weights in its dtype (the same outputs under autocast, no re-cast per
        batch): the model is then this predictor's alone."""
        if runtime is not None:
            linear_weights_to(self.model, runtime.dtype)
        return Predictor(self.model, self.tokenizer, self.label_names, self.config.data.max_length,
                         runtime, batch_size, self.config.data.cache_dir,
                         temperature=self.record.temperature, threshold=self.record.threshold,
                         task=self.record.kind)


def completed_run(run_dir: str | Path, what: str = "run") -> tuple[RunDir, RunRecord, Config]:
    """The run's directory, record and config, checked: complete, with its weights on disk."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{what} directory {str(run.path)!r} not found: pass a directory written by peftlab train")
    if not run.metrics_file.exists():
        raise UserError(f"{what} {str(run.path)!r} is not complete (no metrics.json): finish it with "
                        f"peftlab train --resume {run.path}, or pick a completed run")
    record = run.record()
    if not record.completed:
        raise UserError(f"{what} {str(run.path)!r} did not complete (status {record.status}"
                        f"{': ' + record.error.splitlines()[0] if record.error else ''}): pick a completed run")
    cfg = run.config()
    if cfg.data.max_length is None:  # unset in config.yaml: the number the run resolved and read (metrics.json)
        cfg.data.max_length = (record.max_length or {}).get("tokens")
    weights = run.saved_weights()
    files = list(weights.glob("*.safetensors")) + list(weights.glob("*.bin")) if weights else []
    if not files:
        raise UserError(f"{what} {str(run.path)!r}: its trained weights (adapter/ or model/) are missing; "
                        f"retrain the run")
    return run, record, cfg


def load_trained(run_dir: str | Path, device: torch.device, merge: bool = True, what: str = "run",
                 adapter_name: str = "default") -> Trained:
    """The run's model with its trained adapter (merged into the weights when `merge`: exact, and one
    matmul per layer instead of two at inference)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, record, cfg = completed_run(run_dir, what)
    weights = run.saved_weights()
    quiet_transformers()  # its load reports (a pooled folder's model type, a new head) are not the user's business
    try:
        tokenizer = AutoTokenizer.from_pretrained(weights, trust_remote_code=False)  # with the pad token the run used (a decoder's head needs it)
        if weights.name == "model":
            # a pooled head's folder names its own code (auto_map): peftlab reads it with its own classes
            model = install_saved(AutoModelForSequenceClassification.from_pretrained(
                weights, config=local_config(weights), trust_remote_code=cfg.model.trust_remote_code))
        else:
            if is_random(cfg.model.name):
                raise UserError(f"{what} {str(run.path)!r} used random weights ({cfg.model.name}): it is for speed "
                                f"measurements only and cannot be reloaded for predictions")
            model = PeftModel.from_pretrained(load_classifier(cfg.model.name, record.label_names, task=record.kind,
                                                              head=record.head, pad_token_id=tokenizer.pad_token_id,
                                                              trust_remote_code=cfg.model.trust_remote_code),
                                              weights, adapter_name=adapter_name)
            if merge:
                model = model.merge_and_unload()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated safetensors, bad JSON, ... come in many types
        raise UserError(f"{what} {str(run.path)!r}: its weights in {weights} cannot be loaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); retrain the run") from None
    return Trained(model.to(device).eval(), tokenizer, record.label_names, cfg, run, record)


def load_predictor(run_dir: str | Path, device: torch.device | None = None, batch_size: int = 64,
                   what: str = "run", precision: str = "auto") -> Predictor:
    """A Predictor for the run on `device` (default: the GPU when there is one), in `precision` (auto: bf16
    where the device multiplies bf16 in hardware, else fp32: runtime.auto_precision)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runtime = Runtime.pick(device, precision)
    return load_trained(run_dir, device, what=what).predictor(runtime, batch_size)
