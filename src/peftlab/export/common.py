"""What both export formats share: the run's model as a plain transformers model carrying the run's
decision rule, a staged output directory, and the check against the run's own test predictions
(predictions.csv)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from peftlab.errors import UserError
from peftlab.files import clean_stale, temp_name, translated
from peftlab.runs.record import RunRecord
from peftlab.runs.rundir import RunDir
from peftlab.tasks import SINGLE_LABEL, Task

# config.json fields that would make a loader expect quantized weights or a peft wrapper
_STALE_CONFIG_FIELDS = ("quantization_config", "_pre_quantization_dtype")


@dataclass
class Source:
    """A trained run ready to export: a plain (peft-free) fp32 model with the run's labels."""
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    label_names: list[str]
    max_length: int
    metrics: RunRecord
    cache_dir: str | None = None  # the run's tokenization cache
    separator: str = "|"  # multi-label: joins a label set in predictions.csv (data.label_separator)
    notes: list[str] = field(default_factory=list)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def task(self):
        return self.metrics.kind

    def decide(self, logits: np.ndarray) -> np.ndarray:
        """The run's decisions, as `peftlab predict` makes them: temperature, then threshold(s)."""
        return self.task.decide(self.task.probabilities(logits, self.metrics.temperature), self.metrics.threshold)

    def info(self) -> dict:
        at = self.metrics.test_at_threshold  # the run's test accuracy under its own decision rule
        rule = decision_rule(self.metrics)
        return {"run_dir": str(self.run_dir.resolve()), "method": self.metrics.method,
                "model": self.metrics.model, "label_names": self.label_names, "max_length": self.max_length,
                "multi_label": rule["multi_label"], "decision_rule": rule,
                "run_test_accuracy": (at or self.metrics.test).accuracy, "notes": self.notes}


def decision_rule(record: RunRecord) -> dict:
    """How the run turns logits into answers, written into the exported config.json (`decision_rule`) and
    export_info.json: pipeline() applies the softmax (sigmoid per label) but knows no temperature or
    threshold, so a caller who wants the run's own answers applies these."""
    return record.kind.rule(record.label_names, record.threshold, record.temperature)


def check_output(output: str | Path) -> Path:
    """Refuse before any work is done: an existing non-empty --output is never overwritten."""
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {str(out)!r} already exists and is not an empty directory: choose a new one, or remove it first")
    return out


@contextlib.contextmanager
def staged(out: Path):
    """Yield a fresh directory beside `out`, renamed to `out` only when the block succeeds: a failed
    or killed export leaves no folder that looks complete (at most a hidden .tmp one)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out.parent, out.name)  # what an export killed earlier left (its process is gone)
        tmp = temp_name(out)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"--output {str(out)!r} cannot be created ({e.strerror}): choose a writable location") from None
    try:
        with translated(out):  # file too large, no space...: one line naming the export
            yield tmp
            check_output(out)  # another process may have filled it meanwhile
            os.replace(tmp, out)  # an empty existing directory is replaced atomically too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_source(run_dir: str | Path) -> Source:
    """The run's model with its adapter merged in, as a plain transformers model. The one call into
    peftlab.runs is load_trained; the rest reads the run directory's documented files."""
    from peftlab.models.loading import quiet_transformers
    from peftlab.runs.trained import load_trained

    from peftlab.runs.trained import completed_run

    run_dir = Path(run_dir)
    _, metrics, _ = completed_run(run_dir)  # one line for a missing, incomplete or damaged run
    if str(metrics.model).startswith("random:") and RunDir(run_dir).adapter_dir.is_dir():
        raise UserError(f"run {str(run_dir)!r} trained an adapter on random weights ({metrics.model}) that were "
                        f"never saved, so there is no base to merge it into: export a run of a real model "
                        f"(a local folder, hub id or minilm-l6), or a full fine-tuning run")
    quiet_transformers()
    trained = load_trained(run_dir, torch.device("cpu"), merge=True)
    model = trained.model
    if hasattr(model, "peft_config") or any(hasattr(m, "base_layer") for m in model.modules()):
        raise RuntimeError(f"run {run_dir}: the adapter was not merged into the base model ({type(model).__name__})")
    notes = []
    if metrics.quantization and metrics.quantization.requested:  # a method that asked for a quantized base
        used = metrics.quantization.used or "none"
        notes.append(f"{metrics.method} run: its adapter is merged into the fp32 base model" + (
            " (the run trained on the unquantized model, so the merge is exact)" if used == "none" else
            f" (the run trained over a {used} base, so probabilities can differ slightly from the run's: see the check)"))
    data = trained.config.data
    model = plain_model(model, trained.label_names, metrics.kind)
    model.config.decision_rule = decision_rule(metrics)  # saved in config.json; transformers ignores it
    return Source(run_dir, model, trained.tokenizer, trained.label_names, data.max_length, metrics,
                  data.cache_dir, data.label_separator, notes)


def plain_model(model: torch.nn.Module, label_names: list[str], task: Task = SINGLE_LABEL) -> torch.nn.Module:
    """fp32, eval, labels from the run (not whatever the base checkpoint carried: peft #1486), the run's
    problem type, and no leftover quantization fields in its config."""
    model = model.float().eval()
    config = model.config
    config.dtype = torch.float32
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    # so pipeline() applies what the run did: a softmax, or a sigmoid per label
    config.problem_type = task.problem_type
    config.architectures = [type(model).__name__]
    for name in _STALE_CONFIG_FIELDS:
        if hasattr(config, name):
            delattr(config, name)
    return model


def save_tokenizer(source: Source, directory: Path) -> None:
    # truncation=True then cuts where the run did (pipeline(..., truncation=True) included)
    source.tokenizer.model_max_length = source.max_length
    source.tokenizer.save_pretrained(directory)


@dataclass
class TestSet:
    texts: list[str]
    labels: np.ndarray     # the true label as written in predictions.csv (multi-label: the set, joined)
    predicted: np.ndarray  # the run's decision, written the same way
    probs: np.ndarray      # the run's probabilities (the model's own, no temperature), in label order


def test_set(source: Source) -> TestSet | None:
    """The run's test rows from predictions.csv, or None (with a note) when it has none."""
    import pandas as pd

    path = RunDir(source.run_dir).predictions_file
    columns = [f"prob_{n}" for n in source.label_names]
    try:  # labels as text, and an empty multi-label set as "" (not NaN)
        frame = pd.read_csv(path, dtype={"text": str, "label": str, "predicted": str}, keep_default_na=False)
    except (OSError, ValueError):
        frame = None
    if frame is None or not {"text", "label", "predicted", *columns} <= set(frame.columns):
        source.notes.append(f"no readable {path.name} with prob_* columns: the export was not checked against the run")
        return None
    return TestSet(frame["text"].tolist(), frame["label"].to_numpy(str), frame["predicted"].to_numpy(str),
                   frame[columns].to_numpy(np.float64))


def cells(task: Task, decided: np.ndarray, names: list[str], separator: str) -> np.ndarray:
    """Decisions written as predictions.csv writes them: a label, or a label set joined by `separator`."""
    return np.array(task.label_cells(decided, names, separator), dtype=object).astype(str)


def compare(logits: np.ndarray, test: TestSet, source: Source) -> dict:
    """How the exported model does on the run's test rows, next to the run's own results: the largest
    probability difference (softmax, or a sigmoid per label: the model's own, as pipeline() gives them),
    accuracy (multi-label: subset accuracy, the whole set right) and agreement with the run's
    decisions, both under the run's decision rule (temperature, threshold(s))."""
    decided = cells(source.task, source.decide(logits), source.label_names, source.separator)
    probs = source.task.probabilities(logits)
    return {"rows": len(test.texts), "max_abs_diff_vs_run": float(np.abs(probs - test.probs).max()),
            "accuracy": float((decided == test.labels).mean()),
            "agreement_with_run": float((decided == test.predicted).mean())}


def encoded(source: Source, texts: list[str]):
    """Texts tokenized exactly as the run tokenized them (same function, same max_length)."""
    from peftlab.data.tokenize import encode

    return encode(source.tokenizer, texts, np.zeros(len(texts), np.int64), source.max_length, source.cache_dir)


def write_info(directory: Path, info: dict) -> None:
    (directory / "export_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
