"""`peftlab train` and `peftlab predict` end to end, through the real CLI, on a tiny BERT."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from peftlab.cli import main
from peftlab.runs.rundir import RunDir
from peftlab.config import load_config
from peftlab.models.build import build_model
from peftlab.models.params import count_parameters

METHODS = ["full", "lora", "qlora", "ia3"]


def train_cli(tmp_path: Path, overrides: list[str], name: str = "run") -> Path:
    out = tmp_path / name
    args = ["train", "--no-progress", "--output-dir", str(out)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, topic_data_dir):
    overrides = [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48",
                 "train.epochs=3", "train.batch_size=16", "train.learning_rate=0.05"]
    return train_cli(tmp_path_factory.mktemp("lora"), overrides)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_records(tmp_path, tiny_overrides, method):
    out = train_cli(tmp_path, tiny_overrides + [f"method.name={method}"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["method"] == method
    assert set(m["test"]) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "confidence"}
    assert sum(map(sum, m["test"]["confusion_matrix"])) == 60 == m["split_sizes"]["test"]
    assert set(m["efficiency"]) >= {"train_seconds", "train_samples_per_second", "train_tokens_per_second",
                                    "peak_memory_bytes", "device"}
    assert m["efficiency"]["optimizer_steps"] == 2 * 15  # 240 examples / batch 16, two epochs
    # params.trainable is exactly what requires grad in the model the method builds
    cfg = load_config(None, tiny_overrides + [f"method.name={method}"])
    built = build_model(cfg, m["label_names"], torch.device("cpu"))
    assert m["params"]["trainable"] == sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    assert m["params"]["trainable"] == count_parameters(built.model)["trainable"]
    weights = out / ("model" if method == "full" else "adapter")
    assert (weights / ("config.json" if method == "full" else "adapter_config.json")).exists()
    assert not (out / "checkpoints").exists()
    assert (out / "config.yaml").exists() and (out / "predictions.csv").exists()
    epochs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    if method == "qlora":  # the tiny BERT's widths (not multiples of 64) stay unquantized: said, not silent
        q = m["quantization"]
        assert q["requested"] == "4bit" and q["used"] == "none" and q["modules_4bit"] == 0
        assert "multiples of 64" in q["reason"]


def test_lora_learns_the_topics(lora_run):
    m = json.loads((lora_run / "metrics.json").read_text())
    assert m["validation"]["accuracy"] > 0.5  # three topics; chance is 1/3
    assert m["baseline"]["test"]["accuracy"] < 0.6  # the fresh head before fine-tuning


def test_predict_reproduces_predictions_csv(lora_run, tmp_path):
    frame = pd.read_csv(lora_run / "predictions.csv")
    inp = tmp_path / "in.csv"
    frame[["text"]].to_csv(inp, index=False)
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(lora_run), "--input", str(inp), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == frame["predicted"].tolist()
    np.testing.assert_allclose([r["confidence"] for r in rows], frame["confidence"], atol=1e-4)


def test_predict_text_to_stdout(lora_run, capsys):
    frame = pd.read_csv(lora_run / "predictions.csv").drop_duplicates("predicted").head(2)
    args = ["predict", str(lora_run)]
    for text in frame["text"]:
        args += ["--text", text]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == frame["predicted"].tolist()
    assert len(set(frame["predicted"])) == 2
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5


def test_adapter_reloads_with_plain_peft(lora_run, tiny_model_dir):
    """The head is saved with the adapter: plain transformers + PeftModel give the same probabilities."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    frame = pd.read_csv(lora_run / "predictions.csv")
    names = json.loads((lora_run / "metrics.json").read_text())["label_names"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=len(names),
                                                              ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(lora_run / "adapter")
    texts = frame["text"].tolist()[:20]
    with torch.no_grad():
        enc = tok(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")
        probs = model(**enc).logits.softmax(-1).numpy()
    expected = frame[[f"prob_{n}" for n in names]].to_numpy()[:20]
    np.testing.assert_allclose(probs, expected, atol=1e-4)


def test_resume_after_kill_during_epoch_two(tmp_path, tiny_overrides):
    """A run killed with SIGKILL during epoch 2 resumes from its epoch-1 checkpoint and completes, with the
    same result as a run that was never interrupted."""
    overrides = [o for o in tiny_overrides if not o.startswith("train.epochs")] + ["train.epochs=3"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "peftlab", "train", "--no-progress", "--output-dir", str(killed)]
    for o in overrides + ["train.log_every=1"]:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = RunDir(killed).history()
        if any(r["kind"] == "step" and r["epoch"] > 1.1 for r in rows) and (killed / "checkpoints" / "last.pt").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert rows and max(r["epoch"] for r in rows if r["kind"] == "step") < 3, "the run was not killed in epoch 2"
    assert not (killed / "metrics.json").exists()  # an interrupted run does not look complete
    assert main(["train", "--no-progress", "--resume", str(killed)]) == 0
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed["status"] == "completed"
    epochs = [json.loads(x)["epoch"] for x in (killed / "history.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "epoch"]
    assert epochs == [1, 2, 3]
    straight = json.loads((train_cli(tmp_path, overrides + ["train.log_every=1"], "straight") / "metrics.json").read_text())
    assert resumed["test"]["confusion_matrix"] == straight["test"]["confusion_matrix"]
    assert abs(resumed["validation"]["loss"] - straight["validation"]["loss"]) < 1e-4


def test_resolved_config_is_saved(lora_run):
    import yaml

    saved = yaml.safe_load((lora_run / "config.yaml").read_text())
    assert saved["method"]["r"] == 16 and saved["train"]["epochs"] == 3
    assert saved["output"]["dir"] == str(lora_run)


def test_default_model_on_bbc_news_subset(tmp_path):
    """The embedded defaults (all-MiniLM-L6-v2, BBC News) end to end on a small subset."""
    out = train_cli(tmp_path, ["data.max_train_samples=60", "data.max_eval_samples=25", "data.max_length=32",
                               "train.epochs=1", "output.plots=true"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["dataset"] == "bbc_news" and m["model"] == "minilm-l6"
    assert len(m["label_names"]) == 5 and m["split_sizes"] == {"train": 60, "validation": 25, "test": 25}
    assert m["params"]["trainable"] == 6 * 2 * 2 * 384 * 16 + 384 * 5 + 5  # LoRA r=16 on query+value, 6 layers, + head
    for png in ("loss.png", "validation.png", "confusion_matrix.png", "confidence.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
