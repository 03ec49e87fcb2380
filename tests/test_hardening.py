"""The defect classes of the hardening issue, each as a whole: number and output-path checks on every
command, rows that line up, labels without phantom classes, damaged run directories, locked run
directories, leakage between splits, reports that compare only what is comparable."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest_report_helpers import make_run
from peftlab.cli import main
from peftlab.reports import build_report
from peftlab.reports.collect import collect
from tests.test_bad_input import run_cli
from tests.test_train import train_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, topic_data_dir) -> Path:
    return train_cli(tmp_path_factory.mktemp("hardening"),
                     [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48",
                      "train.epochs=1", "train.batch_size=16", "output.plots=false", "eval.baseline=false"])


# ---------------------------------------------------------------- numbers and output paths, every command

@pytest.mark.parametrize("args, needle", [
    (["predict", "RUN", "--text", "x", "--batch-size", "-5"], "--batch-size: -5 is out of range"),
    (["predict", "RUN", "--text", "x", "--batch-size", "0"], "--batch-size: 0 is out of range"),
    (["predict", "RUN", "--text", "x", "--output", "/nonexistent/dir/out.jsonl"], "does not exist"),
    (["predict", "RUN", "--text", "x", "--output", "RUN"], "is a directory"),
    (["predict", "RUN", "--text", "x", "--output", "/proc/self/x.jsonl"], "system path"),
    (["report", "RUN", "--output", "/proc/report.html"], "system path"),
    (["report", "RUN", "--output", "RUN/metrics.json/r.html"], "is a file"),
    (["sweep", "--set", "sweep.seeds=[1]", "--n-trials", "0"], "--n-trials: 0 is out of range"),
    (["sweep", "--set", "sweep.seeds=[1]", "--stale-after", "-1"], "--stale-after: -1 is out of range"),
    (["sweep", "--set", "sweep.seeds=[1]", "--output-dir", "RUN/metrics.json"], "is a file"),
    (["plan", "--budget", "0"], "--budget: 0 is out of range"),
    (["plan", "--budget", "1000", "--top", "x"], "'x' is not a number"),
    (["params", "--num-labels", "1"], "--num-labels: 1 is out of range"),
    (["bench", "--scenario", "cpu-sst2", "--repeats", "0"], "--repeats: 0 is out of range"),
    (["bench", "--scenario", "cpu-sst2", "--output-dir", "/proc/bench"], "system path"),
])
def test_bad_numbers_and_paths_are_one_line(run_dir, capsys, args, needle):
    args = [a.replace("RUN", str(run_dir)) for a in args]
    code = main(args)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("peftlab")]
    assert code == 2 and len(err) == 1 and needle in err[0], err


# ---------------------------------------------------------------- predict: rows line up with the input

def test_predict_output_lines_up_with_csv_and_jsonl_input(run_dir, tmp_path):
    texts = ["team goal match", "", "   ", "chip software", "\t"]
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("text\n" + "\n".join(f'"{t}"' if t.strip() else t for t in texts) + "\n")
    jsonl_in = tmp_path / "in.jsonl"
    jsonl_in.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for source in (csv_in, jsonl_in):
        out = tmp_path / f"{source.stem}-{source.suffix[1:]}.jsonl"
        assert main(["predict", str(run_dir), "--input", str(source), "--output", str(out)]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == len(texts), source
        assert [r["text"].strip() for r in rows] == [t.strip() for t in texts]


def test_semicolon_separated_csv_is_read(tmp_path, tiny_overrides, run_dir):
    frame = pd.read_csv(run_dir / "predictions.csv")
    semi = tmp_path / "semi.csv"
    frame[["text"]].assign(extra=1).to_csv(semi, sep=";", index=False)
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(run_dir), "--input", str(semi), "--output", str(out)]) == 0
    assert [json.loads(x)["label"] for x in out.read_text().splitlines()] == frame["predicted"].tolist()


# ---------------------------------------------------------------- damaged run directories

@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "adapter" / "adapter_model.safetensors").unlink(), "trained weights"),
    (lambda d: (d / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 10), "cannot be loaded"),
    (lambda d: (d / "config.yaml").unlink(), "config.yaml: missing"),
    (lambda d: (d / "metrics.json").write_text("{not json"), "not a valid peftlab metrics.json"),
    (lambda d: (d / "metrics.json").write_text('{"status": "completed"}'), "not a valid peftlab metrics.json"),
])
def test_damaged_run_directories_are_named_in_one_line(run_dir, tmp_path, capsys, damage, needle):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    damage(broken)
    assert needle in run_cli(capsys, ["predict", str(broken), "--text", "x"])


def test_report_lists_broken_runs_instead_of_reporting_them(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "good")
    shutil.copytree(run_dir, tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "adapter")
    report = collect([tmp_path])
    assert [g.name for g in report.sections[0].groups] == ["good"]
    assert [(r.name, r.status.split(":")[0]) for r in report.not_completed] == [("broken", "broken")]


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_so(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "early"
    out.mkdir()
    from peftlab.config import load_config, save_config

    save_config(load_config(None, tiny_overrides + [f"output.dir={out}"]), out / "config.yaml")
    (out / "history.jsonl").write_text('{"kind": "step", "step": 1, "epoch": 0.1, "loss": 1.0, "lr": 0.001}\n')
    assert main(["train", "--no-progress", "--resume", str(out)]) == 0
    assert "killed before its first checkpoint; starting it again from the beginning" in capsys.readouterr().out


# ---------------------------------------------------------------- one writer per run directory

def test_a_second_writer_of_the_same_run_directory_is_refused(tmp_path, tiny_overrides):
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "peftlab", "train", "--no-progress", "--output-dir", str(out)]
    for o in [x for x in tiny_overrides if not x.startswith("train.epochs")] + ["train.epochs=400"]:
        cmd += ["--set", o]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "history.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        # stopped, the writer keeps its claim on the folder and stops taking a core from the commands below
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(cmd, capture_output=True, text=True)
        assert second.returncode == 2
        assert "is being written by peftlab process" in second.stderr.strip().splitlines()[-1]
        resume = subprocess.run(cmd[:5] + ["--resume", str(out)], capture_output=True, text=True)
        assert resume.returncode == 2 and "is being written by" in resume.stderr
    finally:
        first.kill()
        first.wait()
    # the lock died with its process: the killed run can be resumed at once (here: not started over)
    assert not (out / "metrics.json").exists() or json.loads((out / "metrics.json").read_text())["status"] != "completed"


# ---------------------------------------------------------------- data checks before training

def test_max_length_beyond_the_model_is_refused_before_training(tmp_path, tiny_overrides, capsys):
    # the tiny BERT has 128 positions
    args = sum((["--set", o] for o in tiny_overrides + ["data.max_length=129"]), [])
    line = run_cli(capsys, ["train", "--no-progress", "--output-dir", str(tmp_path / "long"), *args])
    assert "data.max_length=129 is more than" in line and "at most 128" in line
    assert not (tmp_path / "long" / "history.jsonl").exists()


def test_roberta_like_position_offset():
    from transformers import MPNetConfig, RobertaConfig

    from peftlab.models.architectures import position_limit

    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(MPNetConfig(max_position_embeddings=514, pad_token_id=1)) == 512


def test_texts_shared_with_train_are_counted_warned_and_droppable(tmp_path, tiny_overrides, topic_data_dir, capsys):
    data = tmp_path / "leaky"
    shutil.copytree(topic_data_dir, data)
    train_rows = (data / "train.jsonl").read_text().splitlines()[:7]
    with open(data / "test.jsonl", "a") as f:
        f.write("\n".join(train_rows) + "\n")
    base = [o for o in tiny_overrides if not o.startswith("data.path")] + [f"data.path={data}", "train.max_steps=2"]
    out = train_cli(tmp_path, base, "kept")
    m = json.loads((out / "metrics.json").read_text())
    assert m["overlap_with_train"]["test"] >= 7 and m["split_sizes"]["test"] == 67
    assert "test texts also occur in train" in capsys.readouterr().err
    out = train_cli(tmp_path, base + ["data.drop_duplicates_across_splits=true"], "dropped")
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["split_sizes"]["test"] == 67 - m["overlap_with_train"]["test"]


# ---------------------------------------------------------------- reports compare only what is comparable

def test_report_separates_datasets_and_repeated_seeds(tmp_path):
    for name in ("a", "b"):  # the same config and seed, twice: repeats, not two seeds
        make_run(tmp_path / "same", name, seed=1)
    make_run(tmp_path / "same", "c", seed=2)
    report = collect([tmp_path / "same"])
    assert sorted((g.name, g.n) for g in report.sections[0].groups) == [("a ×2 seeds", 2), ("b", 1)]

    other = make_run(tmp_path / "mixed", "imdb-run", seed=1)
    record = json.loads((other / "metrics.json").read_text())
    record["dataset"] = "imdb"
    (other / "metrics.json").write_text(json.dumps(record))
    make_run(tmp_path / "mixed", "bbc-run", seed=1)
    report = collect([tmp_path / "mixed"])
    assert [s.dataset for s in report.sections] == ["bbc_news", "imdb"]
    assert [s.best.name for s in report.sections] == ["bbc-run", "imdb-run"]
    html_path, md_path = build_report([tmp_path / "mixed"], tmp_path / "r.html")
    md = md_path.read_text()
    assert "## Results: bbc\\_news" in md and "## Results: imdb" in md  # Markdown-escaped: shown as bbc_news


def test_report_charts_clip_error_bars_and_mark_truncated_axes(tmp_path):
    from peftlab.reports.charts import _clipped, scores_chart

    bars = _clipped([(0.99, 0.05), (0.02, 0.05), (0.5, None)], 0.0, 1.0)
    assert bars[:, 0].tolist() == pytest.approx([0.05, 0.01]) and bars[:, 1].tolist() == pytest.approx([0.02, 0.05])
    assert np.isnan(bars[:, 2]).all()
    for seed, errors in ((1, 0), (2, 30)):  # seed spread wide enough that a plain std bar would pass 1.0
        make_run(tmp_path, f"s{seed}", seed=seed, test_errors=errors)
    chart = scores_chart(collect([tmp_path]).sections[0].groups)
    assert chart.png_base64  # drawn; the axis label says where it starts
    from peftlab.reports import charts as C

    fig_labels = []
    real = C._png
    C._png = lambda fig: fig_labels.append(fig.axes[0].get_xlabel()) or real(fig)
    try:
        scores_chart(collect([tmp_path]).sections[0].groups)
    finally:
        C._png = real
    assert "axis starts at" in fig_labels[0] and "clipped to [0, 1]" in fig_labels[0]


def test_invalid_unicode_is_replaced_not_a_traceback(run_dir, tmp_path):
    """Undecodable command-line bytes and lone surrogates reach the tokenizer as U+FFFD."""
    out = tmp_path / "out.csv"
    proc = subprocess.run([sys.executable, "-m", "peftlab", "predict", str(run_dir), "--text", b"caf\xff".decode(
        "utf-8", "surrogateescape"), "--text", "lone \ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
        "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(out)
    assert frame["text"].tolist()[0] == "caf\ufffd" and len(frame) == 2

    from peftlab.data.tokenize import valid_text

    assert valid_text("a\ud800b") == "a?b" and valid_text("plain é") == "plain é"


def test_data_seed_fixes_the_split_across_training_seeds(tmp_path):
    from peftlab.config import load_config
    from peftlab.data import load_data
    from peftlab.data.sources import split_seed

    def test_rows(*overrides):  # the rows the Trainer would load (it calls the same two functions)
        cfg = load_config(None, ["data.max_train_samples=50", "data.max_eval_samples=20", *overrides])
        return load_data(cfg.data, split_seed(cfg.data, cfg.train.seed)).test.texts

    assert test_rows("train.seed=1") != test_rows("train.seed=2")  # the default follows train.seed
    assert test_rows("train.seed=1", "data.seed=7") == test_rows("train.seed=2", "data.seed=7")
