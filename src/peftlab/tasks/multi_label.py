"""A set of labels per text (none, one or several): a sigmoid per label; label j when its probability
reaches its threshold (0.5, a fixed value, or tuned per label or globally on validation); binary
cross-entropy per label; per-label scores and a 2x2 confusion per label."""
from __future__ import annotations

import numpy as np
import torch

from peftlab.tasks import label_encoding, losses, multi_label_metrics
from peftlab.tasks.base import Task, Threshold, register


class MultiLabel(Task):
    name = "multi_label"
    title = "multi-label"
    multi_label = True
    order = 1  # after the single-label section of the same dataset
    problem_type = "multi_label_classification"
    probabilities_code = "torch.sigmoid(logits)  # one probability per label"
    probabilities_words = "a sigmoid per label"
    label_noun = "label"
    empty_label_ok = True  # an empty cell is the empty label set
    metrics_names = ("accuracy", "macro_f1", "micro_f1", "samples_f1", "hamming_loss")
    detail_keys = ("accuracy", "macro_f1", "micro_f1", "samples_f1", "hamming_loss", "per_class", "label_confusion")
    tracked_scores = ("micro_f1", "samples_f1", "hamming_loss")
    selection_metrics = frozenset({"macro_f1", "accuracy", "micro_f1", "samples_f1"})
    metric_labels = {**Task.metric_labels, "accuracy": "subset accuracy"}
    section_note = "multi-label"
    # results-table test columns: column -> the metrics.json figure it shows (mean ± std over seeds)
    report_columns = {"test subset acc": "accuracy", "test macro-F1": "macro_f1", "test micro-F1": "micro_f1",
                      "test samples-F1": "samples_f1", "test Hamming loss": "hamming_loss"}
    report_notes = (
        "Multi-label runs (a set of labels per text) have their own sections, never ranked with single-label runs: "
        "subset accuracy counts a text right only when all its labels are; macro-F1 is the mean of the per-label F1s; "
        "micro-F1 pools every label decision; samples-F1 is the mean F1 over texts; Hamming loss is the share of wrong "
        "label decisions (lower is better). Their Pareto front uses test subset accuracy.",
        "Multi-label test figures predict a label when its probability is at least 0.5; the '@ thresholds' columns use "
        "the run's eval.threshold (tuned on validation, or fixed) instead.",
    )
    chart_scores = (("accuracy", "test subset accuracy"), ("macro_f1", "test macro-F1"),
                    ("micro_f1", "test micro-F1"), ("samples_f1", "test samples-F1"))
    chart_note = "Multi-label: labels predicted when p ≥ 0.5."
    best_run_chart = "label_scores"
    best_run_figure = "per-label chart"
    plot_set = "label_sets"
    # micro- and samples-F1 drawn where history.jsonl holds them
    validation_curves = (("accuracy", "subset accuracy"), ("macro_f1", "macro-F1"), ("micro_f1", "micro-F1"),
                         ("samples_f1", "samples-F1"))
    prediction_confidence = False
    exclusive_classes = False
    loss_skips_ignore_index = False  # BCE has no ignore index: a padded row would count

    def summary_rows(self, test) -> list[tuple[str, str]]:
        # accuracy is subset accuracy; decisions at 0.5
        return [("test micro-F1 / samples-F1", f"{test.micro_f1:.4f} / {test.samples_f1:.4f} "
                                               f"(Hamming loss {test.hamming_loss:.4f}; at 0.5)")]

    # --- labels
    def encode_labels(self, labels: dict, raw, separator: str) -> tuple[list[str], dict[str, np.ndarray]]:
        return label_encoding.encode_label_sets(labels, raw, separator)

    def label_cells(self, values: np.ndarray, names: list[str], separator: str) -> list[str]:
        return [separator.join(n for n, on in zip(names, row) if on) for row in np.asarray(values)]

    def parse_cells(self, cells, names: list[str], separator: str) -> np.ndarray:
        """Label-set cells ("a|c", "" for none) as a 0/1 matrix (texts, labels); unknown names are left out."""
        index = {n: j for j, n in enumerate(names)}
        out = np.zeros((len(cells), len(names)), dtype=np.int64)
        for i, cell in enumerate(cells):
            for part in str(cell).split(separator) if str(cell) else []:
                if part in index:
                    out[i, index[part]] = 1
        return out

    def labelled(self, labels):
        return labels[:, 0] != losses.UNLABELED  # an unlabelled row is UNLABELED in every column

    # --- loss
    def class_weights(self, setting, labels: np.ndarray, names: list[str]) -> torch.Tensor | None:
        """The weights multiply each label's positive examples (BCE's pos_weight); balanced is negatives /
        positives of the label."""
        if setting == "none":
            return None
        if setting == "balanced":
            return losses.balanced_pos_weights(labels)
        return losses.named_weights(setting, names, self.label_noun)

    def hard_loss(self, logits, labels, weight, kind: str, gamma: float, smoothing: float):
        return losses.label_set_loss(logits, labels, weight, kind, gamma, smoothing)

    def loss_rows(self, logits, labels, weight, kind: str, gamma: float, smoothing: float):
        return losses.per_label_set_rows(logits, labels, weight, kind, gamma, smoothing)

    def soft_loss(self, student, teacher, temperature: float):
        return losses.sigmoid_soft_loss(student, teacher, temperature)

    # --- scores and decisions
    def probabilities(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        logits = np.asarray(logits)
        return multi_label_metrics.sigmoid(logits / temperature if temperature != 1.0 else logits)

    def loss(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return multi_label_metrics.binary_cross_entropy(logits, labels)

    def metrics(self, labels: np.ndarray, probs: np.ndarray, names: list[str], predicted=None) -> dict:
        return multi_label_metrics.multilabel_metrics(labels, probs, names, predicted)

    def probability_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict:
        return multi_label_metrics.probability_metrics(labels, probs)

    def decide(self, probs: np.ndarray, threshold: Threshold = None) -> np.ndarray:
        """0/1 per label: probability >= the label's threshold (0.5 when there is none)."""
        return multi_label_metrics.decide(probs, threshold)

    def fit_temperature(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return multi_label_metrics.fit_temperature(logits, labels)

    def check(self, metric: str, threshold, names: list[str]) -> None:
        pass  # every metric and every threshold setting applies

    def check_threshold(self, threshold: Threshold, names: list[str]) -> None:
        if threshold is not None and len(threshold) != len(names):
            raise ValueError(f"{len(threshold)} thresholds for {len(names)} labels")

    def threshold_for(self, setting, probs: np.ndarray, labels: np.ndarray, metric: str, scope: str) -> Threshold:
        if setting == "argmax":
            return None
        if setting == "tune":
            return multi_label_metrics.tune_thresholds(probs, labels, metric, per_label=scope == "per_label")
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

    def confidence(self, probs: np.ndarray, decided: np.ndarray) -> None:
        return None  # no one decided label: predictions.csv has no confidence column


MULTI_LABEL = register(MultiLabel())
