"""One class per text: softmax; argmax, or for two classes a threshold on the second class's probability;
cross-entropy (focal, class weights, smoothing); a confusion matrix."""
from __future__ import annotations

import numpy as np
import torch

from peftlab.errors import UserError
from peftlab.tasks import label_encoding, losses, metrics
from peftlab.tasks.base import Task, Threshold, register


class SingleLabel(Task):
    name = "single_label"
    title = "single-label"
    multi_label = False
    problem_type = "single_label_classification"
    probabilities_code = "torch.softmax(logits, -1)"
    probabilities_words = "softmax over the classes"
    label_noun = "class"
    empty_label_ok = False
    metrics_names = ("accuracy", "macro_f1")
    detail_keys = ("accuracy", "macro_f1", "mcc", "per_class", "confusion_matrix")
    chart_scores = (("accuracy", "test accuracy"), ("macro_f1", "test macro-F1"))
    best_run_chart = "confusion_matrix"
    best_run_figure = "confusion matrix"
    plot_set = "classes"
    validation_curves = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
    prediction_confidence = True

    # --- labels
    def encode_labels(self, labels: dict, raw, separator: str) -> tuple[list[str], dict[str, np.ndarray]]:
        return label_encoding.encode_classes(labels, raw)

    def label_cells(self, values: np.ndarray, names: list[str], separator: str) -> list[str]:
        return [str(names[i]) for i in np.asarray(values)]

    def parse_cells(self, cells, names: list[str], separator: str) -> np.ndarray:
        index = {n: i for i, n in enumerate(names)}
        return np.array([index.get(str(c), -1) for c in cells], dtype=np.int64)

    def labelled(self, labels):
        return labels != losses.UNLABELED

    # --- loss
    def class_weights(self, setting, labels: np.ndarray, names: list[str]) -> torch.Tensor | None:
        """None (unweighted), sklearn's balanced weights, or the given weight per class name."""
        if setting == "none":
            return None
        if setting == "balanced":
            return losses.balanced_class_weights(labels, names)
        return losses.named_weights(setting, names, self.label_noun)

    def hard_loss(self, logits, labels, weight, kind: str, gamma: float, smoothing: float):
        return losses.hard_label_loss(logits, labels, weight, kind, gamma, smoothing)

    def loss_rows(self, logits, labels, weight, kind: str, gamma: float, smoothing: float):
        return losses.per_class_rows(logits, labels, weight, kind, gamma, smoothing)

    def soft_loss(self, student, teacher, temperature: float):
        return losses.softmax_soft_loss(student, teacher, temperature)

    # --- scores and decisions
    def probabilities(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        logits = np.asarray(logits)
        return metrics.softmax(logits / temperature if temperature != 1.0 else logits)

    def loss(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return metrics.cross_entropy(np.asarray(logits, dtype=np.float64), np.asarray(labels).astype(int))

    def metrics(self, labels: np.ndarray, probs: np.ndarray, names: list[str], predicted=None) -> dict:
        return metrics.classification_metrics(labels, probs, names, predicted)

    def probability_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict:
        return metrics.probability_metrics(labels, probs)

    def decide(self, probs: np.ndarray, threshold: Threshold = None) -> np.ndarray:
        """Class indices: the second class where its probability reaches `threshold`, else the argmax."""
        probs = np.asarray(probs)
        if not len(probs):
            return np.zeros(0, dtype=np.int64)
        return metrics.threshold_predictions(probs, threshold) if threshold is not None else probs.argmax(axis=1)

    def fit_temperature(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return metrics.fit_temperature(logits, labels)

    def check(self, metric: str, threshold, names: list[str]) -> None:
        """One line when the eval settings do not fit this data."""
        if metric not in self.selection_metrics:
            raise UserError(f"eval.metric={metric} is for multi-label data (data.multi_label=true); use macro_f1 or accuracy")
        if threshold != "argmax" and len(names) != 2:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise UserError(f"eval.threshold={threshold} needs two classes; this data has {len(names)} ({shown}): "
                            f"use eval.threshold=argmax")

    def check_threshold(self, threshold: Threshold, names: list[str]) -> None:
        if threshold is not None and len(names) != 2:
            raise ValueError(f"a decision threshold needs two classes, not {len(names)}")

    def threshold_for(self, setting, probs: np.ndarray, labels: np.ndarray, metric: str, scope: str) -> Threshold:
        """eval.threshold as the threshold to use: None (argmax), the fixed value, or tuned here."""
        if setting == "argmax":
            return None
        return metrics.tune_threshold(probs, labels, metric) if setting == "tune" else float(setting)

    def at_threshold(self, probs, labels, names, threshold: Threshold, tuned_for: str) -> dict:
        m = self.metrics(labels, probs, names, self.decide(probs, threshold))
        return {**{k: m[k] for k in self.detail_keys}, "threshold": threshold, "positive_label": names[1],
                "tuned_for": tuned_for}

    def rule(self, names: list[str], threshold: Threshold, temperature: float) -> dict:
        """The decision rule as data (serve's /adapters, export's config.json): temperature first (1: none),
        then the threshold on the second class's probability, or the argmax when there is none."""
        text = ("label: the second label when softmax(logits / temperature)[1] >= threshold, else the first"
                if threshold is not None else "label: argmax(logits)")
        return {"multi_label": False, "temperature": float(temperature),
                "threshold": None if threshold is None else float(threshold), "thresholds": None, "rule": text}

    def row(self, probs: np.ndarray, decided, names: list[str]) -> dict:
        k = int(decided)
        return {"label": names[k], "confidence": float(probs[k]),
                "probabilities": {n: float(v) for n, v in zip(names, probs)}}

    def confidence(self, probs: np.ndarray, decided: np.ndarray) -> np.ndarray:
        """predictions.csv's confidence column: the decided class's probability."""
        return np.asarray(probs)[np.arange(len(decided)), np.asarray(decided)]


SINGLE_LABEL = register(SingleLabel())
