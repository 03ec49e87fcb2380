"""Per-step losses of the tiny model pinned (torchtune's recipe tests do the same): recorded once with
the real CLI and compared to 1e-5, so a refactor of the training path that changes what is computed
(batch order, seeding, schedule, loss, the first-token-only trick) fails here, not silently."""
from __future__ import annotations

import json

import pytest

from peftlab.cli import main

# recorded with peftlab 0.1.0 (torch 2.13.0+cpu, transformers 5.23.0, peft 0.21.2, 1 thread)
EXPECTED = {
    "lora": [1.096662163734436, 1.119871735572815, 1.161415934562683, 1.042083740234375,
             1.063240647315979, 1.1788203716278076, 1.0605981349945068, 1.021280288696289],
    "full": [1.0981290340423584, 1.104262351989746, 1.1148698329925537, 1.0924996137619019,
             1.0866632461547852, 1.1214485168457031, 1.08176589012146, 1.0651496648788452],
}
LEARNING_RATE = {"lora": 0.05, "full": 0.005}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_per_step_losses_are_pinned(tmp_path, tiny_model_dir, topic_data_dir, method):
    out = tmp_path / method
    args = ["train", "--no-progress", "--output-dir", str(out)]
    for o in [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48",
              "train.max_steps=8", "train.batch_size=16", f"train.learning_rate={LEARNING_RATE[method]}",
              "train.log_every=1", "output.plots=false", "eval.baseline=false", f"method.name={method}",
              "train.seed=7", "train.precision=fp32"]:  # fp32 figures, whatever the CPU (auto: bf16 where it has bf16 units)
        args += ["--set", o]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "step"]
    assert losses == pytest.approx(EXPECTED[method], abs=1e-5)
