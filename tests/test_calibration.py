"""Metrics users act on, thresholds, calibration and the non-finite-loss guard (issue 13 parts 3-5):
MCC, ROC-AUC, log loss, Brier and ECE against hand computations; the threshold and temperature
fitted on validation, recorded beside the argmax figures and used by the Predictor and peftlab
predict; the reliability plot; a non-finite loss stopping the run in one line (or, for a 16-bit auto
run, retrying once in fp32) without a host sync per step."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

from peftlab.cli import main
from peftlab.tasks.metrics import (brier, classification_metrics, cross_entropy, expected_calibration_error,
                                        fit_temperature, log_loss, reliability_bins, roc_auc, softmax,
                                        threshold_predictions, tune_threshold)
from peftlab.runs.record import RunRecord
from tests.conftest import make_rows
from tests.test_train import train_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- metrics by hand

def test_binary_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.95])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(labels, probs, ["neg", "pos"])
    # predictions 0 1 1 0 1: TP 2 TN 1 FP 1 FN 1
    assert m["mcc"] == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))
    assert m["roc_auc"] == pytest.approx(5 / 6)  # pairs (pos > neg): 0.8>0.1,0.6; 0.4>0.1; 0.95>both -> 5 of 6
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.4, 0.95])))
    assert m["brier"] == pytest.approx(np.mean((p1 - labels) ** 2))
    # confidences 0.9 0.6 0.8 0.6 0.95, correct 1 0 1 0 1: bins (0.533,0.6] (0.733,0.8] (0.867,0.933] (0.933,1]
    ece = (2 * abs(0 - 0.6) + abs(1 - 0.8) + abs(1 - 0.9) + abs(1 - 0.95)) / 5
    assert m["ece"] == pytest.approx(ece)


def test_multiclass_metrics_by_hand():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    probs = softmax(rng.normal(size=(200, 4)) + 2 * np.eye(4)[labels])
    assert roc_auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert brier(labels, probs) == pytest.approx(np.mean(np.sum((probs - np.eye(4)[labels]) ** 2, axis=1)))
    assert log_loss(labels, probs) == pytest.approx(-np.mean(np.log(probs[np.arange(200), labels])))
    assert classification_metrics(labels, probs, list("abcd"))["mcc"] == pytest.approx(
        matthews_corrcoef(labels, probs.argmax(1)))
    # a class absent from the labels has no AUC; the others are averaged; one class alone: None
    present = labels != 3
    aucs = [roc_auc_score(labels[present] == c, probs[present, c]) for c in range(3)]
    assert roc_auc(labels[present], probs[present]) == pytest.approx(np.mean(aucs))
    assert roc_auc(np.zeros(5, int), probs[:5]) is None


def test_ece_bins_are_15_equal_width_right_closed():
    bins = reliability_bins(np.array([1 / 15, 1 / 15 + 1e-9, 1.0, 0.0]), np.array([1, 0, 1, 1]))
    assert len(bins) == 15 and bins[0]["lower"] == 0 and bins[-1]["upper"] == 1
    assert [b["count"] for b in bins][:2] == [2, 1] and bins[-1]["count"] == 1  # 0 falls in the first bin
    perfect = np.array([[0.25, 0.75]] * 4)
    assert expected_calibration_error(np.array([1, 1, 1, 0]), perfect) == pytest.approx(0.0)


def test_temperature_is_recovered():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(size=(4000, 3)) * 2
    labels = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])
    t = fit_temperature(true_logits * 2.5, labels)  # an over-confident model: logits 2.5x too large
    assert t == pytest.approx(2.5, rel=0.1)
    assert cross_entropy(true_logits * 2.5 / t, labels) < cross_entropy(true_logits * 2.5, labels)


def test_threshold_tuning_finds_the_best():
    rng = np.random.default_rng(2)
    labels = (rng.random(300) < 0.3).astype(int)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=300) + 1.5 * labels - 1.2)))
    probs = np.stack([1 - p1, p1], axis=1)
    for metric in ("macro_f1", "accuracy"):
        t = tune_threshold(probs, labels, metric)
        score = lambda th: (f1_score(labels, threshold_predictions(probs, th), average="macro") if metric == "macro_f1"  # noqa: E731
                            else (threshold_predictions(probs, th) == labels).mean())
        brute = max(score(th) for th in np.linspace(0, 1, 1001))
        assert score(t) == pytest.approx(brute) and score(t) >= score(0.5)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def binary_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("binary")
    for split, n, seed in (("train", 240, 11), ("validation", 90, 12), ("test", 90, 13)):
        rows = [r for r in make_rows(n * 3 // 2, seed) if r["label"] != "food"][:n]
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tiny_model_dir, binary_data):
    overrides = [f"model.name={tiny_model_dir}", f"data.path={binary_data}", "data.max_length=48", "train.epochs=2",
                 "train.batch_size=16", "train.learning_rate=0.05", "eval.threshold=tune", "eval.calibrate=temperature"]
    return train_cli(tmp_path_factory.mktemp("tuned"), overrides)


def test_threshold_and_temperature_are_recorded_beside_argmax(tuned_run):
    m = json.loads((tuned_run / "metrics.json").read_text())
    record = RunRecord.read(tuned_run / "metrics.json")
    for split in ("test", "validation"):  # the argmax figures stay, with the new metrics
        assert {"accuracy", "macro_f1", "mcc", "roc_auc", "log_loss", "brier", "ece"} <= set(m[split])
    at = m["test_at_threshold"]
    assert at["positive_label"] == record.label_names[1] == "tech" and at["tuned_for"] == "macro_f1"
    assert 0 <= at["threshold"] <= 1 and record.threshold == at["threshold"]
    frame = pd.read_csv(tuned_run / "predictions.csv")  # the model's own probabilities, argmax labels
    probs = frame[[f"prob_{n}" for n in record.label_names]].to_numpy()
    scaled = softmax(np.log(probs) / record.temperature)
    labels = frame["label"].map({n: i for i, n in enumerate(record.label_names)}).to_numpy()
    assert at["accuracy"] == pytest.approx((threshold_predictions(scaled, at["threshold"]) == labels).mean(), abs=1e-6)
    assert m["test"]["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean(), abs=1e-6)
    cal = m["calibration"]
    assert cal["method"] == "temperature" and cal["temperature"] == record.temperature > 0
    assert cal["before"]["log_loss"] == pytest.approx(m["test"]["log_loss"], abs=1e-4)
    assert cal["after"]["log_loss"] == pytest.approx(log_loss(labels, scaled), abs=1e-4)
    assert cal["validation_after"]["log_loss"] <= cal["validation_before"]["log_loss"] + 1e-9  # fitted there
    assert (tuned_run / "plots" / "reliability.png").read_bytes()[:8] == PNG_MAGIC


def test_predictor_and_predict_use_threshold_and_temperature(tuned_run, tmp_path):
    from peftlab.runs.trained import load_predictor

    record = RunRecord.read(tuned_run / "metrics.json")
    predictor = load_predictor(tuned_run, torch.device("cpu"))
    assert predictor.temperature == record.temperature and predictor.threshold == record.threshold
    texts = pd.read_csv(tuned_run / "predictions.csv")["text"].tolist()
    logits = predictor.logits(texts)
    probs = softmax(logits / record.temperature)
    assert predictor.probabilities(texts) == pytest.approx(probs, abs=1e-6)  # probabilities: calibrated only
    expected = [record.label_names[int(p[1] >= record.threshold)] for p in probs]
    rows = predictor.predict(texts)
    assert [r["label"] for r in rows] == expected
    assert all(r["confidence"] == pytest.approx(r["probabilities"][r["label"]]) for r in rows)
    out = tmp_path / "out.jsonl"
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "in.csv", index=False)
    assert main(["predict", str(tuned_run), "--input", str(tmp_path / "in.csv"), "--output", str(out)]) == 0
    assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == expected


def test_threshold_needs_two_classes(tmp_path, tiny_overrides, capsys):
    args = ["train", "--no-progress", "--output-dir", str(tmp_path / "r"), "--set", "eval.threshold=tune"]
    assert main(args + sum((["--set", o] for o in tiny_overrides), [])) == 2
    assert "eval.threshold=tune needs two classes; this data has 3" in capsys.readouterr().err


def test_defaults_record_no_threshold_or_calibration(tmp_path, tiny_overrides):
    out = train_cli(tmp_path, tiny_overrides + ["train.epochs=1", "eval.baseline=false"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_at_threshold"] is None and m["calibration"] is None and m["precision_retry"] is None
    old = {k: v for k, v in m.items() if k not in ("test_at_threshold", "validation_at_threshold", "calibration",
                                                   "precision_retry")}
    for split in ("test", "validation"):  # a record written before these fields still loads
        old[split] = {k: v for k, v in old[split].items() if k not in ("mcc", "roc_auc", "log_loss", "brier", "ece")}
    record = RunRecord.model_validate(old)
    assert record.threshold is None and record.temperature == 1.0


# ---------------------------------------------------------------- non-finite loss

def _poison_loss(monkeypatch, from_step: int, only_dtype: torch.dtype | None = None):
    """Make the training loss NaN from optimizer step `from_step` on (1-based)."""
    from peftlab.training.trainer import Trainer

    real = Trainer._loss

    def loss(self, logits, labels, index):
        value = real(self, logits, labels, index)
        if self.state.step + 1 >= from_step and (only_dtype is None or self.runtime.dtype == only_dtype):
            return value * float("nan")
        return value

    monkeypatch.setattr(Trainer, "_loss", loss)


def test_non_finite_loss_stops_the_run_in_one_line(tmp_path, tiny_overrides, monkeypatch, capsys):
    _poison_loss(monkeypatch, from_step=7)
    out = tmp_path / "r"
    args = ["train", "--no-progress", "--output-dir", str(out), "--set", "train.log_every=5"]
    assert main(args + sum((["--set", o] for o in tiny_overrides), [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    # read at the logging step 10, it names step 7, where it first happened, and the likely causes
    assert "the loss became nan at optimizer step 7 (epoch 1)" in err[0] and "learning rate too high" in err[0]
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "failed" and "NonFiniteLoss" in m["error"]


def test_auto_precision_retries_once_in_fp32(tmp_path, tiny_overrides, monkeypatch):
    from peftlab import runtime as rt
    from peftlab.training.trainer import RETRY_REASON

    monkeypatch.setenv(rt.CPU_BF16_ENV, "1")  # a CPU with bf16 units: auto trains in bf16
    _poison_loss(monkeypatch, from_step=4, only_dtype=torch.bfloat16)  # a 16-bit overflow, gone in fp32
    out = train_cli(tmp_path, tiny_overrides + ["train.log_every=5", "eval.baseline=false"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["efficiency"]["precision"] == "float32"
    # the fp32 run rebuilt the model: its frozen weights back in fp32 (bf16 in the first try)
    assert m["efficiency"]["frozen_dtype"] == "float32" and m["efficiency"]["precision_reason"] == RETRY_REASON
    retry = m["precision_retry"]
    assert retry["from_precision"] == "bfloat16" and retry["to_precision"] == "float32" and retry["step"] == 4
    assert "bfloat16 overflow" in retry["reason"]
    steps = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"][:2] == [5, 10]  # the fp32 run's only
    assert m["efficiency"]["optimizer_steps"] == 30


def test_explicit_16_bit_does_not_retry(tmp_path, tiny_overrides, monkeypatch):
    _poison_loss(monkeypatch, from_step=2)
    args = ["train", "--no-progress", "--output-dir", str(tmp_path / "r"), "--set", "train.precision=bf16"]
    assert main(args + sum((["--set", o] for o in tiny_overrides), [])) == 2


def test_loss_is_read_only_at_logging_steps(tmp_path, tiny_overrides, monkeypatch):
    """The finiteness check adds no host sync: the trainer and its step engine read a tensor on the host
    (Tensor.item / Tensor.cpu) once per logging step, as before (AdamW's own reads on CPU are not theirs)."""
    import sys

    from peftlab.training.trainer import Trainer

    calls, inside = [], [False]
    real_item, real_cpu, real_epoch = torch.Tensor.item, torch.Tensor.cpu, Trainer.train_epoch

    def ours() -> bool:
        name = sys._getframe(2).f_code.co_filename
        return inside[0] and (name.endswith("trainer.py") or "engines" in name)

    def item(self):
        if ours():
            calls.append(1)
        return real_item(self)

    def cpu(self, *args, **kwargs):
        if ours():
            calls.append(1)
        return real_cpu(self, *args, **kwargs)

    def train_epoch(self, epoch):
        inside[0] = True
        try:
            return real_epoch(self, epoch)
        finally:
            inside[0] = False

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    out = train_cli(tmp_path, tiny_overrides + ["train.log_every=4", "eval.baseline=false"])
    readings = [r for r in map(json.loads, (out / "history.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [r["step"] for r in readings] == [4, 8, 12, 15, 16, 20, 24, 28, 30]  # every 4th and each epoch's last
    assert len(calls) == len(readings)


def test_serve_answers_like_predict_for_a_calibrated_run(tuned_run, tmp_path):
    """The server applies the run's temperature and threshold exactly as `peftlab predict` does."""
    import torch
    from fastapi.testclient import TestClient

    from peftlab.cli import main
    from peftlab.serve.app import create_app

    texts = pd.read_csv(tuned_run / "predictions.csv")["text"].tolist()[:10]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["predict", str(tuned_run), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 0
    local = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    served = TestClient(create_app([str(tuned_run)], torch.device("cpu"))).post("/predict", json={"texts": texts}).json()
    assert [p["label"] for p in served["predictions"]] == [r["label"] for r in local]
    for p, r in zip(served["predictions"], local):
        assert p["probabilities"] == pytest.approx(r["probabilities"], abs=1e-5)
