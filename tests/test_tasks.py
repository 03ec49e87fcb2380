"""Both task kinds through the one interface (tasks/base.py's Task): what the trainer, predictor, run
directory, report and serve ask of a task, asked of each kind in the same way."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest_report_helpers import LABELS, make_multilabel_run, make_run
from peftlab import tasks
from peftlab.config import load_config
from peftlab.errors import UserError
from peftlab.runs.rundir import RunDir
from peftlab.tasks.losses import UNLABELED

KINDS = [tasks.get(name) for name in tasks.names()]
NAMES = ["a", "b", "c"]


def _labels(task: tasks.Task, n: int = 12, seed: int = 0) -> np.ndarray:
    """n labels of the task's kind over NAMES, every class / label present (positive)."""
    rng = np.random.default_rng(seed)
    if task.multi_label:
        y = (rng.random((n, len(NAMES))) > 0.5).astype(np.int64)
        y[np.arange(len(NAMES)), np.arange(len(NAMES))] = 1
        return y
    return np.arange(n) % len(NAMES)


def test_the_two_kinds_are_registered_by_name_and_chosen_by_the_config():
    assert tasks.names() == ["multi_label", "single_label"]
    for task in KINDS:
        assert tasks.get(task.name) is task and repr(task) == f"<task {task.name}>"
    assert tasks.for_data(load_config(None, []).data) is tasks.SINGLE_LABEL
    assert tasks.for_data(load_config(None, ["data.multi_label=true"]).data) is tasks.MULTI_LABEL
    with pytest.raises(UserError, match="unknown task 'ranking'"):
        tasks.get("ranking")


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.name)
def test_label_cells_round_trip_through_the_encoding(task):
    """A label column read by the task, written as predictions.csv cells, and parsed back, is itself."""
    raw_cells = ["b|a", "c", "a", "b|c"] if task.multi_label else ["b", "c", "a", "b"]
    raw = SimpleNamespace(label_names=None, where={"train": "train.csv"}, label_column="label")
    names, ids = task.encode_labels({"train": pd.Series(raw_cells)}, raw, "|")
    assert names == NAMES
    cells = task.label_cells(ids["train"], names, "|")
    assert cells == (["a|b", "c", "a", "b|c"] if task.multi_label else raw_cells)
    assert np.array_equal(task.parse_cells(cells, names, "|"), ids["train"])


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.name)
def test_training_loss_at_the_defaults_is_the_library_loss_and_skips_unlabelled_rows(task):
    torch.manual_seed(0)
    labels = _labels(task)
    logits = torch.randn(len(labels), len(NAMES))
    tc = load_config(None, []).train
    loss = task.training_loss(tc, labels, NAMES, torch.device("cpu"))
    y = torch.tensor(labels)
    library = F.binary_cross_entropy_with_logits(logits, y.float()) if task.multi_label else F.cross_entropy(logits, y)
    assert torch.allclose(loss(logits, y), library)
    masked = task.training_loss(tc, labels, NAMES, torch.device("cpu"), unlabeled=True)
    marked = y.clone()
    marked[4:8] = UNLABELED
    keep = torch.tensor([i not in range(4, 8) for i in range(len(labels))])
    assert torch.allclose(masked(logits, marked), loss(logits[keep], y[keep]), atol=1e-6)
    assert task.labelled(marked).tolist() == keep.tolist()


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.name)
def test_class_weights_and_the_soft_loss(task):
    labels = _labels(task)
    assert task.class_weights("none", labels, NAMES) is None
    assert task.class_weights({"c": 3.0}, labels, NAMES).tolist() == [1.0, 1.0, 3.0]
    assert task.class_weights("balanced", labels, NAMES).shape == (len(NAMES),)
    with pytest.raises(UserError, match=f"no {task.label_noun} 'z'"):
        task.class_weights({"z": 2.0}, labels, NAMES)
    torch.manual_seed(1)
    student = torch.randn(6, len(NAMES))
    assert task.soft_loss(student, student, 2.0) < task.soft_loss(student, -student, 2.0)  # the teacher pulls


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.name)
def test_probabilities_decisions_metrics_and_rows(task):
    rng = np.random.default_rng(2)
    labels = _labels(task, 30)
    logits = rng.normal(size=(30, len(NAMES))) + 3 * (labels if task.multi_label else np.eye(len(NAMES))[labels])
    probs = task.probabilities(logits)
    assert ((probs > 0) & (probs < 1)).all()
    assert np.allclose(probs.sum(1), 1) != task.multi_label  # a softmax, or a sigmoid per label
    decided = task.decide(probs)
    assert decided.shape == labels.shape
    scores = task.score_logits(logits, labels, NAMES)
    assert set(task.metrics_names) <= set(scores) and scores["loss"] > 0 and scores["accuracy"] > 0.5
    cooler = task.probabilities(logits, temperature=2.0)
    assert np.abs(cooler - 0.5 * task.multi_label).max() < np.abs(probs - 0.5 * task.multi_label).max() + 1e-12
    row = task.row(probs[0], decided[0], NAMES)
    assert set(row["probabilities"]) == set(NAMES) and json.dumps(row)
    rule = task.rule(NAMES, None, 1.0)
    assert rule["multi_label"] == task.multi_label and json.dumps(rule)
    confidence = task.confidence(probs, decided)
    assert (confidence is not None) == task.prediction_confidence


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.name)
def test_thresholds(task):
    """eval.threshold as the task sees it: argmax is no threshold; a fixed value; a wrong shape is refused."""
    labels = _labels(task, 30)
    two = NAMES[:2] if not task.multi_label else NAMES
    probs = task.probabilities(np.random.default_rng(3).normal(size=(30, len(two))))
    y = labels % 2 if not task.multi_label else labels
    assert task.threshold_for("argmax", probs, y, "macro_f1", "per_label") is None
    fixed = task.threshold_for(0.7, probs, y, "macro_f1", "per_label")
    task.check_threshold(fixed, two)
    at = task.at_threshold(probs, y, two, fixed, "fixed")
    assert at["tuned_for"] == "fixed" and set(task.detail_keys) <= set(at)
    with pytest.raises(ValueError):
        task.check_threshold([0.5] * 5 if task.multi_label else 0.5, NAMES + ["d", "e", "f"])


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.name)
def test_a_run_records_its_task_and_gives_it_back(tmp_path, task):
    """metrics.json names the task; loading the run gives the task back, also from a record written before
    the name was stored (only multi_label), and predictions.csv alone tells the kind too."""
    make = make_multilabel_run if task.multi_label else make_run
    run = RunDir(make(tmp_path, "run"))
    assert json.loads(run.metrics_file.read_text())["task"] == task.name
    assert run.record().kind is task
    older = json.loads(run.metrics_file.read_text())
    del older["task"]
    run.metrics_file.write_text(json.dumps(older))
    assert run.record().kind is task and run.record().task == task.name
    assert tasks.of_predictions(pd.read_csv(run.predictions_file).columns) is task
    assert run.record().label_names == LABELS


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.name)
def test_report_facts(task):
    """What reports, charts and plots ask: each kind answers every question, and its own plots and chart exist."""
    from peftlab.reports.charts import BEST_RUN_CHARTS
    from peftlab.runs.plots import PLOT_SETS

    assert task.best_run_chart in BEST_RUN_CHARTS and task.plot_set in PLOT_SETS
    assert {k for k, _ in task.chart_scores} <= set(task.metrics_names)
    assert {k for k, _ in task.validation_curves} <= set(task.metrics_names)
    assert task.selection_metrics >= {"accuracy", "macro_f1"}
    assert task.metric_label("macro_f1") == "macro-F1"
    assert set((task.report_columns or {}).values()) <= set(task.metrics_names)


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.name)
def test_loss_skips_ignore_index_says_what_the_loss_does(task):
    """A padded row labelled -100 (cuda_graphs' partial batch) leaves the plain loss as it was exactly when
    the task says its loss skips the ignore index."""
    torch.manual_seed(3)
    labels = torch.tensor(_labels(task, 6))
    logits = torch.randn(len(labels) + 1, len(NAMES))
    padded = torch.cat([labels, torch.full_like(labels[:1], UNLABELED)])
    loss = task.training_loss(load_config(None, []).train, labels.numpy(), NAMES, torch.device("cpu"))
    try:
        same = torch.allclose(loss(logits, padded), loss(logits[:-1], labels))
    except (RuntimeError, ValueError, IndexError):
        same = False
    assert same == task.loss_skips_ignore_index
    assert task.exclusive_classes == (labels.ndim == 1)


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.name)
def test_every_kind_answers_the_whole_interface(task):
    """What tasks/base.py's Task leaves open (raises NotImplementedError), each kind implements."""
    import inspect

    open_ = [n for n, v in vars(tasks.Task).items() if callable(v) and not n.startswith("_")
             and "raise NotImplementedError" in inspect.getsource(v)]
    assert len(open_) > 15
    assert [n for n in open_ if getattr(type(task), n) is getattr(tasks.Task, n)] == []
    assert task.name and task.title and task.problem_type and task.metrics_names and task.plot_set
