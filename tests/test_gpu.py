"""GPU paths (bf16 autocast, fused AdamW, 4-bit QLoRA, the CUDA-graph step engine, torch.compile). Skipped
without CUDA; CI has none. bench/gpu-check runs them on a lent GPU (docs/gpu.md)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import write_bert
from tests.test_train import train_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A small BERT whose linear layers are 128 / 256 wide: bitsandbytes 4-bit needs multiples of 64 (the
    32-wide tiny model gave CUBLAS_STATUS_INTERNAL_ERROR)."""
    return write_bert(tmp_path_factory.mktemp("wide-bert"), hidden_size=128, intermediate_size=256)


def _wide(overrides: list[str], model_dir) -> list[str]:
    return [o if not o.startswith("model.name=") else f"model.name={model_dir}" for o in overrides]


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "step"]


def test_bf16_lora_on_gpu(tmp_path, tiny_overrides):
    m = _metrics(train_cli(tmp_path, tiny_overrides + ["train.device=cuda"]))
    assert m["status"] == "completed"
    assert m["efficiency"]["precision"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert m["efficiency"]["peak_memory_kind"] == "gpu_max_allocated" and m["efficiency"]["peak_memory_bytes"] > 0
    if torch.cuda.is_bf16_supported():
        assert m["efficiency"]["frozen_dtype"] == "bfloat16"  # auto: frozen weights stored in bf16


@needs_bnb
def test_qlora_is_4bit_from_its_modules_and_on_the_gpu(tmp_path, tiny_overrides, wide_model_dir):
    from peftlab.config import load_config
    from peftlab.models.build import build_model

    over = _wide(tiny_overrides, wide_model_dir)
    cfg = load_config(None, over + ["method.name=qlora"])
    built = build_model(cfg, ["a", "b", "c"], torch.device("cuda"))
    q = built.quantization
    # q, k, v, attention output, intermediate, output in each of 2 layers; the head and pooler stay out
    assert q["used"] == "4bit" and q["modules_4bit"] == 12 and q["bytes_4bit"] > 0 and q["skipped_for_width"] == 0
    assert all(p.device.type == "cuda" for p in built.model.parameters())
    m = _metrics(train_cli(tmp_path, over + ["method.name=qlora", "train.epochs=1"]))
    assert m["quantization"]["used"] == "4bit" and m["quantization"]["modules_4bit"] == 12
    lora = _metrics(train_cli(tmp_path, over + ["method.name=lora", "train.epochs=1"], "lora"))
    # packed 4-bit weights are counted by their real shape, so the totals agree (peft #1020)
    assert m["params"]["total"] == lora["params"]["total"]
    assert m["params"]["trainable"] == lora["params"]["trainable"]


@needs_bnb
def test_qlora_on_a_random_shape_is_quantized(tmp_path, tiny_overrides, monkeypatch):
    """random:SHAPE goes through the same loader, so it is quantized too (it used to train unquantized on
    the CPU half of the model while the record said 4-bit)."""
    from peftlab.config import load_config
    from peftlab.models import loading
    from peftlab.models.build import build_model

    monkeypatch.setitem(loading.RANDOM_SHAPES, "wide", dict(hidden_size=128, num_hidden_layers=2,
                                                             num_attention_heads=2, intermediate_size=256))
    cfg = load_config(None, _wide(tiny_overrides, "random:wide") + ["method.name=qlora"])
    built = build_model(cfg, ["a", "b"], torch.device("cuda"))
    assert built.quantization["modules_4bit"] == 12
    assert all(p.device.type == "cuda" for p in built.model.parameters())


def test_cuda_graphs_follow_eager_for_50_steps(tmp_path, tiny_overrides, wide_model_dir):
    over = _wide(tiny_overrides, wide_model_dir) + ["train.max_steps=50", "train.log_every=1", "eval.baseline=false",
                                                    "method.dropout=0.0"]
    eager = train_cli(tmp_path, over + ["train.step_engine=eager"], "eager")
    graphs = train_cli(tmp_path, over + ["train.step_engine=cuda_graphs"], "graphs")
    m = _metrics(graphs)
    assert m["efficiency"]["step_engine"] == "cuda_graphs", m["efficiency"]["step_engine_reason"]
    a, b = _losses(eager), _losses(graphs)
    assert len(a) == len(b) == 50
    # bf16, and dropout draws differ (padded rows, other widths): close, not equal
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.1
    assert abs(sum(a[-10:]) - sum(b[-10:])) / 10 < 0.05


def test_compile_path_sees_matching_labels_and_logits(tmp_path, tiny_overrides, monkeypatch):
    """train.compile once hit a device assertion in nll_loss (labels out of range): every step's labels
    and logits are checked here, on the host, before the loss."""
    from peftlab.training.trainer import Trainer

    real, seen = Trainer._loss, []

    def checked(self, logits, labels, index):
        n_classes = len(self.data.label_names)
        assert logits.shape == (labels.shape[0], n_classes), (logits.shape, labels.shape)
        assert labels.dtype == torch.int64 and int(labels.min()) >= 0 and int(labels.max()) < n_classes, labels
        seen.append(tuple(logits.shape))
        return real(self, logits, labels, index)

    monkeypatch.setattr(Trainer, "_loss", checked)
    m = _metrics(train_cli(tmp_path, tiny_overrides + ["train.compile=true", "train.epochs=1", "eval.baseline=false"]))
    assert m["status"] == "completed" and len(seen) == m["efficiency"]["optimizer_steps"]
