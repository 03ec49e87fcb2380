"""Multi-label metrics: every text has a set of labels, each label is a yes/no decision on its own
probability (a sigmoid, not a softmax). Labels are a 0/1 matrix (texts, labels); so are decisions."""
from __future__ import annotations

import math

import numpy as np

from peftlab.tasks.metrics import ECE_BINS, reliability_bins


def sigmoid(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def binary_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over texts and labels of the binary cross-entropy of sigmoid(logits), computed stably."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return float((np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))).mean())


def decide(probs: np.ndarray, thresholds: float | list[float] | np.ndarray | None = None) -> np.ndarray:
    """0/1 decisions: label j where its probability is at least its threshold (default 0.5)."""
    t = 0.5 if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    return (np.asarray(probs) >= t).astype(np.int64)


def _counts(labels: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label: true positives, false positives, false negatives."""
    y, p = np.asarray(labels, dtype=bool), np.asarray(predicted, dtype=bool)
    return (y & p).sum(0), (~y & p).sum(0), (y & ~p).sum(0)


def _f1(tp, fp, fn) -> np.ndarray:
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(denominator), where=denominator > 0)


def decision_scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """The figures of 0/1 decisions: subset accuracy (every label of a text right), macro-F1 (mean over
    the labels that occur in the labels or the decisions), micro-F1, samples-F1 (mean over texts; a text
    with no label and none predicted counts 1) and Hamming loss (share of wrong label decisions)."""
    y, p = np.asarray(labels, dtype=bool), np.asarray(predicted, dtype=bool)
    tp, fp, fn = _counts(y, p)
    occurs = (tp + fp + fn) > 0
    per_label = _f1(tp, fp, fn)
    row_tp, row_fp, row_fn = (y & p).sum(1), (~y & p).sum(1), (y & ~p).sum(1)
    row_f1 = np.where(row_tp + row_fp + row_fn > 0, _f1(row_tp, row_fp, row_fn), 1.0)
    return {"accuracy": float((y == p).all(axis=1).mean()),
            "macro_f1": float(per_label[occurs].mean()) if occurs.any() else 0.0,
            "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
            "samples_f1": float(row_f1.mean()),
            "hamming_loss": float((y != p).mean())}


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray, label_names: list[str],
                       predicted: np.ndarray | None = None) -> dict:
    """Decision figures (decision_scores), per label precision/recall/F1/support and 2x2 confusion
    ([[tn, fp], [fn, tp]]), the confidence of the decisions (max(p, 1 - p) of each label of each text),
    and the figures of the probabilities: ROC-AUC (macro over labels with both outcomes), log loss
    (mean binary cross-entropy), Brier score (mean squared error) and ECE over every label decision."""
    y = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != y.shape or probs.shape[1] != len(label_names):
        raise ValueError(f"labels and probs must both have shape (n, {len(label_names)}), got {y.shape} and {probs.shape}")
    if len(y) == 0:
        raise ValueError("no examples to score")
    p = decide(probs) if predicted is None else np.asarray(predicted).astype(np.int64)
    tp, fp, fn = _counts(y, p)
    tn = len(y) - tp - fp - fn
    precision = np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros(len(tp)), where=(tp + fn) > 0)
    f1 = _f1(tp, fp, fn)
    confidence = np.where(p == 1, probs, 1 - probs).reshape(-1)
    return {
        **decision_scores(y, p),
        **probability_metrics(y, probs),
        "per_class": {name: {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                             "support": int(tp[j] + fn[j])} for j, name in enumerate(label_names)},
        "label_confusion": {name: [[int(tn[j]), int(fp[j])], [int(fn[j]), int(tp[j])]]
                            for j, name in enumerate(label_names)},
        "confidence": {"mean": float(confidence.mean()), "min": float(confidence.min()),
                       "max": float(confidence.max()), "share_ge_0_9": float((confidence >= 0.9).mean())},
    }


def probability_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """roc_auc, log_loss, brier, ece of label probabilities (n, K) against 0/1 labels (n, K)."""
    from sklearn.metrics import roc_auc_score

    y, probs = np.asarray(labels).astype(np.int64), np.asarray(probs, dtype=np.float64)
    both = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    clipped = np.clip(probs, 1e-15, 1 - 1e-15)
    correct = (probs >= 0.5) == (y == 1)
    bins = reliability_bins(np.maximum(probs, 1 - probs).reshape(-1), correct.reshape(-1), ECE_BINS)
    return {"roc_auc": float(np.mean([roc_auc_score(y[:, j], probs[:, j]) for j in both])) if both else None,
            "log_loss": float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean()),
            "brier": float(((probs - y) ** 2).mean()),
            "ece": float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / y.size)}


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the binary cross-entropy of sigmoid(logits / T), one T for
    every label (a bounded search over log T in [log 0.05, log 20])."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    result = minimize_scalar(lambda log_t: binary_cross_entropy(z / math.exp(log_t), y),
                             bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def _closest_to_half(candidates: np.ndarray, score: np.ndarray) -> float:
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def _candidates(p: np.ndarray) -> np.ndarray:
    """0.5, and midway between consecutive distinct probabilities (and beyond both ends)."""
    u = np.unique(p)
    return np.unique(np.concatenate([[0.5, u[0] - 1e-9, u[-1] + 1e-9], (u[1:] + u[:-1]) / 2]))


def tune_thresholds(probs: np.ndarray, labels: np.ndarray, metric: str = "macro_f1",
                    per_label: bool = True) -> list[float]:
    """Decision thresholds from these examples (validation). Per label: each label's threshold maximises
    that label's F1 (a label with no positive example here keeps 0.5). Global: one threshold for every
    label maximising `metric` (decision_scores). Ties go to the threshold closest to 0.5."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if not per_label:
        candidates = np.clip(_candidates(probs.reshape(-1)), 0.0, 1.0)
        if len(candidates) > 400:  # enough resolution, bounded cost
            candidates = np.unique(np.concatenate([[0.5], np.quantile(probs, np.linspace(0, 1, 399))]))
        score = np.array([decision_scores(y, decide(probs, t))[metric] for t in candidates])
        return [_closest_to_half(candidates, score)] * y.shape[1]
    out = []
    for j in range(y.shape[1]):
        positives = np.sort(probs[y[:, j] == 1, j])
        if len(positives) == 0:
            out.append(0.5)
            continue
        candidates, ordered = _candidates(probs[:, j]), np.sort(probs[:, j])
        predicted = len(ordered) - np.searchsorted(ordered, candidates, side="left")  # p >= t
        tp = len(positives) - np.searchsorted(positives, candidates, side="left")
        out.append(_closest_to_half(candidates, _f1(tp, predicted - tp, len(positives) - tp)))
    return out
