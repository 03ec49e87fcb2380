"""The typed configuration: every field, its type, its allowed values and its default, written once.

A config file is YAML with the sections below; every field is optional. `--set section.key=value`
overrides any field. Validation happens here and only here.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftlab.errors import UserError


def _finite(value: Any) -> Any:
    """nan and inf (and numbers like 1e400 that YAML reads as inf) are never a setting: refused in every
    float field, and inside lists and maps (class weights, sweep grids)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number (not nan or inf)")
    if isinstance(value, (list, tuple)):
        for v in value:
            _finite(v)
    elif isinstance(value, dict):
        for v in value.values():
            _finite(v)
    return value


class Section(BaseModel):
    # allow_inf_nan: every float field refuses nan and inf before its bounds are checked (one clear message)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _finite_numbers(cls, v: Any) -> Any:
        return v if isinstance(v, BaseModel) else _finite(v)

    def __setattr__(self, name: str, value: Any) -> None:
        """`cfg.train.batch_size = "x"` in Python: one UserError line, as a bad --set is."""
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            error = e.errors()[0]
            key = f"{_section_name(type(self))}{name}"
            if error["type"] == "no_such_attribute":
                raise UserError(f"config: unknown key '{key}' (allowed keys: {', '.join(type(self).model_fields)})") from None
            raise UserError(f"config: bad value {value!r} for '{key}': {error['msg']}") from None


def _section_name(cls: type) -> str:
    """'train.' for TrainConfig (the Config field that holds it), '' for Config itself."""
    return next((f"{name}." for name, field in Config.model_fields.items() if field.annotation is cls), "")


FALLBACK_MAX_LENGTH = 128  # data.max_length unset, and the checkpoint names no max_seq_length of its own


class DataConfig(Section):
    name: str | None = Field("bbc_news", description="built-in dataset (bbc_news) or a hub dataset (ag_news, imdb, owner/name)")
    path: str | None = Field(None, description="a local file (csv, tsv, jsonl[.gz], parquet) or a directory holding train.*, validation.*, test.*; wins over name")
    hub_subset: str | None = Field(None, description="configuration name of a hub dataset, e.g. sst2 for glue")
    text_columns: list[str] = Field(["text"], description="one text column, or several joined with a space (e.g. [title, description])")
    label_column: str = "label"
    multi_label: bool = Field(False, description="each text has a set of labels (none, one or several): a JSON list per "
                                                 "row, or one string split on data.label_separator; trained with "
                                                 "binary cross-entropy on every label")
    label_separator: str = Field("|", min_length=1, description="multi-label: separates the labels in one text field "
                                                                "(CSV/TSV/Parquet strings), e.g. 'sports|politics'")
    max_length: int | None = Field(None, ge=8, le=8192, description="tokens per text, truncated. Unset: a sentence-"
                                   "transformers checkpoint's own max_seq_length (its sentence_bert_config.json, "
                                   "e.g. 256 for all-MiniLM-L6-v2), else FALLBACK_MAX_LENGTH (128); capped at what "
                                   "the model can read. metrics.json max_length records the number and its source")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="stratified share of train used for validation when there is no validation split")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="stratified share carved out for test when there is no test split")
    seed: int | None = Field(None, description="seed of the carved splits and subsets; default: train.seed. Set it for seed studies, so that every training seed is scored on the same rows")
    max_train_samples: int | None = Field(None, ge=2, description="stratified subset of train, for quick runs")
    max_eval_samples: int | None = Field(None, ge=2, description="stratified subset of validation and of test")
    min_validation_rows: int = Field(20, ge=1, description="a validation split with fewer rows cannot choose an epoch "
                                     "(its metric moves in steps of 1/rows and many epochs tie): it is warned about "
                                     "and the last epoch is kept (a fixed budget of train.epochs)")
    drop_duplicates_across_splits: bool = Field(False, description="drop validation/test rows whose text also occurs in train (they are counted and warned about either way)")
    cache_dir: str | None = Field(None, description="tokenization cache; default ~/.cache/peftlab (or $PEFTLAB_CACHE)")

    @field_validator("text_columns", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ModelConfig(Section):
    name: str = Field("minilm-l6", description="hub id, local folder, built-in alias (minilm-l6), or random:SHAPE (random weights: speed and memory only)")
    tokenizer: str | None = Field(None, description="tokenizer to use when it differs from the model (needed for random:SHAPE)")
    gradient_checkpointing: bool | None = Field(
        None, description="recompute each layer's activations in the backward pass instead of keeping them: much "
                          "less memory, about a third more compute. Unset: the method's choice, on for qlora (the "
                          "QLoRA recipe, as peft's prepare_model_for_kbit_training) where transformers can "
                          "checkpoint the architecture (not MPNet), off for the others. Recorded "
                          "in metrics.json efficiency.gradient_checkpointing")
    head: Literal["auto", "pooled", "cls"] = Field(
        "auto", description="what the classifier reads. auto: the pooled sentence embedding where the checkpoint is a "
                            "sentence-transformers one (its modules.json and 1_Pooling/config.json say how: mean "
                            "pooling, then unit length for MiniLM and MPNet), else the checkpoint's own head. pooled: "
                            "that embedding (mean pooling where the checkpoint does not say). cls: the checkpoint's own "
                            "head ([CLS] pooler / first token). Recorded in metrics.json head")
    trust_remote_code: bool = Field(
        False, description="let transformers run the code a model folder names (config.json auto_map with a model "
                           "type it does not know). Off: such a folder is refused in one line, and nothing is "
                           "asked on stdin. Only for a folder whose code you have read and trust; kept in the run's "
                           "config, so its predict, serve and export load it the same way")


class MethodConfig(Section):
    name: str = Field("lora", description="a method from the registry: full, lora, qlora, ia3; few labelled rows: "
                                    "contrastive-lora, contrastive-ia3, contrastive-full, probe (docs/few-shot.md)")
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, le=1e5, description="LoRA alpha (scaling = alpha / r), at most 1e5")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(None, description="module names to adapt; default: the architecture's (e.g. BERT [query, value])")
    layers: list[int] | None = Field(None, description="adapt only these layer indices (LoRA, IA3)")
    rank_pattern: dict[str, int] = Field({}, description="per-module-type rank, e.g. {attention.output.dense: 4}")
    bits: Literal[4, 8] = Field(4, description="QLoRA backbone precision; falls back to 8-bit, then none, where it cannot run")
    pair_iterations: int = Field(100, ge=1, description="contrastive-* methods: the pair budget, 2 x this pairs per "
                                 "labelled row (SetFit's num_iterations). pair_objective=in_batch reaches it in few "
                                 "steps (a batch of 16 rows holds 120 pairs); pairs draws them one by one (each row "
                                 "with one row of its class and one of another, per iteration), 2 texts per pair: "
                                 "set 5 to 20 there")
    body_epochs: float = Field(1, gt=0, description="contrastive-* methods: passes over the sentence pairs")
    pair_objective: Literal["pairs", "in_batch"] = Field(
        "in_batch", description="contrastive-* methods: how the body learns from pairs. pairs: SetFit's, sampled pairs "
                             "(pair_iterations), cosine similarity towards 1 (same class) or 0 (mean squared error). "
                             "in_batch: FastFit-style, class-balanced batches of train.batch_size labelled rows and "
                             "every pair in the batch at once (supervised contrastive loss at pair_temperature), as "
                             "many steps as give the same number of pairs as pairs would")
    pair_temperature: float = Field(0.2, gt=0, le=10, description="pair_objective=in_batch: temperature of the "
                                    "softmax over cosine similarities (0.2: in the few-shot study, SupCon's 0.07 "
                                    "lost 2-3 points on AG News and nothing on SST-2 at 0.2)")
    end_to_end_epochs: float = Field(0, ge=0, le=1000, description="contrastive-* methods: after the head is fitted, "
                                     "passes over the labelled rows training body and head together on the "
                                     "classification loss (SetFit's end-to-end phase); 0: none")
    head_fit: Literal["logistic", "linear"] = Field(
        "logistic", description="contrastive-* and probe: how the head is fitted on the labelled rows' embeddings. "
                                "logistic: scikit-learn's logistic regression (SetFit's default head), written into the "
                                "linear head; linear: the head trained by gradient descent (300 full-batch Adam "
                                "steps at 1e-2; also what a head that is not one linear layer gets)")
    head_c: float = Field(1.0, gt=0, description="inverse regularisation strength of head_fit=logistic (scikit-learn's C)")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _modules_list(cls, v: Any) -> Any:
        return [m.strip() for m in v.split(",") if m.strip()] if isinstance(v, str) else v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_list(cls, v: Any) -> Any:
        if isinstance(v, int):
            return [v]
        if isinstance(v, str):
            return [int(x) for x in v.split(",") if x.strip()]
        return v


class TrainConfig(Section):
    epochs: float = Field(3, gt=0, le=1e5, description="passes over train (fractions allowed), at most 1e5")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(16, ge=1)
    min_steps_per_epoch: int = Field(4, ge=1, description="few training rows: the batch size is lowered (never below 1) "
                                     "so that an epoch has at least this many optimizer steps (recorded in "
                                     "metrics.json selection.batch_size); 16 rows in one batch of 16 would learn from one step "
                                     "per epoch")
    learning_rate: float | None = Field(None, gt=0, le=10, description="default: the method's own (full 5e-5, "
                                        "lora/qlora 1e-3, ia3 5e-3); at most 10 (beyond, no optimizer here converges)")
    weight_decay: float = Field(0.01, ge=0, le=10, description="AdamW decoupled weight decay, 0 to 10")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, description="clip the gradient norm (at most 1e6); null: no clipping")
    seed: int = 42
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better validation metric")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device multiplies bf16 in hardware (a bf16 GPU; a CPU with AVX512-BF16 "
                            "or AMX), else fp32; metrics.json efficiency.precision_reason says why. $PEFTLAB_CPU_BF16=0 "
                            "(or 1) tells peftlab the CPU has no (or has) bf16 units. Trainable weights and optimizer "
                            "state stay fp32; an auto run whose 16-bit loss turns non-finite starts again in fp32")
    sampler: Literal["length_grouped", "random"] = Field("length_grouped", description="length_grouped: similar lengths share a batch (less padding)")
    compile: bool = Field(False, description="torch.compile the model (GPU)")
    step_engine: Literal["auto", "eager", "cuda_graphs"] = Field(
        "eager", description="how each training step runs. eager: plain PyTorch; cuda_graphs: the whole step (forward, "
                             "backward, clipping, AdamW) replayed as one CUDA graph per length bucket; auto: cuda_graphs "
                             "where it can run, else eager. Where cuda_graphs cannot run (CPU, several processes, fp16, "
                             "gradient accumulation, distillation, ...) eager runs and metrics.json says why")
    frozen_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the dtype frozen (non-trained) weights are stored in. auto: bf16 on a bf16 run (GPU or CPU) "
                            "of a method that freezes the backbone (half the memory, no re-cast each step), else as loaded; "
                            "fp32: upcast them (what peft's prepare_model_for_kbit_training does for QLoRA)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, ge=1, description="optimizer steps between loss readings (the only host syncs; a non-finite loss is caught there)")
    checkpoint_every_epoch: bool = Field(True, description="save a resumable checkpoint at each epoch end")
    class_weights: Literal["none", "balanced"] | dict[str, float] = Field(
        "none", description="weight of each class in the training loss: none, balanced (n_samples / (n_classes * "
                            "count), sklearn's), or {label: weight} (labels left out weigh 1). Multi-label: the "
                            "weight of each label's positive examples (balanced: negatives / positives)")
    loss: Literal["cross_entropy", "focal"] = Field("cross_entropy", description="training loss; focal: "
                                                     "(1 - p_true)^focal_gamma * cross-entropy, for hard or rare examples")
    focal_gamma: float = Field(2.0, ge=0, le=100, description="focusing exponent of train.loss=focal (0: cross-entropy), at most 100")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="share of the target spread over all classes "
                                                                 "(multi-label: targets move to s/2 and 1 - s/2)")

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        if isinstance(v, dict):  # integer labels come from YAML as ints
            v = {str(k): w for k, w in v.items()}
            bad = [k for k, w in v.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1e6]
            if bad:
                raise ValueError(f"class weight of {bad[0]!r} must be a finite number > 0 and at most 1e6")
        return v


class EvalConfig(Section):
    metric: Literal["macro_f1", "accuracy", "micro_f1", "samples_f1"] = Field(
        "macro_f1", description="validation metric used to select the best epoch and the best sweep trial "
                                "(multi-label: accuracy is subset accuracy; micro_f1 and samples_f1 are multi-label only)")
    batch_size: int = Field(64, ge=1)
    baseline: bool = Field(True, description="also evaluate the model before fine-tuning on test")
    threshold: Literal["argmax", "tune"] | float = Field(
        "argmax", description="the decision rule. argmax: the most probable class (multi-label: every label whose "
                              "probability is >= 0.5). tune (two classes or multi-label): the threshold(s) on validation "
                              "that maximise eval.metric. A number in (0, 1): that threshold (on the second class's "
                              "probability; multi-label: on every label's). Test figures at it are reported beside the "
                              "argmax ones, and predict, serve and export use it")
    threshold_scope: Literal["per_label", "global"] = Field(
        "per_label", description="multi-label eval.threshold=tune: one threshold per label (each maximising that "
                                 "label's F1) or one for all labels (maximising eval.metric)")
    calibrate: Literal["none", "temperature"] = Field("none", description="temperature: fit T > 0 on validation logits "
                                                       "(least log loss) and divide logits by T at prediction time")

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_range(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("argmax", "tune"):
            try:
                v = float(v)
            except ValueError:
                raise ValueError("expected argmax, tune, or a number between 0 and 1") from None
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError("expected argmax, tune, or a number between 0 and 1")
        if isinstance(v, (int, float)) and not 0 < v < 1:
            raise ValueError("a fixed threshold must lie strictly between 0 and 1 (or use argmax or tune)")
        return float(v) if isinstance(v, int) else v


class OutputConfig(Section):
    dir: str | None = Field(None, description="run directory; default runs/<timestamp>-<method>")
    plots: bool = True


class DistillConfig(Section):
    teacher: str | None = Field(None, description="a run directory (or model) whose logits teach the student")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label loss; 1 - alpha goes to the teacher")
    temperature: float = Field(2.0, gt=0, le=1000, description="softens teacher and student logits; above 0, at most 1000")
    unlabeled: str | None = Field(None, description="a file of texts without labels (CSV, TSV, JSON Lines, Parquet; "
                                                    "column 'text' or data.text_columns): the teacher labels them and "
                                                    "the student learns from them too, by the teacher's part of the "
                                                    "loss only. Texts also in the data's splits are dropped")

    @model_validator(mode="after")
    def _unlabeled_needs_teacher(self) -> "DistillConfig":
        if self.unlabeled and not self.teacher:
            raise ValueError("distill.unlabeled needs distill.teacher: only a teacher can label those texts")
        return self


class BudgetConfig(Section):
    max_trainable_params: int | None = Field(None, ge=1, description="skip configurations with more trainable parameters")


class SearchDimension(Section):
    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "SearchDimension":
        if self.type == "categorical" and not self.choices:
            raise ValueError("a categorical dimension needs choices")
        if self.type != "categorical" and (self.low is None or self.high is None):
            raise ValueError("an int or float dimension needs low and high")
        return self


class SweepConfig(Section):
    grid: dict[str, list[Any]] = Field({}, description="config keys mapped to the values to try; every combination runs")
    space: dict[str, SearchDimension] = Field({}, description="config keys mapped to search dimensions (used with n_trials)")
    n_trials: int | None = Field(None, ge=1)
    seeds: list[int] = Field([], description="repeat every configuration with these train.seed values")
    pruning: bool = Field(False, description="stop clearly bad trials early from per-epoch validation")
    teacher: dict[str, Any] | None = Field(None, description="overrides of a teacher run trained first in the sweep "
                                           "(e.g. {method.name: full}); distill.teacher: teacher then points to it")
    sampler_seed: int = Field(0, description="seed of the TPE sampler (sweep.space)")

    @model_validator(mode="after")
    def _one_kind(self) -> "SweepConfig":
        if self.grid and self.space:
            raise ValueError("give sweep.grid or sweep.space, not both")
        if self.space and not self.n_trials:
            raise ValueError("sweep.space needs sweep.n_trials (how many configurations to sample)")
        return self


class TrackingConfig(Section):
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field([], description="experiment trackers each run is logged to (install with peftlab[tensorboard], peftlab[mlflow], peftlab[wandb]); see docs/tracking.md")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (e.g. sqlite:///runs/mlflow.db, http://host:5000); default: MLflow's own ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    project: str = Field("peftlab", min_length=1, description="MLflow experiment and W&B project")
    run_name: str | None = Field(None, description="name of the tracked run; default: the run directory's name (a sweep: the sweep's parent run, trials keep their directory names)")
    log_dir: str | None = Field(None, description="TensorBoard: event files go to LOG_DIR/<run name>; default: RUN_DIR/tensorboard")

    @field_validator("backends", mode="before")
    @classmethod
    def _backends_list(cls, v: Any) -> Any:
        if isinstance(v, str):  # --set tracking.backends=mlflow,wandb
            v = [b.strip() for b in v.split(",") if b.strip()]
        return list(dict.fromkeys(v)) if isinstance(v, list) and all(isinstance(b, str) for b in v) else v


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    distill: DistillConfig = DistillConfig()
    budget: BudgetConfig = BudgetConfig()
    sweep: SweepConfig = SweepConfig()
    tracking: TrackingConfig = TrackingConfig()
