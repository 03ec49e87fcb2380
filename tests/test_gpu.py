"""GPU paths (bf16 autocast, fused AdamW, 4-bit QLoRA). Skipped without CUDA; CI has none."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.test_train import train_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_lora_on_gpu(tmp_path, tiny_overrides):
    m = json.loads((train_cli(tmp_path, tiny_overrides + ["train.device=cuda"]) / "metrics.json").read_text())
    assert m["status"] == "completed"
    assert m["efficiency"]["precision"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert m["efficiency"]["peak_memory_kind"] == "gpu_max_allocated" and m["efficiency"]["peak_memory_bytes"] > 0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_uses_4bit_and_counts_real_parameters(tmp_path, tiny_overrides):
    m = json.loads((train_cli(tmp_path, tiny_overrides + ["method.name=qlora"]) / "metrics.json").read_text())
    assert m["quantization"] == {"requested": "4bit", "used": "4bit", "reason": None}
    lora = json.loads((train_cli(tmp_path, tiny_overrides + ["method.name=lora"], "lora") / "metrics.json").read_text())
    # packed 4-bit weights are counted by their real shape, so the totals agree (peft #1020)
    assert m["params"]["total"] == lora["params"]["total"]
    assert m["params"]["trainable"] == lora["params"]["trainable"]
