"""Distillation: the loss against a hand computation, teacher logits computed once and cached, any
student method end to end, and teachers in sweeps (trained earlier, or first within the sweep)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from peftlab.cli import main
from peftlab.config import load_config
from peftlab.errors import UserError
from peftlab.runs.rundir import RunDir
from peftlab.runtime import Runtime
from peftlab.training.distill import distill_loss


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_loss_equals_hand_computation():
    student = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-2.0, 3.0, 0.0]])
    teacher = np.array([[1.5, 1.0, -0.5], [0.0, 2.0, -1.0], [-1.0, 2.5, 0.5]])
    labels = np.array([0, 2, 1])
    for alpha, t in ((0.5, 2.0), (0.3, 4.0), (1.0, 2.0), (0.0, 1.0)):
        ce = -np.mean(_log_softmax(student)[np.arange(3), labels])
        log_ps, log_pt = _log_softmax(student / t), _log_softmax(teacher / t)
        kl = np.sum(np.exp(log_pt) * (log_pt - log_ps)) / 3  # KL(teacher || student), mean over the batch
        expected = alpha * ce + (1 - alpha) * t * t * kl
        got = distill_loss(torch.tensor(student), torch.tensor(labels), torch.tensor(teacher), alpha, t)
        assert got.item() == pytest.approx(expected, rel=1e-6)
    # a student that equals its teacher pays only the hard-label part
    same = distill_loss(torch.tensor(student), torch.tensor(labels), torch.tensor(student), 0.4, 3.0)
    assert same.item() == pytest.approx(0.4 * -np.mean(_log_softmax(student)[np.arange(3), labels]), rel=1e-6)
    # and its gradient reaches the student only
    s = torch.tensor(student, requires_grad=True)
    distill_loss(s, torch.tensor(labels), torch.tensor(teacher), 0.5, 2.0).backward()
    assert s.grad is not None and math.isfinite(s.grad.abs().sum().item())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dir, topic_data_dir) -> Path:
    """A full fine-tuning run of the tiny model: the teacher."""
    from peftlab.training.trainer import train

    out = tmp_path_factory.mktemp("teacher") / "teacher"
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48",
                             "train.epochs=3", "train.batch_size=16", "train.learning_rate=0.003", "output.plots=false",
                             "method.name=full", f"output.dir={out}"])
    train(cfg, RunDir(out).create(), progress=False)
    return out


def _student(tiny_overrides, teacher: Path, out: Path, method: str, *extra: str):
    return load_config(None, tiny_overrides + [f"method.name={method}", f"distill.teacher={teacher}",
                                               "distill.alpha=0.3", "distill.temperature=2", f"output.dir={out}", *extra])


def test_teacher_logits_computed_once_and_cached(tmp_path, tiny_overrides, teacher_dir, monkeypatch):
    import peftlab.training.trainer as trainer

    calls = []
    real = trainer.teacher_logits

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(trainer, "teacher_logits", counting)

    out = tmp_path / "student"
    cfg = _student(tiny_overrides, teacher_dir, out, "lora", "train.epochs=3")
    run = RunDir(out).create()

    class Stop(Exception):
        pass

    class StopAfterFirst:
        def on_epoch_end(self, trainer, epoch, scores):
            if epoch == 1:
                raise Stop
    with pytest.raises(Stop):  # interrupted after epoch 1: the cache survives in checkpoints/
        trainer.train(cfg, run, progress=False, callbacks=[StopAfterFirst()])
    assert len(calls) == 1
    cached = np.load(run.checkpoints / "teacher_logits.npy")
    assert cached.shape == (240, 3)
    metrics = trainer.train(cfg, run, resume=True, progress=False)
    assert len(calls) == 1  # three epochs, one resume: the teacher ran once
    assert [r["epoch"] for r in run.history() if r["kind"] == "epoch"] == [1, 2, 3]  # resumed after epoch 1
    assert metrics.status == "completed" and metrics.distill.model_dump() == {
        "teacher": str(teacher_dir), "alpha": 0.3, "temperature": 2.0, "unlabeled": None, "unlabeled_rows": 0}
    # the cached logits are the teacher's own predictions on the training texts
    from peftlab.data import load_data
    from peftlab.training.distill import teacher_logits

    data = load_data(cfg.data, cfg.train.seed)
    again = teacher_logits(cfg.distill, data.train.texts, data.label_names, Runtime(torch.device("cpu"), torch.float32),
                           cfg.data.cache_dir)
    np.testing.assert_allclose(cached, again, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ia3", "full"])
def test_any_student_method_distills(method, tmp_path, tiny_overrides, teacher_dir):
    from peftlab.training.trainer import train

    out = tmp_path / method
    metrics = train(_student(tiny_overrides, teacher_dir, out, method), RunDir(out).create(), progress=False)
    assert metrics.status == "completed" and metrics.method == method
    assert metrics.distill.teacher == str(teacher_dir)
    losses = [r["train_loss"] for r in RunDir(out).history() if r["kind"] == "epoch"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_sweep_trains_its_teacher_first_and_students_use_it(tmp_path, tiny_overrides, teacher_dir):
    from peftlab.sweeps.runner import Options, run_sweep

    cfg = load_config(None, tiny_overrides + [
        "sweep.teacher={method.name: full, train.learning_rate: 0.003}",
        f"sweep.grid={{distill.teacher: [null, teacher, {teacher_dir}]}}",
        "budget.max_trainable_params=5000"])  # the teacher is exempt from the students' budget
    out = tmp_path / "kd"
    summary = run_sweep(cfg, Options(out_dir=out, progress=False))
    names = [c["name"] for c in summary["configurations"]]
    assert names == ["teacher", "lora-nokd", "lora-kd", f"lora-kd-{teacher_dir.name}"]
    assert summary["counts"] == {"completed": 4} and not summary["skipped"]
    configs = {n: json.loads((out / "trials" / n / "metrics.json").read_text()) for n in names}
    assert configs["teacher"]["method"] == "full" and configs["teacher"]["distill"] is None
    assert configs["lora-nokd"]["distill"] is None
    assert configs["lora-kd"]["distill"]["teacher"] == str((out / "trials" / "teacher").resolve())
    assert configs[f"lora-kd-{teacher_dir.name}"]["distill"]["teacher"] == str(teacher_dir.resolve())
    assert summary["best"]["name"] != "teacher"  # the teacher is reported, not a candidate

    # a teacher that does not exist is an error before anything trains
    bad = load_config(None, tiny_overrides + ["sweep.grid={distill.teacher: [runs/nowhere]}"])
    with pytest.raises(UserError, match="no run directory there"):
        run_sweep(bad, Options(out_dir=tmp_path / "bad", progress=False))
    assert not (tmp_path / "bad").exists()


def test_train_cli_rejects_a_missing_teacher(tmp_path, tiny_overrides):
    args = sum((["--set", s] for s in tiny_overrides + [f"distill.teacher={tmp_path / 'none'}"]), [])
    assert main(["train", *args, "--output-dir", str(tmp_path / "s"), "--no-progress"]) == 2


# --- distill.unlabeled: texts only the teacher labels ------------------------------------------

@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("kind,smoothing,weighted", [("cross_entropy", 0.0, False), ("cross_entropy", 0.1, True),
                                                     ("focal", 0.0, True), ("focal", 0.1, False)])
def test_masked_loss_is_the_loss_of_the_labelled_rows(multi_label, kind, smoothing, weighted):
    from peftlab.tasks import MULTI_LABEL, SINGLE_LABEL
    from peftlab.tasks.losses import UNLABELED, hard_label_loss, label_set_loss, masked_hard_loss

    torch.manual_seed(0)
    logits = torch.randn(10, 3)
    labels = (torch.rand(10, 3) > 0.5).long() if multi_label else torch.randint(0, 3, (10,))
    weight = torch.tensor([0.5, 2.0, 1.5]) if weighted else None
    plain = label_set_loss if multi_label else hard_label_loss
    args = (weight, kind, 2.0, smoothing)
    task = MULTI_LABEL if multi_label else SINGLE_LABEL
    assert torch.allclose(masked_hard_loss(task, logits, labels, *args), plain(logits, labels, *args), atol=1e-6)
    marked = labels.clone()
    marked[3:7] = UNLABELED  # rows 3..6 have no label: the loss is that of the others
    keep = torch.tensor([i not in range(3, 7) for i in range(10)])
    assert torch.allclose(masked_hard_loss(task, logits, marked, *args), plain(logits[keep], labels[keep], *args),
                          atol=1e-6)
    none = torch.full_like(labels, UNLABELED)
    assert masked_hard_loss(task, logits, none, *args).item() == 0.0  # a batch of unlabelled texts only


def test_unlabeled_texts_are_labelled_by_the_teacher(tmp_path, tiny_overrides, teacher_dir, topic_data_dir):
    from conftest import make_rows

    test_texts = [json.loads(line)["text"] for line in (topic_data_dir / "test.jsonl").read_text().splitlines()]
    extra = [r["text"] for r in make_rows(100, seed=9)]
    unlabeled = tmp_path / "unlabeled.csv"
    import pandas as pd

    pd.DataFrame({"text": extra + test_texts[:5] + extra[:3]}).to_csv(unlabeled, index=False)
    out = tmp_path / "student"
    code = main(["train", "--output-dir", str(out), *(a for o in tiny_overrides + [
        "method.name=lora", f"distill.teacher={teacher_dir}", "distill.alpha=0.5", f"distill.unlabeled={unlabeled}"]
        for a in ("--set", o))])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    kept = len(set(extra) - set(test_texts))
    assert m["distill"]["unlabeled_rows"] == kept and m["distill"]["unlabeled"] == str(unlabeled)
    assert m["split_sizes"]["train"] == 240  # the labelled rows; the unlabelled ones come on top
    assert m["efficiency"]["optimizer_steps"] == 2 * math.ceil((240 + kept) / 16)
    with pytest.raises(UserError, match="distill.unlabeled needs distill.teacher"):
        load_config(None, [f"distill.unlabeled={unlabeled}"])
    code = main(["train", "--output-dir", str(tmp_path / "missing"), *(a for o in tiny_overrides + [
        f"distill.teacher={teacher_dir}", f"distill.unlabeled={tmp_path / 'nope.csv'}"] for a in ("--set", o))])
    assert code == 2
