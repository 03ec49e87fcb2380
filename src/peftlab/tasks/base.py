"""The task kind as an object: everything that depends on whether a text has one class or a set of labels,
owned in one place (as peft's tuners own their facts). Callers ask the task and never test which one it
is; a new kind is one new module in this folder that subclasses Task and calls `register` (every module
of the folder is imported before the registry is first asked).

The run record stores `task.name` (metrics.json "task"); `get(name)` gives the task back when a run is
loaded. The config says which task a run does (data.multi_label): `for_data(data_config)`.
"""
from __future__ import annotations


import numpy as np

from peftlab.discovery import import_all
from peftlab.errors import UserError

Threshold = float | list[float] | None  # single-label: one (two classes); multi-label: one per label


class Task:
    """The interface; see single_label.py and multi_label.py for the two kinds."""
    name: str = ""              # stored in the run record; get(name) returns the task
    title: str = ""             # in messages: "single-label", "multi-label"
    multi_label: bool = False   # the value of data.multi_label (config) and of the record's multi_label
    setting: str = "data.multi_label"  # the config setting that chooses the task
    order: int = 0              # where its sections come in a report, after those of the same dataset
    problem_type: str = ""      # transformers' config.problem_type of the classifier
    probabilities_code: str = ""  # its probabilities of `logits` in torch, as a model card writes them
    probabilities_words: str = ""  # and in words
    label_noun: str = "class"   # what one label is called in messages
    empty_label_ok: bool = False  # an empty label cell is a valid (empty) label set
    metrics_names: tuple = ()   # the figures of a score (history.jsonl, sweeps)
    detail_keys: tuple = ()     # the figures of an at-threshold record
    tracked_scores: tuple = ()  # validation figures logged to trackers beyond accuracy, macro-F1, loss
    selection_metrics: frozenset = frozenset({"macro_f1", "accuracy"})  # eval.metric values it selects by
    metric_labels: dict = {"accuracy": "accuracy", "macro_f1": "macro-F1", "micro_f1": "micro-F1",
                           "samples_f1": "samples-F1", "hamming_loss": "Hamming loss"}
    section_note: str = ""      # a report section title's note
    report_columns: dict | None = None  # own results-table test columns (column -> figure), None: the default
    report_notes: tuple = ()    # the report's notes when a section is of this kind
    chart_scores: tuple = ()    # (figure, legend) of the report's test-scores chart
    chart_note: str = ""
    best_run_chart: str = ""    # reports/charts.py's chart of the best run: "confusion_matrix" or "label_scores"
    best_run_figure: str = ""   # that chart, in the summary's words
    plot_set: str = ""          # runs/plots.py's plots of the run: "classes" or "label_sets"
    validation_curves: tuple = ()  # (figure, legend) per epoch; the last ones only where history holds them
    prediction_confidence: bool = True  # predictions.csv has a confidence column
    exclusive_classes: bool = True  # each text has exactly one class (two texts are alike or not)
    loss_skips_ignore_index: bool = True  # its loss (train.loss=cross_entropy) skips rows labelled -100

    def summary_rows(self, test) -> list[tuple[str, str]]:
        """`peftlab train`'s summary rows beyond accuracy and macro-F1, from the record's test scores."""
        return []

    def metric_label(self, metric: str) -> str:
        return self.metric_labels.get(metric, metric)

    # --- labels --------------------------------------------------------------------------------
    def encode_labels(self, labels: dict, raw, separator: str) -> tuple[list[str], dict[str, np.ndarray]]:
        raise NotImplementedError

    def label_cells(self, values: np.ndarray, names: list[str], separator: str) -> list[str]:
        """Labels or decisions as predictions.csv writes them."""
        raise NotImplementedError

    def parse_cells(self, cells, names: list[str], separator: str) -> np.ndarray:
        """predictions.csv's cells back as labels (the inverse of label_cells)."""
        raise NotImplementedError

    def labelled(self, labels):
        """Rows that have a label (not UNLABELED: only the distillation teacher labels them)."""
        raise NotImplementedError

    # --- the training loss (torch) ---------------------------------------------------------------
    def class_weights(self, setting, labels: np.ndarray, names: list[str]):
        raise NotImplementedError

    def hard_loss(self, logits, labels, weight, kind: str, gamma: float, smoothing: float):
        raise NotImplementedError

    def soft_loss(self, student, teacher, temperature: float):
        """The distillation teacher's part, scaled by T^2."""
        raise NotImplementedError

    def training_loss(self, tc, train_labels: np.ndarray, names: list[str], device, unlabeled: bool = False):
        """loss(logits, labels) for train.* (loss, focal_gamma, label_smoothing, class_weights) on this data;
        `unlabeled`: some rows are UNLABELED and the loss skips them."""
        from peftlab.tasks.losses import masked_hard_loss

        weight = self.class_weights(tc.class_weights, train_labels, names)
        weight = weight.to(device) if weight is not None else None
        if unlabeled:
            return lambda logits, labels: masked_hard_loss(self, logits, labels, weight, tc.loss, tc.focal_gamma,
                                                           tc.label_smoothing)
        return lambda logits, labels: self.hard_loss(logits, labels, weight, tc.loss, tc.focal_gamma,
                                                     tc.label_smoothing)

    def loss_rows(self, logits, labels, weight, kind: str, gamma: float, smoothing: float):
        """Per row: (loss, row weight), weighed as hard_loss weighs them (for the masked loss)."""
        raise NotImplementedError

    # --- scores and decisions (numpy) ------------------------------------------------------------
    def probabilities(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Of logits divided by the calibration temperature (1: none)."""
        raise NotImplementedError

    def loss(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """The mean evaluation loss of logits."""
        raise NotImplementedError

    def metrics(self, labels: np.ndarray, probs: np.ndarray, names: list[str], predicted=None) -> dict:
        """The figures of a split (metrics_names and the details), at `predicted` or the default decisions."""
        raise NotImplementedError

    def probability_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict:
        """Calibration figures (log loss, Brier, ECE) of the probabilities."""
        raise NotImplementedError

    def decide(self, probs: np.ndarray, threshold: Threshold = None) -> np.ndarray:
        """The decisions, in the shape of the labels; `threshold` None: the default rule."""
        raise NotImplementedError

    def fit_temperature(self, logits: np.ndarray, labels: np.ndarray) -> float:
        raise NotImplementedError

    def check(self, metric: str, threshold, names: list[str]) -> None:
        """A UserError line when eval.metric or eval.threshold does not fit this data."""
        raise NotImplementedError

    def check_threshold(self, threshold: Threshold, names: list[str]) -> None:
        """ValueError when a threshold does not fit the labels (a Predictor given a wrong one)."""
        raise NotImplementedError

    def threshold_for(self, setting, probs: np.ndarray, labels: np.ndarray, metric: str, scope: str) -> Threshold:
        """eval.threshold as the threshold(s) to use: None (the default rule), fixed, or tuned on these."""
        raise NotImplementedError

    def at_threshold(self, probs, labels, names, threshold: Threshold, tuned_for: str) -> dict:
        """The record's validation_at_threshold / test_at_threshold."""
        raise NotImplementedError

    def rule(self, names: list[str], threshold: Threshold, temperature: float) -> dict:
        """The decision rule as data (serve's /adapters, export's config.json)."""
        raise NotImplementedError

    def row(self, probs: np.ndarray, decided, names: list[str]) -> dict:
        """One answer of predict / serve."""
        raise NotImplementedError

    def confidence(self, probs: np.ndarray, decided: np.ndarray) -> np.ndarray | None:
        """predictions.csv's confidence column, or None when the task has none."""
        raise NotImplementedError

    def score_logits(self, logits: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
        """The metrics of the logits' probabilities (default decisions), plus the mean loss."""
        return {**self.metrics(labels, self.probabilities(logits), names), "loss": self.loss(logits, labels)}

    def __repr__(self) -> str:
        return f"<task {self.name}>"


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def _load_all() -> None:
    import_all("peftlab.tasks")


def names() -> list[str]:
    _load_all()
    return sorted(_TASKS)


def get(name: str) -> Task:
    _load_all()
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r} (known: {', '.join(sorted(_TASKS))}): a run of a newer peftlab?")
    return _TASKS[name]


def for_data(data_config) -> Task:
    """The task a config's data section asks for (data.multi_label)."""
    _load_all()
    return next(t for t in _TASKS.values() if t.multi_label == bool(data_config.multi_label))


def for_record(task_name: str | None, multi_label: bool) -> Task:
    """A run record's task: its name, or for a record written before names were stored, its multi_label."""
    if task_name:
        return get(task_name)
    _load_all()
    return next(t for t in _TASKS.values() if t.multi_label == bool(multi_label))


def of_predictions(columns) -> Task:
    """The task of a predictions.csv without a record: a single-label one always has a confidence column."""
    _load_all()
    columns = [str(c) for c in columns]
    if "confidence" in columns or not any(c.startswith("prob_") for c in columns):
        return next(t for t in _TASKS.values() if t.prediction_confidence)
    return next(t for t in _TASKS.values() if not t.prediction_confidence)
