"""metrics.json, typed once: what a run records and every reader reads (train's summary, sweeps,
reports, predict, serve, bench, the Python API).

Unknown keys are ignored, so records written by earlier (or later) versions still load; a file that
is not a record at all fails with one line naming it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from peftlab import tasks
from peftlab.errors import UserError

Status = Literal["completed", "finishing", "failed", "pruned"]


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access by field name (charts and tables address figures by key paths)."""
        value = getattr(self, key, None)
        return default if value is None else value


class Scores(Record):
    accuracy: float
    macro_f1: float
    loss: float | None = None
    # the rest came later (records written before lack them): tasks.metrics.classification_metrics
    mcc: float | None = None  # Matthews correlation coefficient
    roc_auc: float | None = None  # two classes: plain; more: one-vs-rest macro over the classes that occur
    log_loss: float | None = None
    brier: float | None = None  # two classes: plain; more: squared distance to the one-hot label (0..2)
    ece: float | None = None  # expected calibration error, 15 equal-width confidence bins
    # multi-label runs (accuracy is then subset accuracy: every label of a text right)
    micro_f1: float | None = None
    samples_f1: float | None = None  # mean F1 over texts
    hamming_loss: float | None = None  # share of wrong label decisions


class ClassScores(Record):
    precision: float
    recall: float
    f1: float
    support: int


class Confidence(Record):
    mean: float
    min: float
    max: float
    share_ge_0_9: float


class FullScores(Scores):
    """Scores with the details: per class, confusion matrix (multi-label: a 2x2 [[tn, fp], [fn, tp]] per
    label instead), confidence (multi-label: of every label decision, max(p, 1 - p))."""
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[int]] | None = None
    label_confusion: dict[str, list[list[int]]] | None = None
    confidence: Confidence

    @model_validator(mode="after")
    def _one_confusion(self) -> "FullScores":
        if self.confusion_matrix is None and self.label_confusion is None:
            raise ValueError("needs confusion_matrix (or label_confusion for multi-label)")
        return self


class Params(Record):
    trainable: int
    total: int
    trainable_pct: float
    adapter_bytes: int | None = None


class Baseline(Record):
    """The model before fine-tuning (fresh head), on the test split."""
    test: Scores


class Efficiency(Record):
    train_seconds: float
    train_samples_per_second: float
    train_tokens_per_second: float  # real (non-padding) tokens
    peak_memory_bytes: int
    peak_memory_kind: str  # gpu_max_allocated | cpu_peak_rss
    device: str
    precision: str | None = None
    precision_reason: str | None = None  # why: what precision=auto found on the device, or the setting
    optimizer_steps: int | None = None
    wall_seconds: float | None = None
    world_size: int = 1  # processes that trained (peftlab train --nproc, torchrun, accelerate launch)
    step_engine: str | None = None  # which training step engine ran (training/engines/)
    step_engine_reason: str | None = None  # why it is not the one train.step_engine asked for
    graph_capture_seconds: float | None = None  # cuda_graphs: warm-up and capture, part of train_seconds
    frozen_dtype: str | None = None  # the dtype the frozen weights were stored in
    gradient_checkpointing: bool | None = None  # activations recomputed in the backward pass (None: older records)


class Quantization(Record):
    requested: str | None = None
    used: str | None = None  # read from the built model's modules (older records: from the request)
    reason: str | None = None
    modules_4bit: int | None = None  # bitsandbytes 4-bit / 8-bit linear layers, and their stored bytes
    bytes_4bit: int | None = None
    modules_8bit: int | None = None
    bytes_8bit: int | None = None
    frozen_linear_unquantized: int | None = None  # frozen linear layers left in floating point
    skipped_for_width: int | None = None  # of those, left out because bitsandbytes cannot take their widths


class Distillation(Record):
    teacher: str
    alpha: float
    temperature: float
    unlabeled: str | None = None  # distill.unlabeled: a file of texts only the teacher labelled
    unlabeled_rows: int = 0  # how many of its texts the student trained on


class AtThreshold(Scores):
    """Scores at the decision threshold(s) of eval.threshold (tuned on validation, or fixed), reported
    beside the default (argmax; multi-label 0.5) figures (`test`, `validation`), which they never replace.
    Two classes: one threshold on the second class's probability. Multi-label: one per label."""
    threshold: float | None = None  # two classes: positive_label is predicted when its probability >= threshold
    positive_label: str | None = None
    thresholds: dict[str, float] | None = None  # multi-label: label -> threshold on its probability
    tuned_for: str  # the validation metric maximised (eval.metric), or "fixed"
    per_class: dict[str, ClassScores] | None = None
    confusion_matrix: list[list[int]] | None = None
    label_confusion: dict[str, list[list[int]]] | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> "AtThreshold":
        if (self.threshold is None) == (self.thresholds is None):
            raise ValueError("needs threshold (two classes) or thresholds (multi-label), not both")
        return self


class ProbabilityScores(Record):
    ece: float
    log_loss: float
    brier: float


class Calibration(Record):
    """eval.calibrate=temperature: T fitted on validation logits; predict divides logits by T. `before`
    and `after` are the test figures without and with T (accuracy does not change)."""
    method: Literal["temperature"] = "temperature"
    temperature: float
    before: ProbabilityScores
    after: ProbabilityScores
    validation_before: ProbabilityScores | None = None
    validation_after: ProbabilityScores | None = None


class PrecisionRetry(Record):
    """train.precision=auto trained in 16 bits, the loss became non-finite, and the run started again in fp32."""
    from_precision: str
    to_precision: str = "float32"
    step: int | None = None  # the optimizer step where the loss was first non-finite
    reason: str


class RunRecord(Record):
    status: Status
    method: str | None = None
    model: str | None = None
    dataset: str | None = None
    run_dir: str | None = None
    config: dict | None = None  # the resolved config (as in config.yaml)
    label_names: list[str] = []
    task: str | None = None  # the task kind's name (tasks/); records written before it say multi_label only
    multi_label: bool = False  # a set of labels per text (sigmoid per label) rather than one class
    split_sizes: dict[str, int] = {}
    split_sources: dict[str, str] = {}
    overlap_with_train: dict[str, int] = {}  # validation/test texts that also occur in train
    params: Params | None = None
    best_epoch: int | None = None
    validation: Scores | None = None  # the best epoch's, which selected it
    test: FullScores | None = None
    baseline: Baseline | None = None
    efficiency: Efficiency | None = None
    quantization: Quantization | None = None
    distill: Distillation | None = None
    validation_at_threshold: AtThreshold | None = None  # eval.threshold=tune or a fixed value
    test_at_threshold: AtThreshold | None = None
    calibration: Calibration | None = None  # eval.calibrate=temperature
    precision_retry: PrecisionRetry | None = None
    # how the best epoch was chosen (rule, validation rows, why the last epoch; a lowered batch size)
    selection: dict | None = None
    head: dict | None = None  # what the classifier reads: the checkpoint's own head, or its pooled embedding
    # where a built-in model's weights came from when peftlab converted them (e.g. dequantized from GGUF Q4_1)
    model_source: dict | None = None
    few_shot: dict | None = None  # contrastive / probe methods: pairs, body epochs, head fit
    max_length: dict | None = None  # tokens per text and where the number came from (data.max_length or the checkpoint)
    error: str | None = None  # failed: what went wrong
    traceback: str | None = None
    reason: str | None = None  # pruned: why

    @model_validator(mode="before")
    @classmethod
    def _kind(cls, data: Any) -> Any:
        """multi_label follows from the task's name, and the name from multi_label in an older record."""
        if isinstance(data, dict) and data.get("status") in ("completed", "finishing"):
            kind = tasks.for_record(data.get("task"), bool(data.get("multi_label")))
            data = {**data, "task": kind.name, "multi_label": kind.multi_label}
        return data

    @model_validator(mode="after")
    def _complete(self) -> "RunRecord":
        if self.status in ("completed", "finishing"):
            missing = [k for k in ("params", "validation", "test", "efficiency") if getattr(self, k) is None]
            if missing or not self.label_names:
                raise ValueError(f"a {self.status} run needs {', '.join(missing or ['label_names'])}")
        return self

    @property
    def kind(self) -> "tasks.Task":
        """The run's task (tasks/): what its labels, probabilities, decisions and figures are."""
        return tasks.for_record(self.task, self.multi_label)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def threshold(self) -> float | list[float] | None:
        """The decision threshold predictions use, if any: one (two classes), or one per label in
        label_names order (multi-label); None: the default rule (argmax; multi-label 0.5)."""
        at = self.test_at_threshold
        if at is None:
            return None
        return [at.thresholds[n] for n in self.label_names] if at.thresholds is not None else at.threshold

    @property
    def temperature(self) -> float:
        """The calibration temperature predictions use (1: none)."""
        return self.calibration.temperature if self.calibration is not None else 1.0

    # --- disk ----------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path) -> "RunRecord":
        """The record in `path` (a metrics.json); UserError naming the file when it is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.model_validate(data)
        except FileNotFoundError:
            raise UserError(f"{path}: no metrics.json: the run never finished (continue it with peftlab train "
                            f"--resume {path.parent}) or this is not a run directory") from None
        except (OSError, ValueError, ValidationError) as e:
            first = str(e).splitlines()[0] if not isinstance(e, ValidationError) else _first_error(e)
            raise UserError(f"{path}: not a valid peftlab metrics.json ({first}): retrain the run, or remove "
                            f"the directory") from None

    @classmethod
    def read_or_none(cls, path: str | Path) -> "RunRecord | None":
        try:
            return cls.read(path)
        except UserError:
            return None

    def write(self, path: str | Path) -> None:
        """Atomically: a reader sees the previous record or this one, never a torn file."""
        from peftlab.files import write_text

        write_text(path, self.model_dump_json(indent=2, exclude_none=False) + "\n")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "record"
    return f"{where}: {err['msg']}"
