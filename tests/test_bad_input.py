"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing that looks complete."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import main


def run_cli(capsys, args: list[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    # one error line (library warnings aside), no traceback
    errors = [line for line in err if line.startswith("peftlab ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    return errors[0]


def train_args(out: Path, *overrides: str) -> list[str]:
    args = ["train", "--no-progress", "--output-dir", str(out)]
    for o in overrides:
        args += ["--set", o]
    return args


def assert_not_complete(out: Path) -> None:
    metrics = out / "metrics.json"
    assert not metrics.exists() or json.loads(metrics.read_text())["status"] == "failed"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("override, expected", [
    ("train.epoch=2", "unknown key 'train.epoch' (allowed keys: epochs,"),
    ("train.precision=fp8", "bad value 'fp8' for 'train.precision'"),
    ("method.name=prefix", "unknown method.name 'prefix' (allowed: contrastive-full, contrastive-ia3, contrastive-lora, full, ia3, lora, probe, qlora)"),
    ("method.r=0", "'method.r'"),
    ("nosection.x=1", "unknown key 'nosection'"),
])
def test_bad_config_names_the_key_and_allowed_values(tmp_path, capsys, override, expected):
    line = run_cli(capsys, train_args(tmp_path / "run", override))
    assert expected in line
    assert not (tmp_path / "run").exists()  # rejected before anything is written


def test_bad_precision_lists_the_allowed_values(tmp_path, capsys):
    assert "(allowed: auto, fp32, bf16, fp16)" in run_cli(capsys, train_args(tmp_path / "r", "train.precision=fp8"))


def test_config_file_problems(tmp_path, capsys):
    assert "not found" in run_cli(capsys, ["train", str(tmp_path / "none.yaml")])
    bad = write(tmp_path / "bad.yaml", "data: [unclosed\n")
    assert "not valid YAML" in run_cli(capsys, ["train", str(bad)])
    assert "expected section.key=value" in run_cli(capsys, ["train", "--set", "epochs"])


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.csv", "does not exist"),
    (lambda d: write(d / "empty.csv", ""), "empty"),
    (lambda d: write(d / "cols.csv", "body,label\nhello,a\nworld,b\n"), "'text'"),
    (lambda d: write(d / "blank.csv", "text,label\nhello,a\n   ,b\nworld,a\nmore,b\n"), "empty"),
    (lambda d: write(d / "data.xml", "<x/>"), "xml"),
])
def test_bad_data_files(tmp_path, capsys, tiny_model_dir, make, expected):
    path = make(tmp_path)
    out = tmp_path / "run"
    line = run_cli(capsys, train_args(out, f"model.name={tiny_model_dir}", f"data.path={path}"))
    assert expected in line.lower() and str(path.name) in line
    assert_not_complete(out)


def test_labels_in_test_unseen_in_train(tmp_path, capsys, tiny_model_dir):
    d = tmp_path / "data"
    d.mkdir()
    write(d / "train.csv", "text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    write(d / "test.csv", "text,label\nx,a\ny,c\n")
    line = run_cli(capsys, train_args(tmp_path / "run", f"model.name={tiny_model_dir}", f"data.path={d}"))
    assert "'c'" in line and "train" in line
    assert_not_complete(tmp_path / "run")


def test_unknown_model(tmp_path, capsys):
    line = run_cli(capsys, train_args(tmp_path / "run", f"model.name={tmp_path / 'no-model'}"))
    assert "could not be loaded" in line and "minilm-l6" in line


def test_method_that_does_not_fit_the_architecture(tmp_path, capsys, tiny_model_dir, topic_data_dir):
    line = run_cli(capsys, train_args(tmp_path / "run", f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}",
                                      "method.target_modules=[q_proj,v_proj]"))
    assert "match no linear layer" in line and "attention.self.query" in line
    line = run_cli(capsys, train_args(tmp_path / "run2", f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}",
                                      "method.layers=[0,7]"))
    assert "out of range" in line and "0..1" in line


def test_output_dir_that_cannot_be_written(tmp_path, capsys):
    blocker = write(tmp_path / "file", "x")
    line = run_cli(capsys, train_args(blocker / "run"))
    assert "cannot be written" in line


def test_output_dir_holding_a_run_is_not_overwritten(tmp_path, capsys, tiny_overrides):
    out = tmp_path / "run"
    out.mkdir()
    write(out / "metrics.json", json.dumps({"status": "completed"}))
    assert "already holds a run" in run_cli(capsys, train_args(out, *tiny_overrides))
    assert json.loads((out / "metrics.json").read_text()) == {"status": "completed"}


def test_predict_and_resume_on_wrong_directories(tmp_path, capsys):
    assert "not found" in run_cli(capsys, ["predict", str(tmp_path / "nope"), "--text", "x"])
    (tmp_path / "half").mkdir()
    assert "not complete" in run_cli(capsys, ["predict", str(tmp_path / "half"), "--text", "x"])
    assert "not a peftlab run directory" in run_cli(capsys, ["train", "--resume", str(tmp_path / "half")])


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peftlab", "train", "--set", "train.batch_size=-1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("peftlab train: error: ")
    assert "Traceback" not in proc.stderr and "batch_size" in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peftlab", "--debug", "train", "--set", "train.batch_size=-1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
