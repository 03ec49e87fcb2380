import json

import numpy as np
import pytest

from peftlab.tasks.metrics import classification_metrics

NAMES = ["a", "b", "c", "d"]  # "d" never occurs: it must still get a row, a column and a per_class entry
LABELS = np.array([0, 0, 1, 1, 2])
PROBS = np.array([
    [0.90, 0.05, 0.03, 0.02],  # a -> a
    [0.30, 0.60, 0.05, 0.05],  # a -> b
    [0.02, 0.95, 0.02, 0.01],  # b -> b
    [0.20, 0.50, 0.20, 0.10],  # b -> b
    [0.70, 0.10, 0.10, 0.10],  # c -> a
])


def test_values_by_hand():
    m = classification_metrics(LABELS, PROBS, NAMES)
    assert set(m) == {"accuracy", "macro_f1", "per_class", "confusion_matrix", "confidence",
                      "mcc", "roc_auc", "log_loss", "brier", "ece"}  # the last five: tests/test_calibration.py
    assert m["accuracy"] == pytest.approx(3 / 5)
    # a: P 1/2 R 1/2 F1 1/2; b: P 2/3 R 1 F1 4/5; c: no prediction -> P 0 (zero_division) R 0 F1 0
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # Macro over the classes that occur (a, b, c); the absent d does not drag it down.
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert m["confidence"] == pytest.approx({"mean": 0.73, "min": 0.5, "max": 0.95, "share_ge_0_9": 0.4})


def test_plain_json_types():
    m = classification_metrics(LABELS, PROBS, NAMES)
    assert json.loads(json.dumps(m)) == m
    assert type(m["accuracy"]) is float and type(m["per_class"]["a"]["support"]) is int
    assert all(type(x) is int for row in m["confusion_matrix"] for x in row)


def test_perfect_and_shape_errors():
    m = classification_metrics(np.array([1, 0]), np.array([[0.1, 0.9], [0.8, 0.2]]), ["x", "y"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 1]), np.array([[0.5, 0.5]]), ["x", "y"])
