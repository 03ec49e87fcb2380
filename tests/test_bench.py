"""`peftlab bench`: scenario files, the FLOPs/MFU arithmetic, and one real (tiny) benchmark that runs
peftlab and the reference baseline script side by side."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from peftlab.bench import flops, scenarios
from peftlab.cli import main
from tests.conftest import REPO

BASELINE = REPO.parent / "shared" / "bench" / "hf_trainer_baseline.py"
SST2 = REPO.parent / "shared" / "data" / "sst2"
CONTENDER_FIELDS = {"real_tokens_per_second", "samples_per_second", "peak_memory_bytes", "peak_memory_kind",
                    "test_accuracy", "test_macro_f1", "optimizer_steps", "train_seconds", "precision", "mfu",
                    "model_flops_per_token", "runs"}


def test_repository_scenarios_load():
    source = REPO / "bench" / "scenarios.yaml"
    assert {"cpu-sst2", "cpu-imdb", "gpu-sst2", "gpu-imdb"} <= set(scenarios.names(source))
    for name in scenarios.names(source):
        s = scenarios.load(name, source)
        for part in s.parts:
            assert part.batch_size == 32 and part.max_length == 128 and part.learning_rate == 3e-4
            assert part.lora == {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["query", "value"]}
        assert s.path(s.parts[0].data) == (REPO.parent / "shared" / "data" / s.parts[0].data.split("/")[-1]).resolve()
    gpu = scenarios.load("gpu-imdb", source)
    assert [p.model for p in gpu.parts] == ["random:bert-base", "minilm-l6"] and gpu.parts[1].epochs == 2


def test_scenario_file_errors_are_one_line(tmp_path):
    from peftlab.errors import UserError

    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump({"scenarios": {"x": {"device": "cpu", "data": "d", "model": "m", "batchsize": 3}}}))
    with pytest.raises(UserError, match="unknown key 'batchsize'"):
        scenarios.load("x", bad)
    with pytest.raises(UserError, match="unknown scenario 'y'"):
        scenarios.load("y", bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_scenario_without_gpu_is_one_clear_error(capsys):
    assert main(["bench", "--scenario", "gpu-sst2", "--scenarios", str(REPO / "bench" / "scenarios.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs a CUDA GPU" in err and "Traceback" not in err


def test_flops_and_mfu():
    bert_base = flops.non_embedding_params("random:bert-base")
    assert 85e6 < bert_base < 87e6  # 12 x (4 x 768^2 + 2 x 768 x 3072 + biases, norms) + pooler, head
    # LoRA on bert-base: about 350 MFLOP per real token (2 forward + 2 backward through activations)
    assert flops.flops_per_token(bert_base, "lora") == 4 * bert_base
    assert flops.flops_per_token(bert_base, "full") == 6 * bert_base
    assert flops.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_bf16_flops("NVIDIA L40S") == 362e12 and flops.peak_bf16_flops("NVIDIA L4") == 121e12
    assert flops.peak_bf16_flops("cpu") is None and flops.mfu(1000.0, 1e9, None) is None
    assert flops.mfu(2e6, 4 * bert_base, 989e12) == pytest.approx(2e6 * 4 * bert_base / 989e12)


@pytest.mark.skipif(not BASELINE.is_file() or not SST2.is_dir(), reason="needs ../shared/bench and ../shared/data")
def test_tiny_benchmark_writes_consistent_results(tmp_path, tiny_model_dir):
    scenario_file = tmp_path / "scenarios.yaml"
    scenario_file.write_text(yaml.safe_dump({"scenarios": {"tiny": {
        "device": "cpu", "baseline": str(BASELINE), "data": str(SST2), "train_file": "train.jsonl.gz",
        "test_file": "validation.jsonl.gz", "max_train": 96, "max_test": 40, "validation_rows": 16,
        "epochs": 1, "batch_size": 32, "max_length": 128, "learning_rate": 3e-4, "seed": 42, "repeats": 1,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["query", "value"]},
        "peftlab": {}, "variants": {}, "parts": [{"name": "main", "model": str(tiny_model_dir)}]}}}))
    out = tmp_path / "results"
    assert main(["bench", "--scenario", "tiny", "--scenarios", str(scenario_file), "--output-dir", str(out),
                 "--threads", "1"]) == 0
    result = json.loads((out / "tiny.json").read_text())

    assert result["scenario"] == "tiny" and result["device"] == "cpu"
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "python"}
    assert result["host"]["omp_num_threads"] == "1" and len(result["host"]["load_average_before"]) == 3
    part = result["parts"][0]
    assert part["data"]["train_rows"] == 96 and part["data"]["test_rows"] == 40
    assert part["orders"] == [["peftlab", "seed", "tuned"]]
    contenders = result["contenders"]
    assert set(contenders) == {"peftlab", "seed", "tuned"} and contenders == part["contenders"]
    for name, c in contenders.items():
        assert c["ok"] and CONTENDER_FIELDS <= set(c), name
        assert c["optimizer_steps"] == 3  # 96 rows / batch 32, one epoch: the same for everyone
        assert c["real_tokens_per_second"] > 0 and c["samples_per_second"] > 0 and c["peak_memory_bytes"] > 0
        assert 0 <= c["test_accuracy"] <= 1 and 0 <= c["test_macro_f1"] <= 1
        assert c["mfu"] is None  # no bf16 peak for a CPU
        # samples/s and tokens/s describe the same seconds: 96 samples in train_seconds
        assert c["samples_per_second"] * c["train_seconds"] == pytest.approx(96, rel=0.02)
    assert contenders["seed"]["padding"] == "max_length" and contenders["tuned"]["padding"] == "dynamic"
    assert part["same_optimizer_steps"] and part["real_tokens_agree"]
    tps = {n: c["real_tokens_per_second"] for n, c in contenders.items()}
    assert result["ratio_vs_seed"] == pytest.approx(tps["peftlab"] / tps["seed"], abs=0.006)
    assert result["ratio_vs_tuned"] == pytest.approx(tps["peftlab"] / tps["tuned"], abs=0.006)
    assert part["ratios"]["peftlab"] == {"ratio_vs_seed": result["ratio_vs_seed"], "ratio_vs_tuned": result["ratio_vs_tuned"]}
    assert not any(Path(p).name.startswith("peftlab-bench") for p in tmp_path.iterdir())  # no work files left here
