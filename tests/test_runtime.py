"""Precision, gradient scaling and the resumable training state."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from peftlab import runtime as rt
from peftlab.training.trainer import TrainState
from tests.test_train import train_cli


def test_only_fp16_gets_a_grad_scaler():
    cpu = torch.device("cpu")
    assert isinstance(rt.grad_scaler(cpu, torch.float16), torch.amp.GradScaler)
    assert rt.grad_scaler(cpu, torch.bfloat16) is None and rt.grad_scaler(cpu, torch.float32) is None
    assert rt.pick_precision("auto", cpu) == torch.float32


def test_train_state_round_trip_restores_every_generator():
    state = TrainState(epoch=2, step=30, best=0.9, best_epoch=2, tokens=1234)
    saved = state.state_dict()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    restored = TrainState()
    restored.load_state_dict(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws  # the same stream again
    assert (restored.epoch, restored.step, restored.best, restored.tokens) == (2, 30, 0.9, 1234)


def _fp16_run(tmp_path, tiny_overrides, device: str):
    import json

    out = train_cli(tmp_path, tiny_overrides + ["train.precision=fp16", f"train.device={device}",
                                                "train.learning_rate=0.05", "train.epochs=3"])
    return json.loads((out / "metrics.json").read_text()), out


def test_fp16_training_on_cpu_uses_loss_scaling_and_learns(tmp_path, tiny_overrides, monkeypatch):
    steps = []
    real_step = torch.amp.GradScaler.step

    def counting_step(self, optimizer, *args, **kwargs):
        steps.append(self.get_scale())
        return real_step(self, optimizer, *args, **kwargs)
    monkeypatch.setattr(torch.amp.GradScaler, "step", counting_step)
    m, _ = _fp16_run(tmp_path, tiny_overrides, "cpu")
    assert m["status"] == "completed" and m["efficiency"]["precision"] == "float16"
    assert len(steps) == m["efficiency"]["optimizer_steps"] and steps[0] == 65536.0  # every step went through the scaler
    assert m["validation"]["accuracy"] > 0.5  # three topics: chance is 1/3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_training_on_cuda(tmp_path, tiny_overrides):
    m, _ = _fp16_run(tmp_path, tiny_overrides, "cuda")
    assert m["status"] == "completed" and m["efficiency"]["precision"] == "float16"
    assert m["validation"]["accuracy"] > 0.5
