"""Classification metrics from labels and class probabilities, as plain JSON-ready Python values."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, matthews_corrcoef,
                             precision_recall_fscore_support, roc_auc_score)

ECE_BINS = 15


def classification_metrics(labels: np.ndarray, probs: np.ndarray, label_names: list[str],
                           predicted: np.ndarray | None = None) -> dict:
    """Accuracy, macro-F1, MCC, per-class scores, confusion matrix, confidence summary, and the figures
    of the probabilities themselves: ROC-AUC, log loss, Brier score, expected calibration error.

    `labels` are class indices (n,), `probs` are class probabilities (n, n_classes) whose column i is
    `label_names[i]`. The prediction is the most probable class (or `predicted`, e.g. at a tuned
    threshold); the probability of the predicted class is the confidence.
    """
    labels = np.asarray(labels).astype(int).reshape(-1)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape != (len(labels), len(label_names)):
        raise ValueError(f"probs must have shape ({len(labels)}, {len(label_names)}), got {probs.shape}")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    predicted = probs.argmax(axis=1) if predicted is None else np.asarray(predicted).astype(int).reshape(-1)
    confidence = probs[np.arange(len(labels)), predicted]
    classes = list(range(len(label_names)))

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    # Macro-F1 over the classes that occur (in labels or predictions): a class absent from a small
    # evaluation set would otherwise count as F1 = 0 and drag the average down for no reason.
    macro_f1 = f1_score(labels, predicted, average="macro", zero_division=0)
    matrix = confusion_matrix(labels, predicted, labels=classes)  # every class, even if absent

    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(macro_f1),
        "mcc": float(matthews_corrcoef(labels, predicted)),
        **probability_metrics(labels, probs),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": [[int(x) for x in row] for row in matrix],
        "confidence": {
            "mean": float(confidence.mean()),
            "min": float(confidence.min()),
            "max": float(confidence.max()),
            "share_ge_0_9": float((confidence >= 0.9).mean()),
        },
    }


def probability_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """roc_auc, log_loss, brier, ece of class probabilities (n, n_classes) against label indices."""
    return {"roc_auc": roc_auc(labels, probs), "log_loss": log_loss(labels, probs), "brier": brier(labels, probs),
            "ece": expected_calibration_error(labels, probs)}


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Two classes: the plain ROC-AUC of the second class's probability. More: the one-vs-rest macro
    average over the classes that occur (a class absent from the labels has no AUC). None when fewer
    than two classes occur."""
    labels = np.asarray(labels).astype(int)
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1])) if len(np.unique(labels)) == 2 else None
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in range(probs.shape[1]) if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean(aucs)) if len(aucs) >= 2 else None


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log probability of the true class (probabilities clipped at 1e-15)."""
    p = np.asarray(probs, dtype=float)[np.arange(len(labels)), np.asarray(labels).astype(int)]
    return float(-np.log(np.clip(p, 1e-15, 1.0)).mean())


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    """Two classes: mean (p(second class) - y)^2, the plain Brier score. More: the mean over examples of
    the squared distance between the probability vector and the one-hot label (Brier's original, 0..2)."""
    probs = np.asarray(probs, dtype=float)
    labels = np.asarray(labels).astype(int)
    if probs.shape[1] == 2:
        return float(((probs[:, 1] - (labels == 1)) ** 2).mean())
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins (lower, upper]: {lower, upper, count, confidence, accuracy} each
    (the means of the examples in the bin; None where it is empty)."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)  # (lower, upper]
    bins = []
    for b in range(n_bins):
        inside = which == b
        n = int(inside.sum())
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": n,
                     "confidence": float(confidence[inside].mean()) if n else None,
                     "accuracy": float(correct[inside].mean()) if n else None})
    return bins


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width confidence bins of (bin share) * |accuracy - mean confidence|, with the
    confidence the top probability and accuracy whether the top class is the label."""
    probs = np.asarray(probs, dtype=float)
    correct = probs.argmax(axis=1) == np.asarray(labels).astype(int)
    bins = reliability_bins(probs.max(axis=1), correct, n_bins)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / len(correct))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the log loss of softmax(logits / T) (Guo et al., 2017):
    a 1-D bounded search over log T in [log 0.05, log 20]."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    result = minimize_scalar(lambda log_t: cross_entropy(logits / math.exp(log_t), labels),
                             bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def threshold_predictions(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Two classes: the second class where its probability is at least `threshold`, else the first."""
    return (np.asarray(probs)[:, 1] >= threshold).astype(int)


def tune_threshold(probs: np.ndarray, labels: np.ndarray, metric: str = "macro_f1") -> float:
    """Two classes: the threshold on the second class's probability with the best `metric` (macro_f1 over
    both classes, or accuracy) on these examples. Candidates lie midway between consecutive distinct
    probabilities (and beyond both ends); among equally good ones the closest to 0.5 wins."""
    labels = np.asarray(labels).astype(int)
    p1 = np.asarray(probs, dtype=float)[:, 1]
    u = np.unique(p1)
    candidates = np.unique(np.concatenate([[0.5, u[0] - 1e-9, u[-1] + 1e-9], (u[1:] + u[:-1]) / 2]))
    all_sorted, pos_sorted = np.sort(p1), np.sort(p1[labels == 1])
    n, n_pos = len(labels), len(pos_sorted)
    predicted_pos = n - np.searchsorted(all_sorted, candidates, side="left")  # p1 >= t
    tp = n_pos - np.searchsorted(pos_sorted, candidates, side="left")
    fp, fn = predicted_pos - tp, n_pos - tp
    tn = n - tp - fp - fn
    if metric == "accuracy":
        score = (tp + tn) / n
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            f1_pos = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
            f1_neg = np.where(2 * tn + fp + fn > 0, 2 * tn / (2 * tn + fp + fn), 0.0)
        score = (f1_pos + f1_neg) / 2
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def score_logits(logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    """classification_metrics of the logits' probabilities, plus the mean cross-entropy loss."""
    return {**classification_metrics(labels, softmax(logits), label_names), "loss": cross_entropy(logits, labels)}
