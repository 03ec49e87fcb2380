"""`peftlab bench`: scenario files, the FLOPs/MFU arithmetic, and one real (tiny) benchmark that runs
peftlab and the reference baseline script side by side."""
from __future__ import annotations

import json
import os
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
            # CPU scenarios at 1e-3: at 3e-4 their few steps left every contender at chance
            assert part.batch_size == 32 and part.max_length == 128
            assert part.learning_rate == (1e-3 if s.device == "cpu" else 3e-4)
            targets = ["q_proj", "v_proj"] if part.name == "decoder" else ["query", "value"]
            assert part.lora == {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": targets}
        assert s.path(s.parts[0].data) == (REPO.parent / "shared" / "data" / s.parts[0].data.split("/")[-1]).resolve()
    gpu = scenarios.load("gpu-imdb", source)
    assert [p.model for p in gpu.parts] == ["random:bert-base", "minilm-l6"] and gpu.parts[1].epochs == 2
    for name in ("gpu-sst2", "gpu-imdb"):  # the engines and QLoRA compared; no contender that compiles for minutes
        speed = scenarios.load(name, source).parts[0]
        assert speed.variants["graphs"] == {"train.step_engine": "cuda_graphs"} and "qlora" in speed.variants
        assert not any("train.compile" in v for p in scenarios.load(name, source).parts for v in p.variants.values())


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


def test_ratios_between_runs_at_chance_are_not_results():
    from peftlab.bench.runner import at_chance
    from peftlab.cli.bench import summary

    learnt = {"a": {"ok": True, "test_accuracy": 0.78}, "b": {"ok": True, "test_accuracy": 0.51}}
    assert not at_chance(learnt, 0.509)
    chance = {"a": {"ok": True, "test_accuracy": 0.509}, "b": {"ok": True, "test_accuracy": 0.52}, "c": {"ok": False}}
    assert at_chance(chance, 0.509)
    c = {"ok": True, "kind": "peftlab", "real_tokens_per_second": 300.0, "samples_per_second": 3.0, "peak_memory_bytes": 2**20,
         "test_accuracy": 0.509, "test_macro_f1": 0.34, "mfu": None, "step_engine": "eager"}
    result = {"scenario": "s", "device": "cpu", "host": {"load_average_before": None, "load_average_after": None},
              "parts": [{"name": "main", "model": "m", "data": {"train_rows": 96, "test_rows": 40, "chance_accuracy": 0.509},
                         "settings": {"epochs": 1}, "contenders": {"peftlab": c}, "all_at_chance": True,
                         "ratios": {"peftlab": {"ratio_vs_seed": 1.5, "ratio_vs_tuned": 2.0}}}]}
    text = summary(result)
    assert "(1.50)" in text and "(2.00)" in text and "nothing was learnt" in text
    result["parts"][0]["all_at_chance"] = False
    assert "(1.50)" not in summary(result) and " 1.50" in summary(result)


def test_cpu_scenarios_weigh_auto_against_fp32_and_a_bf16_tuned_trainer(monkeypatch):
    from peftlab.bench.runner import baseline_precision
    from peftlab.cli.bench import summary

    source = REPO / "bench" / "scenarios.yaml"
    for name in ("cpu-sst2", "cpu-imdb"):
        cpu = scenarios.load(name, source)
        assert cpu.parts[0].variants["fp32"] == {"train.precision": "fp32"}
        monkeypatch.setenv("PEFTLAB_CPU_BF16", "1")  # a CPU with bf16 units: the tuned Trainer sets bf16=True
        assert baseline_precision("tuned", cpu) == "bf16" and baseline_precision("seed", cpu) is None
        monkeypatch.setenv("PEFTLAB_CPU_BF16", "0")
        assert baseline_precision("tuned", cpu) is None  # its own choice: fp32 on CPU
    assert baseline_precision("tuned", scenarios.load("gpu-sst2", source)) is None  # bf16 there already
    peaks = {"fp32": 50e9, "bf16": 200e9, "threads": 1, "shape": {"fp32": [4096, 384, 1536], "bf16": [4096, 384, 1536]},
             "bf16_units": True, "bf16_reason": "the CPU has AVX512-BF16"}
    c = {"ok": True, "kind": "peftlab", "real_tokens_per_second": 3000.0, "samples_per_second": 200.0,
         "peak_memory_bytes": 2**20, "test_accuracy": 0.78, "test_macro_f1": 0.78, "mfu": None, "precision": "bfloat16",
         "share_of_fp32_peak": 0.5, "share_of_bf16_peak": 0.125, "step_engine": "eager"}
    result = {"scenario": "s", "device": "cpu", "host": {"load_average_before": None, "load_average_after": None,
                                                         "matmul_peak_flops": peaks},
              "parts": [{"name": "main", "model": "m", "data": {"train_rows": 96, "test_rows": 40, "chance_accuracy": 0.5},
                         "settings": {"epochs": 1}, "contenders": {"peftlab": c}, "all_at_chance": False,
                         "ratios": {"peftlab": {"ratio_vs_seed": 15.0, "ratio_vs_tuned": 3.0, "ratio_vs_fp32": 1.52}}}]}
    text = summary(result)
    assert "fp32 50.0 GFLOP/s, bf16 200.0 GFLOP/s (bf16 units: the CPU has AVX512-BF16)" in text
    assert "50.0%    12.5%" in text and " 1.52" in text and "bfloat16, eager" in text


@pytest.mark.skipif(not BASELINE.is_file(), reason="needs ../shared/bench")
def test_tuned_trainer_runs_in_bf16_on_a_cpu_with_bf16_units(tmp_path, tiny_model_dir, monkeypatch):
    """transformers 5 refuses bf16=True without a GPU unless use_cpu=True: the reference script, unchanged,
    runs with that one default added, and reports bf16."""
    from peftlab.bench.runner import _env, run_baseline

    monkeypatch.setenv("PEFTLAB_CPU_BF16", "1")
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"{w} film {i}", "label": i % 2}) + "\n"
                                                         for i, w in enumerate(["dull", "great"] * 8)))
    scenario_file = tmp_path / "scenarios.yaml"
    scenario_file.write_text(yaml.safe_dump({"scenarios": {"tiny": {
        "device": "cpu", "baseline": str(BASELINE), "data": str(tmp_path), "batch_size": 8,
        "parts": [{"name": "main", "model": str(tiny_model_dir)}]}}}))
    scenario = scenarios.load("tiny", scenario_file)
    res = run_baseline("tuned", scenario.parts[0], scenario, {"dir": tmp_path}, BASELINE, tmp_path / "tuned",
                       _env(scenario, 1), 300)
    assert res["ok"], res.get("error")
    assert res["precision"] == "bf16" and res["use_cpu"] and res["optimizer_steps"] == 2 and res["device"] == "cpu"


def test_flops_and_mfu():
    bert_base = flops.non_embedding_params("random:bert-base")
    assert 85e6 < bert_base < 87e6  # 12 x (4 x 768^2 + 2 x 768 x 3072 + biases, norms) + pooler, head
    # a decoder: its embed_tokens table left out too (Qwen2.5-0.5B: 0.36 B of its 0.49 B)
    assert 3.55e8 < flops.non_embedding_params("random:qwen2.5-0.5b") < 3.6e8
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
                 "--threads", "1", "--append", str(tmp_path / "rows.jsonl")]) == 0
    result = json.loads((out / "tiny.json").read_text())
    # each contender's row was appended as it finished, with what it ran on and as what
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["contender"] for r in rows] == ["peftlab", "seed", "tuned"]
    for r in rows:
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and "cuda" in r and r["ok"]
        assert r["peak_memory_bytes"] > 0 and 0 <= r["test_accuracy"] <= 1 and r["chance_accuracy"] >= 0.5
    assert rows[0]["step_engine"] == "eager" and rows[0]["quantization"]["used"] is None
    assert isinstance(result["all_at_chance"], bool)

    assert result["scenario"] == "tiny" and result["device"] == "cpu"
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "python"}
    assert result["host"]["omp_num_threads"] == "1" and len(result["host"]["load_average_before"]) == 3
    peaks = result["host"]["matmul_peak_flops"]  # measured with the contenders' one thread
    assert peaks["threads"] == 1 and peaks["fp32"] > 1e8 and peaks["bf16"] > 1e7 and peaks["bf16_units"] is False
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
        assert c["mfu"] is None  # no data-sheet peak for a CPU: its shares of the measured ones instead
        assert c["share_of_fp32_peak"] == pytest.approx(c["real_tokens_per_second"] * c["model_flops_per_token"]
                                                        / peaks["fp32"], abs=1e-4)
        assert c["share_of_bf16_peak"] is not None
        # samples/s and tokens/s describe the same seconds: 96 samples in train_seconds
        assert c["samples_per_second"] * c["train_seconds"] == pytest.approx(96, rel=0.02)
    assert contenders["seed"]["padding"] == "max_length" and contenders["tuned"]["padding"] == "dynamic"
    assert contenders["tuned"]["precision"] == "fp32" and contenders["peftlab"]["precision"] == "float32"  # no bf16 units
    assert part["same_optimizer_steps"] and part["real_tokens_agree"]
    tps = {n: c["real_tokens_per_second"] for n, c in contenders.items()}
    assert result["ratio_vs_seed"] == pytest.approx(tps["peftlab"] / tps["seed"], abs=0.006)
    assert result["ratio_vs_tuned"] == pytest.approx(tps["peftlab"] / tps["tuned"], abs=0.006)
    assert part["ratios"]["peftlab"] == {"ratio_vs_seed": result["ratio_vs_seed"], "ratio_vs_tuned": result["ratio_vs_tuned"]}
    assert not any(Path(p).name.startswith("peftlab-bench") for p in tmp_path.iterdir())  # no work files left here


@pytest.mark.skipif(not BASELINE.is_file() or not SST2.is_dir(), reason="needs ../shared/bench and ../shared/data")
def test_gpu_check_dry_run_on_cpu(tmp_path, tiny_model_dir, tiny_llama_dir):
    """bench/gpu-check as it runs on a lent GPU, on CPU with tiny sizes, so that it cannot rot: the bundle
    built (without wheels), every step and contender run, rows appended, the table at the end."""
    import subprocess
    import sys

    bundle, out = tmp_path / "bundle", tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bundle.py"), "--out", str(bundle), "--no-wheels",
                    "--sst2-rows", "300", "--imdb-train", "80", "--imdb-test", "40"], check=True)
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    assert manifest["bytes"] <= 60_000_000 and manifest["rows"] == {"imdb_train": 80, "imdb_test": 40}
    assert (bundle / "baseline" / "hf_trainer_baseline.py").read_bytes() == BASELINE.read_bytes()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu-check"), "--bundle", str(bundle), "--out", str(out),
                           "--dry-run", "--model", str(tiny_model_dir), "--decoder-model", str(tiny_llama_dir),
                           "--budget", "400"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.jsonl", "gpu-check.log"]
    result = json.loads((out / "gpu-check.json").read_text())
    rows = result["rows"]
    tests = {r["select"]: r for r in rows if r["kind"] == "tests"}
    assert set(tests) == {"not compile", "compile"}  # the compile tests last: they must not starve the rest
    assert all(t["exit"] == 0 and "collected" in t["summary"] for t in tests.values())  # they import and are found
    assert next(r for r in rows if r["kind"] == "matmul")["tflops"] > 0
    contenders = [(r["scenario"], r["part"], r["contender"]) for r in rows if "contender" in r]
    assert sorted(contenders) == sorted([("gpu-sst2", "speed", c) for c in ("seed", "peftlab-graphs", "peftlab-qlora")]
                                        + [("gpu-sst2", "decoder", "peftlab-qlora"), ("gpu-imdb", "speed", "peftlab")])
    assert all(r["ok"] for r in rows if "contender" in r)
    by_name = {r["contender"]: r for r in rows if r.get("scenario") == "gpu-sst2" and r["part"] == "speed"}
    assert "CUDA device" in by_name["peftlab-graphs"]["step_engine_reason"]  # on CPU it fell back, and says so
    assert by_name["peftlab-qlora"]["quantization"]["used"] == "none"  # the 32-wide tiny BERT: too narrow
    decoder = {r["contender"]: r for r in rows if r.get("part") == "decoder"}
    assert decoder["peftlab-qlora"]["quantization"]["used"] == "4bit"  # bitsandbytes NF4 on the CPU
    assert decoder["peftlab-qlora"]["quantization"]["modules_4bit"] == 14 and "gpu-sst2/decoder" in done.stdout
    assert "gpu-sst2/speed" in done.stdout and "peftlab-graphs" in done.stdout and result["table"] in done.stdout
