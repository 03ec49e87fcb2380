"""Classification metrics from labels and class probabilities, as plain JSON-ready Python values."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(labels: np.ndarray, probs: np.ndarray, label_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class scores, confusion matrix and confidence summary.

    `labels` are class indices (n,), `probs` are class probabilities (n, n_classes) whose column i is
    `label_names[i]`. The prediction is the most probable class; its probability is the confidence.
    """
    labels = np.asarray(labels).astype(int).reshape(-1)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape != (len(labels), len(label_names)):
        raise ValueError(f"probs must have shape ({len(labels)}, {len(label_names)}), got {probs.shape}")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
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
