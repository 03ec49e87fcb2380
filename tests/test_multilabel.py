"""Multi-label classification: reading label sets, stratified splits, losses, metrics against
scikit-learn, thresholds, and a real run whose figures recompute from its predictions.csv."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, hamming_loss, precision_recall_fscore_support, roc_auc_score

from peftlab.config import load_config
from peftlab.data import load_data
from peftlab.data.splits import carve, strata
from peftlab.errors import UserError
from peftlab.tasks.multi_label_metrics import (decide, decision_scores, fit_temperature, multilabel_metrics, sigmoid,
                                           tune_thresholds)
from peftlab.tasks import MULTI_LABEL
from peftlab.tasks.losses import label_set_loss

DEBTAGS = Path(__file__).parent / "data" / "debtags_sample.jsonl"


def _data(path: Path, *overrides: str):
    cfg = load_config(None, [f"data.path={path}", "data.multi_label=true", *overrides])
    return load_data(cfg.data, 0)


# --- reading -----------------------------------------------------------------------------------

def test_label_lists_and_separated_strings_read_alike(tmp_path):
    rows = [("a b", ["x", "y"]), ("c d", ["y"]), ("e f", []), ("g h", ["z", "x"])] * 10
    (tmp_path / "lists").mkdir()
    with open(tmp_path / "lists" / "train.jsonl", "w") as f:
        for text, labels in rows:
            f.write(json.dumps({"text": text, "label": labels}) + "\n")
    (tmp_path / "strings").mkdir()
    pd.DataFrame({"text": [t for t, _ in rows], "label": [";".join(ls) for _, ls in rows]}).to_csv(
        tmp_path / "strings" / "train.csv", index=False)
    (tmp_path / "parquet").mkdir()
    pd.DataFrame({"text": [t for t, _ in rows], "label": [ls for _, ls in rows]}).to_parquet(
        tmp_path / "parquet" / "train.parquet")
    a = _data(tmp_path / "lists")
    b = _data(tmp_path / "strings", "data.label_separator=;")
    c = _data(tmp_path / "parquet")
    assert a.label_names == b.label_names == c.label_names == ["x", "y", "z"]
    assert a.task is MULTI_LABEL
    for split in ("train", "validation", "test"):
        assert np.array_equal(getattr(a, split).labels, getattr(b, split).labels)
        assert np.array_equal(getattr(a, split).labels, getattr(c, split).labels)
    whole = np.concatenate([a.train.labels, a.validation.labels, a.test.labels])
    assert whole.shape == (40, 3) and set(whole.sum(1)) == {0, 1, 2}  # empty sets are rows too


def test_integer_label_ids_with_names_and_json_in_csv(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(["neg", "pos", "meh"]))
    rows = [{"text": f"t{i}", "label": json.dumps([i % 2, 2] if i % 3 else [i % 2])} for i in range(30)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    data = _data(tmp_path / "train.csv")
    assert data.label_names == ["neg", "pos", "meh"]  # labels.json order
    loaded = {t: tuple(row) for split in (data.train, data.validation, data.test) for t, row in zip(split.texts, split.labels)}
    assert loaded["t1"] == (0, 1, 1) and loaded["t3"] == (0, 1, 0) and loaded["t0"] == (1, 0, 0)


def test_bad_label_sets_are_one_line(tmp_path):
    (tmp_path / "one").mkdir()
    with open(tmp_path / "one" / "train.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"t{i}", "label": ["only"]}) + "\n")
    with pytest.raises(UserError, match="needs at least 2 labels"):
        _data(tmp_path / "one")
    (tmp_path / "unseen").mkdir()
    for split, labels in (("train", ["a", "b"]), ("test", ["a", "c"])):
        with open(tmp_path / "unseen" / f"{split}.jsonl", "w") as f:
            for i in range(10):
                f.write(json.dumps({"text": f"{split}{i}", "label": labels}) + "\n")
    with pytest.raises(UserError, match="'c'.*never occur in the train split") as e:
        _data(tmp_path / "unseen")
    assert "\n" not in str(e.value)
    (tmp_path / "nested").mkdir()
    with open(tmp_path / "nested" / "train.jsonl", "w") as f:
        f.write(json.dumps({"text": "t", "label": [["a"]]}) + "\n")
    with pytest.raises(UserError, match="row 1 has label"):
        _data(tmp_path / "nested")


def test_rarest_label_stratification_reaches_every_split():
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 6)) < [0.5, 0.4, 0.3, 0.2, 0.05, 0.02]).astype(np.int64)
    keys, names = strata(labels, list("abcdef"))
    counts = np.bincount(keys)
    assert len(names) == 7 and counts[counts > 0].min() >= 2  # no group of one row
    kept, carved = carve(labels, 0.25, 0, purpose="test", where="x", label_names=list("abcdef"))
    assert len(set(kept) | set(carved)) == 400 and not set(kept) & set(carved)
    for j in range(6):  # every label in (nearly) the same share on both sides
        share = labels[carved, j].sum() / labels[:, j].sum()
        assert abs(share - 0.25) < 0.12, (j, share)


def test_debtags_sample_is_real_multilabel_data():
    data = _data(DEBTAGS, "data.label_column=labels")
    assert len(data.label_names) == 12 and all("::" in n for n in data.label_names)
    y = np.concatenate([data.train.labels, data.validation.labels, data.test.labels])
    assert y.shape[0] == 360 and y.sum(1).min() >= 1 and (y.sum(1) >= 2).sum() > 30
    assert all(data.test.labels.sum(0) > 0)  # stratification put every tag into test


# --- losses and metrics ------------------------------------------------------------------------

def test_label_set_loss_matches_torch_and_its_options():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 3), (torch.rand(8, 3) > 0.5).long()
    plain = label_set_loss(logits, labels, None, "cross_entropy", 2.0, 0.0)
    assert torch.allclose(plain, F.binary_cross_entropy_with_logits(logits, labels.float()))
    assert torch.allclose(label_set_loss(logits, labels, None, "focal", 0.0, 0.0), plain)  # gamma 0 = BCE
    assert label_set_loss(logits, labels, None, "focal", 2.0, 0.0) < plain
    smooth = label_set_loss(logits, labels, None, "cross_entropy", 2.0, 0.2)
    assert torch.allclose(smooth, F.binary_cross_entropy_with_logits(logits, labels.float() * 0.8 + 0.1))
    y = np.array([[1, 0], [1, 0], [1, 1], [0, 0]])
    assert MULTI_LABEL.class_weights("balanced", y, ["a", "b"]).tolist() == pytest.approx([1 / 3, 3.0])
    assert MULTI_LABEL.class_weights({"b": 2.0}, y, ["a", "b"]).tolist() == [1.0, 2.0]
    same = MULTI_LABEL.soft_loss(logits, logits, 2.0)
    other = MULTI_LABEL.soft_loss(logits, -logits, 2.0)
    assert other > same  # the soft targets are the teacher's sigmoid


def test_multilabel_metrics_agree_with_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 5)) < 0.3).astype(int)
    probs = np.clip(y * 0.6 + rng.random((200, 5)) * 0.5, 0, 1)
    p = decide(probs)
    m = multilabel_metrics(y, probs, list("abcde"))
    assert m["micro_f1"] == pytest.approx(f1_score(y, p, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["samples_f1"] == pytest.approx(f1_score(y, p, average="samples", zero_division=1.0))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, p))
    assert m["accuracy"] == pytest.approx((y == p).all(1).mean())
    assert m["roc_auc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], probs[:, j]) for j in range(5)]))
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, zero_division=0)
    for j, name in enumerate("abcde"):
        assert m["per_class"][name]["f1"] == pytest.approx(f1[j]) and m["per_class"][name]["support"] == sup[j]
        (tn, fp), (fn, tp) = m["label_confusion"][name]
        assert tp + fn == sup[j] and tn + fp + fn + tp == 200


def test_tuned_thresholds_beat_half_on_the_data_they_were_tuned_on():
    rng = np.random.default_rng(2)
    y = (rng.random((300, 4)) < 0.25).astype(int)
    probs = np.clip(0.15 + y * 0.3 + rng.normal(0, 0.12, y.shape), 0, 1)  # positives sit below 0.5
    per_label = tune_thresholds(probs, y, "macro_f1", per_label=True)
    one = tune_thresholds(probs, y, "micro_f1", per_label=False)
    assert len(set(one)) == 1 and all(t < 0.5 for t in per_label)
    base = decision_scores(y, decide(probs))
    tuned = decision_scores(y, decide(probs, per_label))
    assert tuned["macro_f1"] > base["macro_f1"] + 0.2
    assert decision_scores(y, decide(probs, one))["micro_f1"] >= base["micro_f1"]
    for j, t in enumerate(per_label):  # each label's F1 is the best any threshold gives
        best = max(f1_score(y[:, j], probs[:, j] >= c, zero_division=0) for c in np.linspace(0, 1, 201))
        assert f1_score(y[:, j], probs[:, j] >= t, zero_division=0) >= best - 1e-12


def test_temperature_for_sigmoids():
    rng = np.random.default_rng(3)
    y = (rng.random((500, 3)) < 0.4).astype(int)
    logits = (y * 2 - 1) * 1.0 + rng.normal(0, 1.5, y.shape)
    t = fit_temperature(logits * 4, y)  # four times overconfident: T brings it back
    assert 3.0 < t < 5.5
    assert sigmoid(np.array([[0.0, 50.0, -50.0]])).tolist() == [[0.5, 1.0, pytest.approx(0.0, abs=1e-20)]]


# --- a real run --------------------------------------------------------------------------------

def _train(overrides: list[str], out: Path) -> dict:
    from peftlab.cli import main

    assert main(["train", "--output-dir", str(out), *(a for o in overrides for a in ("--set", o))]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_multilabel_run_learns_and_recomputes_from_predictions_csv(multi_label_overrides, tmp_path):
    over = [*multi_label_overrides, "method.name=full", "train.learning_rate=0.003", "train.epochs=4",
            "eval.threshold=tune", "eval.calibrate=temperature"]
    m = _train(over, tmp_path / "run")
    assert m["multi_label"] and m["label_names"] == ["food", "sport", "tech"]
    assert m["test"]["macro_f1"] > m["baseline"]["test"]["macro_f1"] + 0.15  # it learned
    assert m["test"]["confusion_matrix"] is None and set(m["test"]["label_confusion"]) == {"food", "sport", "tech"}
    at = m["test_at_threshold"]
    assert set(at["thresholds"]) == {"food", "sport", "tech"} and at["tuned_for"] == "macro_f1"
    assert m["calibration"]["temperature"] > 0

    frame = pd.read_csv(tmp_path / "run" / "predictions.csv", keep_default_na=False)
    names = m["label_names"]
    probs = frame[[f"prob_{n}" for n in names]].to_numpy()
    truth = np.array([[n in cell.split("|") for n in names] for cell in frame["label"]], dtype=int)
    # the stored rule: temperature on the logits, then each label's threshold
    t = m["calibration"]["temperature"]
    calibrated = sigmoid(np.log(probs / (1 - probs)) / t)
    decided = decide(calibrated, [at["thresholds"][n] for n in names])
    assert frame["predicted"].tolist() == ["|".join(n for n, d in zip(names, row) if d) for row in decided]
    again = multilabel_metrics(truth, calibrated, names, decided)
    for key in ("accuracy", "macro_f1", "micro_f1", "samples_f1", "hamming_loss"):
        assert again[key] == pytest.approx(at[key], abs=1e-12), key
    plain = multilabel_metrics(truth, probs, names)  # the default rule (0.5) gives the test figures
    for key in ("accuracy", "macro_f1", "micro_f1", "samples_f1", "hamming_loss", "log_loss", "roc_auc"):
        assert plain[key] == pytest.approx(m["test"][key], abs=1e-9), key

    from peftlab import load_run

    run = load_run(tmp_path / "run")
    rows = run.predict(frame["text"].tolist()[:20])
    assert [r["labels"] for r in rows] == [c.split("|") if c else [] for c in frame["predicted"][:20]]


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_every_method_trains_multilabel_with_the_same_head(multi_label_overrides, tmp_path, method):
    from peftlab.models.params import count_config

    m = _train([*multi_label_overrides, f"method.name={method}", "train.epochs=1"], tmp_path / method)
    cfg = load_config(None, [*multi_label_overrides, f"method.name={method}"])
    assert m["params"]["trainable"] == count_config(cfg).trainable  # the head is 3 labels wide, as counted
    assert np.isfinite(m["test"]["loss"]) and m["multi_label"]


def test_eval_settings_that_do_not_fit_are_one_line(tiny_overrides, multi_label_overrides, tmp_path):
    from peftlab.cli import main

    code = main(["train", "--output-dir", str(tmp_path / "a"), *(a for o in [*tiny_overrides, "eval.metric=micro_f1"]
                                                                  for a in ("--set", o))])
    assert code != 0
    code = main(["train", "--output-dir", str(tmp_path / "b"), *(a for o in [*tiny_overrides, "eval.threshold=0.3"]
                                                                  for a in ("--set", o))])
    assert code != 0  # three classes: a threshold needs two
    m = _train([*multi_label_overrides, "train.epochs=1", "eval.metric=micro_f1", "eval.threshold=0.3"], tmp_path / "c")
    assert m["test_at_threshold"]["thresholds"] == {"food": 0.3, "sport": 0.3, "tech": 0.3}
    assert m["test_at_threshold"]["tuned_for"] == "fixed" and m["validation"]["micro_f1"] is not None


def test_multilabel_distillation_takes_a_multilabel_teacher_only(multi_label_overrides, tiny_overrides,
                                                                   label_set_data_dir, tmp_path):
    teacher = tmp_path / "teacher"
    _train([*multi_label_overrides, "method.name=full", "train.learning_rate=0.003", "train.epochs=3"], teacher)
    student = _train([*multi_label_overrides, "train.epochs=1", f"distill.teacher={teacher}", "distill.alpha=0.3",
                      "distill.temperature=2"], tmp_path / "student")
    assert student["distill"]["teacher"] == str(teacher) and np.isfinite(student["test"]["loss"])
    from peftlab.cli import main

    # the same label names as a single-label dataset, but one label per text: the teacher does not fit
    single = tmp_path / "single"
    single.mkdir()
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (label_set_data_dir / f"{split}.jsonl").read_text().splitlines()]
        with open(single / f"{split}.jsonl", "w") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({"text": row["text"], "label": ["food", "sport", "tech"][i % 3]}) + "\n")
    code = main(["train", "--output-dir", str(tmp_path / "bad"), "--set", f"data.path={single}",
                 *(a for o in multi_label_overrides[:1] + ["train.epochs=1", f"distill.teacher={teacher}"]
                   for a in ("--set", o))])
    assert code != 0
    assert "multi-label run and the student is single-label" in (tmp_path / "bad" / "metrics.json").read_text()
