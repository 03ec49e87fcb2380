"""What kind of classification a run does, and everything that depends on it: how logits become
probabilities, how probabilities become decisions, how both are scored, calibrated and thresholded.
Callers (trainer, predictor, serve, export) ask the task and never test which one it is.

- SINGLE_LABEL: one class per text; softmax; argmax, or for two classes a threshold on the second
  class's probability.
- MULTI_LABEL: a set of labels per text; a sigmoid per label; label j when its probability reaches its
  threshold (0.5, a fixed value, or tuned per label or globally on validation).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peftlab.errors import UserError
from peftlab.evaluation import metrics, multilabel

Threshold = float | list[float] | None  # single-label: one (two classes); multi-label: one per label


@dataclass(frozen=True)
class SingleLabel:
    multi_label: bool = False
    metrics_names: tuple = ("accuracy", "macro_f1")
    detail_keys: tuple = ("accuracy", "macro_f1", "mcc", "per_class", "confusion_matrix")

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
        if metric in ("micro_f1", "samples_f1"):
            raise UserError(f"eval.metric={metric} is for multi-label data (data.multi_label=true); use macro_f1 or accuracy")
        if threshold != "argmax" and len(names) != 2:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise UserError(f"eval.threshold={threshold} needs two classes; this data has {len(names)} ({shown}): "
                            f"use eval.threshold=argmax")

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


@dataclass(frozen=True)
class MultiLabel:
    multi_label: bool = True
    metrics_names: tuple = ("accuracy", "macro_f1", "micro_f1", "samples_f1", "hamming_loss")
    detail_keys: tuple = ("accuracy", "macro_f1", "micro_f1", "samples_f1", "hamming_loss", "per_class",
                          "label_confusion")

    def probabilities(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        logits = np.asarray(logits)
        return multilabel.sigmoid(logits / temperature if temperature != 1.0 else logits)

    def loss(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return multilabel.binary_cross_entropy(logits, labels)

    def metrics(self, labels: np.ndarray, probs: np.ndarray, names: list[str], predicted=None) -> dict:
        return multilabel.multilabel_metrics(labels, probs, names, predicted)

    def probability_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict:
        return multilabel.probability_metrics(labels, probs)

    def decide(self, probs: np.ndarray, threshold: Threshold = None) -> np.ndarray:
        """0/1 per label: probability >= the label's threshold (0.5 when there is none)."""
        return multilabel.decide(probs, threshold)

    def fit_temperature(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return multilabel.fit_temperature(logits, labels)

    def check(self, metric: str, threshold, names: list[str]) -> None:
        pass  # every metric and every threshold setting applies

    def threshold_for(self, setting, probs: np.ndarray, labels: np.ndarray, metric: str, scope: str) -> Threshold:
        if setting == "argmax":
            return None
        if setting == "tune":
            return multilabel.tune_thresholds(probs, labels, metric, per_label=scope == "per_label")
        return [float(setting)] * probs.shape[1]

    def at_threshold(self, probs, labels, names, threshold: Threshold, tuned_for: str) -> dict:
        m = self.metrics(labels, probs, names, self.decide(probs, threshold))
        return {**{k: m[k] for k in self.detail_keys}, "thresholds": dict(zip(names, map(float, threshold))),
                "tuned_for": tuned_for}

    def rule(self, names: list[str], threshold: Threshold, temperature: float) -> dict:
        """The decision rule as data: temperature first, then each label's threshold (0.5 by default)."""
        values = [0.5] * len(names) if threshold is None else list(threshold)
        return {"multi_label": True, "temperature": float(temperature), "threshold": None,
                "thresholds": {n: float(t) for n, t in zip(names, values)},
                "rule": "labels: every label j with sigmoid(logits[j] / temperature) >= thresholds[label j]"}

    def row(self, probs: np.ndarray, decided, names: list[str]) -> dict:
        return {"labels": [n for n, d in zip(names, decided) if d],
                "probabilities": {n: float(v) for n, v in zip(names, probs)}}


SINGLE_LABEL, MULTI_LABEL = SingleLabel(), MultiLabel()


def task_for(multi_label: bool) -> SingleLabel | MultiLabel:
    return MULTI_LABEL if multi_label else SINGLE_LABEL


def score_logits(task, logits: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """The task's metrics of the logits' probabilities (default decisions), plus the mean loss."""
    return {**task.metrics(labels, task.probabilities(logits), names), "loss": task.loss(logits, labels)}
