"""The run directory: the on-disk record every other command reads.

    config.yaml       resolved config
    history.jsonl     step rows (loss, lr) and epoch rows (validation metrics)
    checkpoints/      last.pt (resume) and best.pt (best validation epoch), removed when the run completes
    adapter/ | model/ the trained adapter (PEFT format) or full model, with tokenizer and a model card
                      (README.md); a pooled head's folder also holds peftlab_head.py and its config.json
    predictions.csv   test rows with predicted label, confidence and class probabilities
    metrics.json      the contract; written atomically once everything the run needs is on
                      disk, so its presence with status "completed" means the run is complete
    plots/            PNG charts, drawn after metrics.json (optional: a failure is a warning)
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import shutil
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

from peftlab.config import Config, save_config
from peftlab.config.load import build_config
from peftlab.errors import UserError
from peftlab.files import append_text, clean_stale, replacing, torch_save, write_text
from peftlab.models.heads import save_remote_code
from peftlab.runs.record import RunRecord
from peftlab.tasks import SINGLE_LABEL, Task


INTERRUPTED = "interrupted"  # a failed record's error after Ctrl-C or SIGTERM: resumable


def atomic_write_text(path: Path, text: str) -> None:
    write_text(path, text)  # peftlab.files: temp + rename, write errors as one line


def plain_values(value):
    """`value` with numpy arrays as lists and numpy numbers as Python's (tensors, containers and plain
    values as they are): what torch.load(weights_only=True) reads back."""
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain_values(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def default_run_dir(method: str) -> Path:
    """runs/<date>-<time>-<method>, made here (mkdir is atomic): runs started in the same second, in one
    process or several, get -2, -3, ... rather than the same directory."""
    first = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}"
    for n in itertools.count(1):
        path = first if n == 1 else first.with_name(f"{first.name}-{n}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError:
            pass  # not writable: RunDir.create says so in one line
        return path


class RunDir:
    """A run directory. Its file names are spelled here and nowhere else: every other module reads and
    writes a run through these accessors (tests/test_structure.py holds it)."""
    CONFIG, HISTORY, METRICS, PREDICTIONS = "config.yaml", "history.jsonl", "metrics.json", "predictions.csv"
    CHECKPOINTS, PLOTS, ADAPTER, MODEL = "checkpoints", "plots", "adapter", "model"
    TEACHER_LOGITS, TENSORBOARD, CARD = "teacher_logits.npy", "tensorboard", "README.md"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- files -------------------------------------------------------------------------------
    config_file = property(lambda self: self.path / RunDir.CONFIG)
    history_file = property(lambda self: self.path / RunDir.HISTORY)
    metrics_file = property(lambda self: self.path / RunDir.METRICS)
    predictions_file = property(lambda self: self.path / RunDir.PREDICTIONS)
    checkpoints = property(lambda self: self.path / RunDir.CHECKPOINTS)
    plots = property(lambda self: self.path / RunDir.PLOTS)
    adapter_dir = property(lambda self: self.path / RunDir.ADAPTER)
    model_dir = property(lambda self: self.path / RunDir.MODEL)
    teacher_logits_file = property(lambda self: self.checkpoints / RunDir.TEACHER_LOGITS)  # distill's cache
    tensorboard_dir = property(lambda self: self.path / RunDir.TENSORBOARD)  # tracking.log_dir unset

    def weights_dir(self, method) -> Path:
        """adapter/ (PEFT format, beside the base) or model/ (the whole model), as method.saves_adapter says."""
        return self.adapter_dir if method.saves_adapter else self.model_dir

    def saved_weights(self) -> Path | None:
        return next((p for p in (self.model_dir, self.adapter_dir) if p.is_dir()), None)

    def weight_files(self) -> list[Path]:
        """The saved weights' tensor files (.safetensors, .bin) in adapter/ and model/."""
        return [p for folder in (self.adapter_dir, self.model_dir) for p in folder.glob("*")
                if p.suffix in (".safetensors", ".bin")]

    def plot_files(self) -> list[Path]:
        return sorted(self.plots.glob("*.png"))

    def create(self) -> "RunDir":
        """Make the directory for a new run and take its lock; refuse one that already holds a run."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output directory {str(self.path)!r} is a file: choose another --output-dir")
        if self.path.is_symlink() and not self.path.exists():
            raise UserError(f"output directory {str(self.path)!r} is a symbolic link to {os.readlink(self.path)!r}, "
                            f"which does not exist: create that folder, or choose another --output-dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test.{os.getpid()}.tmp"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output directory {str(self.path)!r} cannot be written ({e.strerror}): "
                            f"choose a writable --output-dir") from None
        self.lock()
        if self.metrics_file.exists() or self.history_file.exists():
            self.unlock()
            raise UserError(f"output directory {str(self.path)!r} already holds a run: choose another --output-dir, "
                            f"or continue it with --resume {self.path}")
        return self

    def lock(self) -> None:
        """Only one process writes a run directory. An OS lock (flock), so it dies with its process and a
        killed run can be resumed at once."""
        import fcntl

        if getattr(self, "_lock", None) is not None:
            return
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{str(self.path)!r} is being written by {holder}: wait for it to finish, or choose "
                            f"another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"peftlab process {os.getpid()}")
        handle.flush()
        self._lock = handle
        # the directory is ours now: temporaries of a writer that was killed go (they never look complete)
        for folder in (self.path, self.checkpoints, self.plots):
            clean_stale(folder)

    def unlock(self) -> None:
        handle = getattr(self, "_lock", None)
        if handle is not None:
            handle.close()  # closing releases the flock
            self._lock = None

    def require_resumable(self) -> None:
        if not self.path.is_dir():
            raise UserError(f"--resume {str(self.path)!r}: no such directory")
        if not self.config_file.exists():
            raise UserError(f"--resume {str(self.path)!r}: no config.yaml there, so it is not a peftlab run directory")
        self.lock()
        if self.status() == "completed":
            self.unlock()
            raise UserError(f"--resume {str(self.path)!r}: this run already completed; nothing to resume")

    def status(self) -> str | None:
        if not self.metrics_file.exists():
            return None
        try:
            return json.loads(self.metrics_file.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return None

    def resumable(self) -> bool:
        """Stopped before completing with its checkpoint kept: killed (no record, or "finishing"), or
        interrupted (Ctrl-C or SIGTERM: status failed, error "interrupted"). A run that failed with an
        error starts over."""
        if not (self.config_file.exists() and (self.checkpoints / "last.pt").exists()):
            return False
        status = self.status()
        if status in (None, "finishing"):
            return True
        try:
            return status == "failed" and json.loads(self.metrics_file.read_text()).get("error") == INTERRUPTED
        except (OSError, ValueError, AttributeError):
            return False

    def config(self) -> Config:
        if not self.config_file.exists():
            raise UserError(f"{self.config_file}: missing, so {str(self.path)!r} is not a complete peftlab run "
                            f"directory; retrain it")
        try:
            return build_config(self.config_tree(), str(self.config_file))
        except UserError as e:
            raise UserError(f"{e}: this run's saved config is damaged; restore config.yaml, or retrain the run") from None

    def start(self, cfg: Config | None = None, resume: bool = False) -> tuple[Config, bool]:
        """Open the directory for training: a new run (created, config saved) or the continuation of
        an interrupted one (its saved config). Returns (config, whether to resume from a checkpoint)."""
        if resume:
            self.require_resumable()
            return self.config(), True
        if cfg is None:
            raise ValueError("a new run needs its config")
        cfg.output.dir = str(self.path)
        self.create()
        save_config(cfg, self.config_file)
        return cfg, False

    def start_or_continue(self, cfg: Config) -> bool:
        """For a worker that may have been killed (sweeps): continue from the last checkpoint where there
        is one, else start over in a clean directory. Returns whether it resumes."""
        if self.resumable():
            self.lock()
            return True
        if self.path.exists():
            shutil.rmtree(self.path)
        self.start(cfg)
        return False

    # --- records -----------------------------------------------------------------------------
    def append_history(self, row: dict) -> None:
        append_text(self.history_file, json.dumps(row) + "\n")

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

    def write_record(self, record: RunRecord) -> None:
        record.write(self.metrics_file)

    def record(self) -> RunRecord:
        return RunRecord.read(self.metrics_file)

    def record_failure(self, error: BaseException, cfg: Config | None = None) -> None:
        """A run that stopped must never look complete: say why, with status "failed"."""
        if self.status() == "completed":
            return
        what = INTERRUPTED if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
        with contextlib.suppress(UserError, OSError):  # the disk that failed the run may refuse this too:
            self._write_failure(what, cfg)               # then no metrics.json at all, still not "completed"

    def _write_failure(self, what: str, cfg: Config | None) -> None:
        self.write_record(RunRecord(status="failed", error=what, traceback=traceback.format_exc(),
                                    run_dir=str(self.path), method=cfg.method.name if cfg else None,
                                    config=cfg.model_dump(mode="json") if cfg else None))

    def write_predictions(self, texts: list[str], labels: np.ndarray, probs: np.ndarray, predicted: np.ndarray,
                          names: list[str], separator: str = "|", task: Task = SINGLE_LABEL) -> None:
        """predictions.csv: each test text with its label, the prediction (the run's decision rule), every
        probability (the model's own, before any calibration temperature). Single-label rows also hold the
        confidence (the predicted class's probability); multi-label label sets are joined by `separator`.
        The cells are the task's (tasks/)."""
        import pandas as pd

        labels, predicted, probs = np.asarray(labels), np.asarray(predicted), np.asarray(probs)
        frame = pd.DataFrame({"text": texts, "label": task.label_cells(labels, names, separator),
                              "predicted": task.label_cells(predicted, names, separator)})
        confidence = task.confidence(probs, predicted)
        if confidence is not None:
            frame["confidence"] = confidence
        for j, name in enumerate(names):
            frame[f"prob_{name}"] = probs[:, j]
        # kept exactly as the data says (no spreadsheet-formula guard): export and report read it back
        # (docs/report.md); `peftlab predict --output x.csv` is the spreadsheet-safe form
        with replacing(self.predictions_file) as tmp:
            # CRLF rows (RFC 4180): then a text holding a bare \r is quoted too (with \n rows it is not,
            # and a reader would split the row there)
            frame.to_csv(tmp, index=False, lineterminator="\r\n")

    def save_weights(self, method, model, tokenizer) -> Path:
        """adapter/ or model/ (save_pretrained of the model and its tokenizer), written to a temporary
        folder and renamed: a failed or killed save leaves no folder that looks like trained weights."""
        weights = self.weights_dir(method)
        with replacing(weights, directory=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # a pooled head: config.json that transformers loads right with trust_remote_code=True, or refuses
            save_remote_code(model, tmp)
        return weights

    def write_card(self, text: str) -> None:
        """The weights folder's README.md (peft writes an empty template there): the run's model card."""
        folder = self.saved_weights()
        if folder is not None:
            write_text(folder / RunDir.CARD, text)

    def config_tree(self) -> dict:
        """config.yaml as a mapping (hand-edited: maybe a BOM); damaged: one line."""
        try:
            tree = yaml.safe_load(self.config_file.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            mark = getattr(e, "problem_mark", None)
            why = f"not valid YAML at line {mark.line + 1}" if mark else type(e).__name__
            raise UserError(f"{self.config_file}: cannot be read ({why})") from None
        if not isinstance(tree, dict):
            raise UserError(f"{self.config_file}: not a mapping of sections (data:, model:, ...)")
        return tree

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, name: str, state: dict) -> None:
        """Tensors and plain values only (numpy's become lists and numbers), so that it loads back with
        torch.load(weights_only=True), which runs no code from the file."""
        self.checkpoints.mkdir(exist_ok=True)
        torch_save(plain_values(state), self.checkpoints / f"{name}.pt")

    def load_checkpoint(self, name: str) -> dict | None:
        path = self.checkpoints / f"{name}.pt"
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # weights_only refused a Python object: never built, never run
            raise UserError(f"{path}: not a checkpoint peftlab wrote (it holds Python objects, which peftlab does "
                            f"not load: loading them could run code); delete it to restart that part of the run, "
                            f"or retrain") from None
        except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
            raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to restart that part "
                            f"of the run, or retrain") from None

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.checkpoints, ignore_errors=True)


class RunView(RunDir):
    """A run directory as the other ranks of a multi-process run see it: they read (config,
    checkpoints), and rank 0 alone writes."""

    def _nothing(self, *args, **kwargs) -> None:
        return None

    create = lock = unlock = append_history = truncate_history = write_record = record_failure = _nothing
    write_predictions = save_checkpoint = remove_checkpoints = save_weights = write_card = _nothing
