"""Training in two processes (DDP over gloo, launched by `peftlab train --nproc 2`) against one process.

With the same global batch and seed, and no dropout, the two runs compute the same thing: each rank
takes half of every batch of 16, DDP averages the two halves' gradients (= the gradient of the mean
over 16), clipping and AdamW then see the same numbers. What differs is the order of floating-point
sums (the all-reduce, per-rank matmuls), so losses agree to ~1e-6 per step; we allow 1e-4 on the final
validation loss after 30 steps."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from peftlab.data.batching import batch_order
from peftlab.training.distributed import Distributed


def test_every_example_once_per_epoch_across_ranks():
    lengths = np.random.default_rng(0).integers(4, 60, size=203)
    for epoch in range(3):
        batches = batch_order(lengths, 16, seed=5, epoch=epoch)
        seen = np.concatenate([Distributed(rank, 2).shard(b) for b in batches for rank in range(2)])
        assert sorted(seen.tolist()) == list(range(203))
        # each global batch is split evenly (to within one example)
        assert all(abs(len(Distributed(0, 2).shard(b)) - len(Distributed(1, 2).shard(b))) <= 1 for b in batches)


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("nodrop")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def _train(tmp_path, name, overrides, nproc):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "peftlab", "train", "--no-progress", "--output-dir", str(out), "--nproc", str(nproc)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_two_processes_match_one(tmp_path, no_dropout_model, topic_data_dir):
    overrides = [f"model.name={no_dropout_model}", f"data.path={topic_data_dir}", "data.max_length=48",
                 "train.epochs=2", "train.batch_size=16", "train.learning_rate=0.05", "method.dropout=0",
                 "output.plots=false", "eval.baseline=false", "train.log_every=1"]
    two, proc = _train(tmp_path, "two", overrides, 2)
    one, _ = _train(tmp_path, "one", overrides, 1)
    m2, m1 = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert m2["status"] == "completed" and m2["efficiency"]["world_size"] == 2 and m1["efficiency"]["world_size"] == 1
    assert m2["efficiency"]["optimizer_steps"] == m1["efficiency"]["optimizer_steps"] == 30
    assert m2["split_sizes"] == m1["split_sizes"]
    assert sum(map(sum, m2["test"]["confusion_matrix"])) == 60  # every test example scored exactly once
    assert abs(m2["validation"]["loss"] - m1["validation"]["loss"]) < 1e-4
    assert m2["test"]["confusion_matrix"] == m1["test"]["confusion_matrix"]
    steps = [json.loads(line) for line in (two / "history.jsonl").read_text().splitlines()]
    losses2 = [r["loss"] for r in steps if r["kind"] == "step"]
    losses1 = [json.loads(line)["loss"] for line in (one / "history.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "step"]
    assert len(losses2) == 30  # one history row per step: only rank 0 writes
    np.testing.assert_allclose(losses2, losses1, atol=1e-4)
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports
