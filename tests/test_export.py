"""`peftlab export`: real tiny runs of every method exported as merged folders and ONNX, checked
against each run's own predictions.csv (and `peftlab predict` for texts past max_length)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from conftest import isolated_module_env
from peftlab.cli import main

METHODS = ["lora", "ia3", "full", "qlora"]
LEARNING_RATES = {"lora": 0.05, "ia3": 0.05, "qlora": 0.05, "full": 0.005}
MAX_LENGTH = 48
# beyond the test rows (4 to 40 words): an empty text, one word, and texts far past max_length
EXTRA_TEXTS = ["", "soup", " ".join(["goal match team coach"] * 30), " ".join(["chip data robot"] * 60)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from isolated_module_env(tmp_path_factory, "export")


def cli(*args: str) -> None:
    assert main(list(args)) == 0


@pytest.fixture(scope="module")
def runs(env, tiny_model_dir, topic_data_dir) -> dict[str, Path]:
    out = {}
    for method in METHODS:
        out[method] = env / f"run-{method}"
        overrides = [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", f"data.max_length={MAX_LENGTH}",
                     "train.epochs=2", "train.batch_size=16", f"train.learning_rate={LEARNING_RATES[method]}",
                     "output.plots=false", f"method.name={method}"]
        cli("train", "--no-progress", "--output-dir", str(out[method]), *[a for o in overrides for a in ("--set", o)])
    return out


@pytest.fixture(scope="module")
def reference(env, runs) -> dict[str, pd.DataFrame]:
    """Per method: the run's test rows (predictions.csv) plus EXTRA_TEXTS labelled by `peftlab predict`."""
    inp = env / "extra.csv"
    pd.DataFrame({"text": EXTRA_TEXTS}).to_csv(inp, index=False)
    frames = {}
    for method, run in runs.items():
        cli("predict", str(run), "--input", str(inp), "--output", str(env / f"extra-{method}.csv"))
        test = pd.read_csv(run / "predictions.csv", keep_default_na=False)
        extra = pd.read_csv(env / f"extra-{method}.csv", keep_default_na=False).assign(text=EXTRA_TEXTS)
        frames[method] = pd.concat([test, extra], ignore_index=True)
    return frames


def labels_of(run: Path) -> list[str]:
    return json.loads((run / "metrics.json").read_text())["label_names"]


def probs_of(frame: pd.DataFrame, labels: list[str]) -> np.ndarray:
    return frame[[f"prob_{n}" for n in labels]].to_numpy(np.float64)


@pytest.fixture(scope="module")
def merged(env, runs) -> dict[str, Path]:
    out = {m: env / f"merged-{m}" for m in METHODS}
    for method, run in runs.items():
        cli("export", str(run), "--format", "merged", "--output", str(out[method]))
    return out


@pytest.fixture(scope="module")
def onnx_exports(env, runs) -> tuple[dict[str, Path], dict[str, str]]:
    """Per method: the ONNX folder (with int8) and what the command printed."""
    out, printed = {m: env / f"onnx-{m}" for m in METHODS}, {}
    for method, run in runs.items():
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            cli("export", str(run), "--format", "onnx", "--quantize", "int8", "--output", str(out[method]))
        printed[method] = stdout.getvalue()
    return out, printed


@pytest.fixture(scope="module")
def onnx_dirs(onnx_exports) -> dict[str, Path]:
    return onnx_exports[0]


# In a fresh interpreter that imports transformers only: the folder must stand on its own.
CHILD = r"""
import json, sys
from transformers import pipeline
jobs, out = json.load(sys.stdin), {}
for name, job in jobs.items():
    pipe = pipeline("text-classification", model=job["dir"], device="cpu")
    rows = pipe(job["texts"], top_k=None, truncation=True, batch_size=16)  # batches of mixed lengths
    out[name] = [{s["label"]: s["score"] for s in row} for row in rows]
out["imported"] = sorted(m for m in ("peft", "peftlab") if m in sys.modules)
print(json.dumps(out))
"""


def test_merged_loads_with_plain_transformers_and_reproduces_the_run(merged, reference, runs, env):
    jobs = {m: {"dir": str(merged[m]), "texts": reference[m]["text"].tolist()} for m in METHODS}
    child = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(jobs), capture_output=True, text=True,
                           cwd=env, env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"},
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["imported"] == []
    for method in METHODS:
        labels = labels_of(runs[method])
        got = np.array([[row[n] for n in labels] for row in out[method]])  # keyed by id2label's names
        diff = np.abs(got - probs_of(reference[method], labels)).max()
        assert diff < 1e-4, (method, diff)


def test_merged_folder_is_plain_and_labelled(merged, runs):
    for method in METHODS:
        folder, labels = merged[method], labels_of(runs[method])
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "export_info.json"} <= files
        assert not any(n.startswith("adapter") for n in files)
        config = json.loads((folder / "config.json").read_text())
        assert config["id2label"] == {str(i): n for i, n in enumerate(labels)}
        assert config["label2id"] == {n: i for i, n in enumerate(labels)}
        assert not [k for k in config if "quantiz" in k or "peft" in k], config.keys()
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == MAX_LENGTH
        weights = load_file(str(folder / "model.safetensors"))
        assert not [k for k in weights if "lora" in k or "ia3" in k or "modules_to_save" in k or "base_layer" in k]
        # the trained head, bit for bit, not a fresh or the base's one (peft #577, #1070)
        if method == "full":
            trained = load_file(str(runs[method] / "model" / "model.safetensors"))["classifier.weight"]
        else:
            trained = load_file(str(runs[method] / "adapter" / "adapter_model.safetensors"))[
                "base_model.model.classifier.weight"]
        np.testing.assert_array_equal(weights["classifier.weight"], trained)
        info = json.loads((folder / "export_info.json").read_text())
        assert info["format"] == "merged" and info["method"] == method and info["check"]["rows"] == 60
        assert info["check"]["max_abs_diff_vs_run"] < 1e-4 and info["check"]["agreement_with_run"] == 1.0


def test_qlora_export_says_what_it_merged(runs, env, capsys):
    cli("export", str(runs["qlora"]), "--format", "merged", "--output", str(env / "qlora-note"))
    err = capsys.readouterr().err
    assert "note: qlora run: its adapter is merged into the fp32 base model" in err


def test_onnx_matches_the_run_on_varied_lengths(onnx_dirs, reference, runs):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    for method in METHODS:
        folder, labels = onnx_dirs[method], labels_of(runs[method])
        config = json.loads((folder / "config.json").read_text())
        assert [config["id2label"][str(i)] for i in range(len(labels))] == labels
        tokenizer = AutoTokenizer.from_pretrained(folder)
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        wanted = [i.name for i in session.get_inputs()]
        texts, expected = reference[method]["text"].tolist(), probs_of(reference[method], labels)
        # interleaved batches of 7 mix short, long and truncated texts; batch 1 checks the smallest shape
        for index in [np.arange(i, len(texts), 9) for i in range(9)] + [np.array([len(texts) - 3])]:
            enc = tokenizer([texts[i] for i in index], truncation=True, padding=True, return_tensors="np")
            assert enc["input_ids"].shape[1] <= MAX_LENGTH
            logits = session.run(["logits"], {n: enc[n] for n in wanted})[0]
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            diff = np.abs(probs - expected[index]).max()
            assert diff < 1e-3, (method, index, diff)


def test_onnx_int8_reports_accuracy_next_to_float(onnx_dirs, runs):
    for method in METHODS:
        folder = onnx_dirs[method]
        info = json.loads((folder / "export_info.json").read_text())
        assert {"model.onnx", "model_quantized.onnx", "config.json", "tokenizer.json"} <= set(info["files"])
        assert (folder / "model_quantized.onnx").stat().st_size < (folder / "model.onnx").stat().st_size / 2
        run_accuracy = json.loads((runs[method] / "metrics.json").read_text())["test"]["accuracy"]
        assert info["check"]["accuracy"] == pytest.approx(run_accuracy)
        assert info["check"]["max_abs_diff_vs_run"] < 1e-4
        int8 = info["int8"]["check"]
        assert int8["rows"] == 60 and 0 <= int8["accuracy"] <= 1
        assert abs(int8["accuracy"] - info["check"]["accuracy"]) <= 0.1, info
        assert info["inputs"][:2] == ["input_ids", "attention_mask"] and info["opset"] >= 17


def test_onnx_cli_prints_float_and_int8_accuracy(onnx_exports):
    for out in onnx_exports[1].values():
        assert "float    test accuracy" in out and "int8     test accuracy" in out


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------

def export_fails(capsys, args: list[str]) -> str:
    code = main(["export", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    errors = [line for line in err if line.startswith("peftlab export: error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    return errors[0]


def test_missing_and_incomplete_runs(tmp_path, capsys, runs):
    out = tmp_path / "out"
    assert str(tmp_path / "nope") in export_fails(capsys, [str(tmp_path / "nope"), "--format", "merged", "--output", str(out)])
    broken = tmp_path / "broken"
    shutil.copytree(runs["lora"], broken)
    (broken / "metrics.json").unlink()  # a killed run has none
    assert "not complete" in export_fails(capsys, [str(broken), "--format", "onnx", "--output", str(out)])
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_output_must_be_new_or_empty(tmp_path, capsys, runs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = export_fails(capsys, [str(runs["lora"]), "--format", "merged", "--output", str(out)])
    assert "already exists and is not an empty directory" in line and str(out) in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine
    cli("export", str(runs["full"]), "--format", "merged", "--output", str(empty))
    assert (empty / "model.safetensors").exists()


def test_quantize_is_for_onnx_only(tmp_path, capsys, runs):
    line = export_fails(capsys, [str(runs["lora"]), "--format", "merged", "--quantize", "int8", "--output", str(tmp_path / "o")])
    assert "--format onnx" in line and not (tmp_path / "o").exists()


def test_adapter_on_random_weights_cannot_be_merged(tmp_path, capsys, runs):
    fake = tmp_path / "random-run"
    shutil.copytree(runs["lora"], fake)
    metrics = json.loads((fake / "metrics.json").read_text())
    (fake / "metrics.json").write_text(json.dumps({**metrics, "model": "random:bert-base"}))
    line = export_fails(capsys, [str(fake), "--format", "merged", "--output", str(tmp_path / "o")])
    assert "random weights (random:bert-base)" in line and "no base to merge it into" in line


def test_a_failed_export_leaves_nothing(tmp_path, runs, monkeypatch):
    from peftlab.export import onnx_export

    def broken(*a, **k):
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(onnx_export, "export_graph", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        onnx_export.export_onnx(runs["lora"], tmp_path / "o")
    assert list(tmp_path.iterdir()) == []
