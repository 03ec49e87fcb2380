"""Hardening, round three (issue 26): every saved form loads right the documented way or refuses loudly
(A), nothing peftlab reads runs code (B), plots stay bounded at any class count and come after the
record (C), label rules (D), SIGTERM handled as Ctrl-C in train, sweep and serve (E), one line instead of
a traceback (F), and the smaller ones (G)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, make_rows
from peftlab.cli import main
from peftlab.errors import UserError


def train(out: Path, *overrides: str) -> int:
    args = ["train", "--no-progress", "--output-dir", str(out)]
    for o in ("data.max_length=48", "output.plots=false", "eval.baseline=false", "train.learning_rate=0.01", *overrides):
        args += ["--set", o]
    return main(args)


def one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    return err[0]


def probabilities(run: Path) -> tuple[list[str], np.ndarray]:
    frame = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    return frame["text"].tolist(), frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- A: every saved form loads right the documented way, or refuses ----------------------------------
@pytest.fixture(scope="module")
def pooled_runs(tiny_st_dir, tiny_model_dir, topic_data_dir, tmp_path_factory) -> dict[str, Path]:
    """A LoRA and a full fine-tuning run of the pooled head (the full one with plots on, whose folder is
    taken by a file: C), a LoRA run of a checkpoint's own head, and the LoRA run's merged export."""
    root = tmp_path_factory.mktemp("saved-forms")
    runs = {"lora": root / "lora", "full": root / "full", "own": root / "own"}
    assert train(runs["lora"], f"model.name={tiny_st_dir}", f"data.path={topic_data_dir}", "train.epochs=1") == 0
    runs["full"].mkdir()
    (runs["full"] / "plots").write_text("a file where plots/ would go: drawing fails")
    assert train(runs["full"], f"model.name={tiny_st_dir}", f"data.path={topic_data_dir}", "train.epochs=1",
                 "method.name=full", "train.learning_rate=0.0005", "output.plots=true") == 0
    assert train(runs["own"], f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "train.epochs=1") == 0
    assert main(["export", str(runs["lora"]), "--format", "merged", "--output", str(root / "merged")]) == 0
    runs["merged"] = root / "merged"
    return runs


def _readme_block(after: str) -> str:
    """The first python block of README.md after `after`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S).group(1)


def _card_block(folder: Path) -> str:
    text = (folder / "README.md").read_text(encoding="utf-8")
    return re.search(r"Without peftlab.*?```python\n(.*?)```", text, re.S).group(1)


# Every form loaded in one fresh process that cannot import peftlab, exactly as the docs say (each code
# block in a namespace of its own; then the run's test texts go through the same tokenizer call the docs
# give), and loaded the wrong way, without trust_remote_code, with stdin at its end. Results as JSON.
_LOAD = """
import json, sys
sys.modules["peftlab"] = None  # without peftlab
import torch
from transformers import AutoModelForSequenceClassification, pipeline
jobs, refusals = json.loads(open(sys.argv[1]).read()), json.loads(sys.argv[2])
out = {}
for name, job in jobs.items():
    space = {}
    exec(job["code"], space)
    model, tokenizer = space["model"].eval(), space["tokenizer"]
    with torch.no_grad():
        enc = tokenizer(job["texts"], truncation=True, max_length=48, padding=True, return_tensors="pt")
        out[name] = {"model": torch.softmax(model(**enc).logits, -1).tolist()}
    if "classify" in space:
        scores = space["classify"](job["texts"], top_k=None, truncation=True)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        out[name]["pipeline"] = [[{r["label"]: r["score"] for r in row}[n] for n in names] for row in scores]
for folder in refusals:
    for load in (lambda: AutoModelForSequenceClassification.from_pretrained(folder),
                 lambda: pipeline("text-classification", model=folder)):
        try:
            load()
            out.setdefault(folder, []).append("LOADED")
        except Exception as e:
            out.setdefault(folder, []).append(str(e).splitlines()[0])
open(sys.argv[3], "w").write(json.dumps(out))
"""


def test_saved_forms_load_as_documented_or_refuse(pooled_runs, tmp_path):
    lora, full, own, merged = pooled_runs["lora"], pooled_runs["full"], pooled_runs["own"], pooled_runs["merged"]
    export_doc = (REPO / "docs" / "export.md").read_text(encoding="utf-8")
    pipeline_line = re.search(r'classify = pipeline\("text-classification", model="exports/demo-merged".*\)',
                              export_doc).group(0).replace("exports/demo-merged", str(merged))
    own_card = _card_block(own / "adapter")
    assert "PeftModel.from_pretrained" in own_card and "trust_remote_code" not in own_card
    assert not (own / "adapter" / "config.json").exists()  # a plain adapter folder: no remote code
    jobs = {  # name: (code as the docs give it, the run whose predictions.csv it must reproduce)
        "README, pooled adapter": (_readme_block("loads with the head's code").replace("runs/demo", str(lora)), lora),
        "card, pooled adapter": (_card_block(lora / "adapter"), lora),
        "docs/export.md, merged": ("from transformers import pipeline\n" + pipeline_line +
                                   "\nmodel, tokenizer = classify.model, classify.tokenizer\n", lora),
        "card, full model/": (_card_block(full / "model"), full),
        "card, own-head adapter": (own_card, own),
    }
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps({k: {"code": code, "texts": probabilities(run)[0]} for k, (code, run) in jobs.items()}))
    folders = [str(lora / "adapter"), str(full / "model"), str(merged)]
    result = tmp_path / "loaded.json"
    done = subprocess.run([sys.executable, "-c", _LOAD, str(spec), json.dumps(folders), str(result)],
                          capture_output=True, text=True, env=env(), stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(result.read_text())
    for name, (_, run) in jobs.items():
        want = probabilities(run)[1]
        for way, probs in got[name].items():
            assert np.abs(np.array(probs) - want).max() < 1e-4, (name, way)
    assert set(got["card, pooled adapter"]) == {"model", "pipeline"}
    for folder in folders:  # refused, loudly, saying what to do; never a [CLS]-head model in silence
        config = json.loads((Path(folder) / "config.json").read_text())
        assert config["model_type"] == "peftlab_pooled_bert" and (Path(folder) / "peftlab_head.py").is_file()
        assert len(got[folder]) == 2 and all("custom code" in why for why in got[folder]), got[folder]


def test_model_card_names_the_base_labels_figures_and_how_to_load(pooled_runs):
    from peftlab.config import Config
    from peftlab.runs.model_card import model_card
    from peftlab.runs.record import RunRecord

    card = (pooled_runs["lora"] / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in card
    for words in ("labels: 3: `food`, `sport`, `tech`", "test accuracy", "macro-F1", "pooled sentence embedding",
                  "train 240 rows", "peftlab.load_run", "trust_remote_code=True", "peftlab predict"):
        assert words in card, words
    record = RunRecord.read(pooled_runs["lora"] / "metrics.json")
    cfg = Config.model_validate({**record.config, "model": {**record.config["model"], "name": "minilm-l6"}})
    card = model_card(record, cfg, pooled_runs["lora"] / "adapter", pooled_runs["lora"])
    assert 'base_model: "sentence-transformers/all-MiniLM-L6-v2"' in card
    assert "base model: minilm-l6 (sentence-transformers/all-MiniLM-L6-v2) (read from " in card


# --- C: plots bounded, and after the record -----------------------------------------------------------
def test_a_plot_that_fails_does_not_lose_the_finished_run(pooled_runs, capsys):
    m = json.loads((pooled_runs["full"] / "metrics.json").read_text())
    assert m["status"] == "completed" and (pooled_runs["full"] / "plots").is_file()


def test_the_confusion_matrix_is_bounded_at_any_class_count(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image

    from peftlab.runs.plots import MAX_CLASSES_SHOWN, _save, confusion_figure

    n = 600
    rng = np.random.default_rng(0)
    matrix = np.diag(rng.integers(5, 20, n))
    matrix[3, 7], matrix[500, 2] = 9, 4  # the most confused classes must be among those shown
    fig = confusion_figure(matrix, [f"c{i}" for i in range(n)], "Test confusion matrix")
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert len(shown) == MAX_CLASSES_SHOWN and {"c3", "c7", "c500", "c2"} <= set(shown)
    assert not ax.texts and "of 600" in ax.get_title()  # no per-cell text past 30 classes
    _save(fig, tmp_path / "cm.png")
    assert max(Image.open(tmp_path / "cm.png").size) <= 1400  # 600 classes made 27,500 px before
    assert isinstance(fig, Figure)


# --- B: nothing peftlab reads runs code ---------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a crafted checkpoint does when unpickled with weights_only=False
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_runs_no_code(tmp_path, tiny_overrides, capsys):
    import torch

    from peftlab.config import load_config
    from peftlab.runs.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.start(load_config(None, tiny_overrides))
    run.unlock()
    run.checkpoints.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker), "trainable": {}}, run.checkpoints / "last.pt")
    assert main(["train", "--no-progress", "--resume", str(run.path)]) == 2
    one_line(capsys, "last.pt", "not a checkpoint peftlab wrote")
    assert not marker.exists()


def test_a_model_folder_with_code_is_refused_without_reading_stdin(tmp_path, tiny_model_dir, topic_data_dir,
                                                                   monkeypatch, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "ran"
    (folder / "sneaky.py").write_text(f"open({str(marker)!r}, 'w').close()  # runs when imported\n"
                                      "from transformers import BertConfig, BertForSequenceClassification\n"
                                      "class SneakyConfig(BertConfig):\n    model_type = 'sneaky'\n"
                                      "class SneakyModel(BertForSequenceClassification):\n"
                                      "    config_class = SneakyConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="sneaky", auto_map={"AutoConfig": "sneaky.SneakyConfig",
                                                 "AutoModelForSequenceClassification": "sneaky.SneakyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    for answer in ("y\n", ""):  # "y" waiting on stdin, and stdin at its end
        monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
        assert train(tmp_path / f"run{len(answer)}", f"model.name={folder}", f"data.path={topic_data_dir}") == 2
        one_line(capsys, "model.trust_remote_code=true")
        assert not marker.exists() and sys.stdin.read() == answer  # nothing was read
    # the documented option lets it run
    assert train(tmp_path / "trusted", f"model.name={folder}", f"data.path={topic_data_dir}", "train.epochs=1",
                 "method.target_modules=[query,value]",
                 "model.trust_remote_code=true") == 0
    assert marker.exists()


# --- D: labels ---------------------------------------------------------------------------------------
def _data(tmp_path: Path, rows: dict[str, list], labels_json=None) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for split, labels in rows.items():
        texts = [r["text"] for r in make_rows(len(labels), seed=len(split))]
        with open(folder / f"{split}.jsonl", "w") as f:
            for text, label in zip(texts, labels):
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    if labels_json is not None:
        (folder / "labels.json").write_text(json.dumps(labels_json))
    return folder


def _load_data(folder: Path):
    from peftlab.config.schema import DataConfig
    from peftlab.data import load_data

    return load_data(DataConfig(path=str(folder)), seed=0)


@pytest.mark.parametrize("rows, names, words", [
    ({"train": [0, 1, 2] * 10}, ["a", "b", "a"], "'a' is named twice"),
    ({"train": [0, 1, 2] * 10}, ["a", " ", "c"], "name 2 of 3 is blank"),
    ({"train": [0, 1] * 10}, ["Sport", "sport "], "differ only in case"),
    ({"train": ["Sport", "sport", "tech"] * 10}, None, "differ only in case"),
    ({"train": [1, "1", 2] * 10}, None, "mixes numbers (1) and text ('1')"),
    ({"train": [["a"], ["b"]] * 10}, None, "data.multi_label=true"),
    ({"train": ["a", "b"] * 10, "test": ["a", "B"] * 5}, None, "train has 'b'"),
])
def test_labels_that_cannot_be_right_are_one_line(tmp_path, rows, names, words):
    with pytest.raises(UserError, match=re.escape(words)) as e:
        _load_data(_data(tmp_path, rows, names))
    assert "\n" not in str(e.value)


def test_labels_are_compared_as_written(tmp_path):
    # 1 and "1" are one label whichever split writes which; surrounding spaces are not part of a name
    for train_labels, test_labels in (([1, 2] * 10, ["1", "2"] * 5), (["1", "2"] * 10, [1, 2] * 5)):
        data = _load_data(_data(tmp_path / str(type(train_labels[0]).__name__), {"train": train_labels,
                                                                                  "test": test_labels}))
        assert data.label_names == ["1", "2"] and sorted(set(data.test.labels.tolist())) == [0, 1]
    data = _load_data(_data(tmp_path / "spaces", {"train": ["sport", "sport ", " tech"] * 10}))
    assert data.label_names == ["sport", "tech"]
    data = _load_data(_data(tmp_path / "named", {"train": [0, 1] * 10, "test": ["neg", "pos"] * 5},
                            labels_json=[" neg", "pos"]))
    assert data.label_names == ["neg", "pos"]


# --- F: one line, not a traceback -----------------------------------------------------------------------
def test_a_text_cell_holding_a_list_is_one_line(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = make_rows(30)
    rows[4]["text"] = ["two", "parts"]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"row 5 of column 'text' holds a list"):
        _load_data(folder)
    (tmp_path / "texts.jsonl").write_text(json.dumps({"text": {"a": 1}}) + "\n")
    from peftlab.data.sources import read_texts

    with pytest.raises(UserError, match="holds a mapping"):
        read_texts(str(tmp_path / "texts.jsonl"), ["text"], "--input")


def test_a_damaged_run_config_is_one_line(pooled_runs, tmp_path, capsys):
    import shutil

    from peftlab.serve.app import create_app

    run = tmp_path / "run"
    shutil.copytree(pooled_runs["own"], run)
    for damage in ("data: [unclosed\n", "- a list\n", "train: {epochs: -3}\n"):
        (run / "config.yaml").write_text(damage)
        assert main(["predict", str(run), "--text", "x"]) == 2
        one_line(capsys, "config.yaml")
        assert main(["export", str(run), "--format", "merged", "--output", str(tmp_path / "out")]) == 2
        one_line(capsys, "config.yaml")
        with pytest.raises(UserError, match="config.yaml"):
            create_app([str(run)])


def test_out_of_memory_names_what_to_lower(tmp_path, tiny_overrides, capsys):
    # a rank of 10^11: LoRA's first matrix cannot be allocated (a real allocation failure, nothing held)
    assert main(["train", "--no-progress", "--output-dir", str(tmp_path / "run"),
                 *sum((["--set", o] for o in tiny_overrides + ["method.r=100000000000"]), [])]) == 2
    one_line(capsys, "out of memory", "train.batch_size", "data.max_length")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_assigning_a_bad_config_value_is_a_user_error():
    from peftlab.config import Config

    cfg = Config()
    with pytest.raises(UserError, match=r"bad value 'x' for 'train.batch_size'"):
        cfg.train.batch_size = "x"
    with pytest.raises(UserError, match=r"unknown key 'model.nmae'"):
        cfg.model.nmae = "minilm-l6"
    cfg.train.batch_size = 8
    assert cfg.train.batch_size == 8


# --- E: SIGTERM is Ctrl-C ---------------------------------------------------------------------------------
# The commands run in this process (main(), as `peftlab ...` does) and a thread sends the real signal to
# it once the run is in epoch 2 with its epoch-1 checkpoint: what docker stop or Ctrl-C deliver.
def _signal_in_epoch_two(monkeypatch, run: Path, how: int) -> None:
    """The process sends itself `how` at the first logged step of epoch two (the checkpoint of epoch one on
    disk), from the training loop itself: a watching thread raced the tiny run's end on a loaded machine."""
    from peftlab.training.trainer import Trainer

    log_step, sent = Trainer._log_step, []

    def and_signal(self, epoch, loss):
        log_step(self, epoch, loss)
        if not sent and epoch > 1.1 and Path(self.run.path) == run and (run / "checkpoints" / "last.pt").exists():
            sent.append(how)
            os.kill(os.getpid(), how)  # handled in the main thread as the call returns

    monkeypatch.setattr(Trainer, "_log_step", and_signal)


def _epochs(run: Path) -> list[int]:
    return [r["epoch"] for r in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]


def _three_epochs(tiny_overrides: list[str]) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith("train.epochs")] + ["train.epochs=3", "train.log_every=1"]


def test_sigterm_to_train_is_an_interruption_that_resumes(tmp_path, tiny_overrides, capsys, monkeypatch):
    run = tmp_path / "run"
    _signal_in_epoch_two(monkeypatch, run, signal.SIGTERM)
    assert train(run, *_three_epochs(tiny_overrides)) == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted (SIGTERM)" in line and f"--resume {run}" in line, line
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "failed" and record["error"] == "interrupted" and _epochs(run) == [1]
    assert main(["train", "--no-progress", "--resume", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed" and _epochs(run) == [1, 2, 3]


def test_ctrl_c_in_a_sweep_resumes_the_trial(tmp_path, tiny_overrides, capsys, monkeypatch):
    import yaml

    tree: dict = {}
    for text in _three_epochs(tiny_overrides):
        key, value = text.split("=", 1)
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    tree["sweep"] = {"grid": {"method.r": [4]}}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(tree))
    out, trial = tmp_path / "sweep", tmp_path / "sweep" / "trials" / "lora-r4"
    command = ["sweep", str(config), "--output-dir", str(out), "--no-progress"]
    _signal_in_epoch_two(monkeypatch, trial, signal.SIGINT)
    # a pytest-xdist worker ignores SIGINT (its controller takes Ctrl-C); a terminal's process does not
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(command) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "peftlab sweep: interrupted"
    assert main(command) == 0
    assert "after epoch 1" in capsys.readouterr().out  # resumed from its checkpoint, not from epoch 1
    assert json.loads((trial / "metrics.json").read_text())["status"] == "completed" and _epochs(trial) == [1, 2, 3]


def test_sigterm_to_serve_is_an_interruption(pooled_runs, capsys):
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, seen = f"http://127.0.0.1:{port}", {}

    def client():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        # a gzip body: 415 saying so, not "not UTF-8" (G)
        seen["gzip"] = httpx.post(f"{url}/predict", content=b"\x1f\x8b\x08\x00", timeout=10,
                                  headers={"content-encoding": "gzip", "content-type": "application/json"})
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=client, daemon=True).start()
    assert main(["serve", str(pooled_runs["own"]), "--port", str(port)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "peftlab serve: interrupted (SIGTERM)"
    assert seen["gzip"].status_code == 415 and "uncompressed" in seen["gzip"].json()["detail"]


# --- G: smaller -------------------------------------------------------------------------------------------
def test_a_key_no_client_can_send_is_refused(pooled_runs, capsys):
    assert main(["serve", str(pooled_runs["own"]), "--api-key", "clé-secrète"]) == 2
    one_line(capsys, "--api-key", "printable ASCII")


def test_write_advice_fits_the_cause(tmp_path, tiny_overrides, capsys):
    from peftlab.files import write_text

    gone = tmp_path / "gone"
    gone.mkdir()
    gone.rmdir()
    with pytest.raises(UserError) as e:
        write_text(gone / "metrics.json", "{}")
    assert "folder is gone" in str(e.value) and "free space" not in str(e.value)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    assert main(["train", "--no-progress", "--output-dir", str(link), *sum((["--set", o] for o in tiny_overrides), [])]) == 2
    line = one_line(capsys, "symbolic link", "nowhere", "does not exist")
    assert "free space" not in line


def test_default_run_directories_never_collide(tmp_path, monkeypatch):
    from peftlab.runs.rundir import default_run_dir

    monkeypatch.chdir(tmp_path)
    made = [default_run_dir("lora") for _ in range(3)]  # the same second
    assert len(set(made)) == 3 and all(p.is_dir() for p in made)
    assert made[1].name == made[0].name + "-2"
