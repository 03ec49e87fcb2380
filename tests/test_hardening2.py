"""Hardening, round two (issue 20), each class as a whole: write failures on every writer, figures
that describe the rows used, finite config floats, BOM-prefixed text everywhere, escaped report text
and spreadsheet-safe prediction CSVs. (Slow clients and error answers of the server: test_serve.py.)"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import main
from tests.test_train import train_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, topic_data_dir) -> Path:
    return train_cli(tmp_path_factory.mktemp("hardening2"),
                     [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48",
                      "train.epochs=1", "train.batch_size=16", "output.plots=true", "eval.baseline=false"])


# ---------------------------------------------------------------- 2. write failures

def _limited(limit_bytes: int):
    def apply():
        # the kernel's answer to a file past the limit is SIGXFSZ (death); ignored, it is EFBIG, as a
        # program that handles it sees it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def peftlab_limited(args: list[str], limit_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "peftlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=_limited(limit_bytes))


def one_error_line(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("peftlab ")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-3000:]
    return lines[0]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


@pytest.mark.parametrize("limit, failing", [(300, "config.yaml"), (60_000, "checkpoints/last.pt"),
                                            (400_000, "adapter")])  # adapter/: its tokenizer.json is ~700 kB
def test_train_under_a_file_size_limit_is_one_line_and_leaves_nothing_that_looks_complete(
        tmp_path, tiny_model_dir, topic_data_dir, limit, failing):
    out = tmp_path / "run"
    args = ["train", "--no-progress", "--output-dir", str(out)]
    for o in [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48", "train.epochs=1",
              "train.batch_size=16", "eval.baseline=false", "output.plots=false"]:
        args += ["--set", o]
    line = one_error_line(peftlab_limited(args, limit, tmp_path), "file too large")
    assert f"cannot write '{out / failing}'" in line
    assert not temporaries(out)
    if (out / "metrics.json").exists():
        assert json.loads((out / "metrics.json").read_text())["status"] == "failed"
    assert not (out / "adapter").exists()  # a folder that is there is a whole one
    sizes = {p.name: p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert all(size <= limit for size in sizes.values()), sizes
    if failing == "adapter":  # with room again, --resume finishes from the checkpoints the failure kept
        assert main(["train", "--no-progress", "--resume", str(out)]) == 0
        assert json.loads((out / "metrics.json").read_text())["status"] == "completed"
        assert (out / "adapter" / "tokenizer.json").stat().st_size > limit and not temporaries(out)


def test_predict_under_a_file_size_limit_keeps_no_truncated_output(run_dir, tmp_path):
    texts = tmp_path / "in.jsonl"
    texts.write_text("".join(json.dumps({"text": f"the match and the goal number {i}"}) + "\n" for i in range(400)))
    for name in ("out.csv", "out.jsonl"):
        out = tmp_path / name
        proc = peftlab_limited(["predict", str(run_dir), "--input", str(texts), "--output", str(out)], 20_000,
                               tmp_path)
        assert str(out) in one_error_line(proc, "file too large")
        assert not out.exists() and not temporaries(tmp_path)


def as_a_user() -> list[str]:
    """A command prefix under which permissions hold: root passes them by its capabilities, so for root
    the command runs without CAP_DAC_OVERRIDE (util-linux setpriv)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: read-only folders cannot be tested")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_read_only_folders_are_one_line_for_every_writer(run_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    ro_run = tmp_path / "ro-run"  # a run whose own folder cannot be written
    shutil.copytree(run_dir, ro_run)
    (ro_run / "metrics.json").unlink()  # as if killed before its end
    for p in ro_run.iterdir():
        p.chmod(0o444 if p.is_file() else 0o555)
    ro_run.chmod(0o555)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    try:
        for args, where in ((["predict", str(run_dir), "--text", "x", "--output", str(locked / "p.csv")], locked),
                            (["report", str(run_dir), "--output", str(locked / "r.html")], locked),
                            (["export", str(run_dir), "--format", "merged", "--output", str(locked / "merged")], locked),
                            (["train", "--output-dir", str(locked / "run")], locked),
                            (["train", "--resume", str(ro_run)], ro_run)):
            proc = subprocess.run([*as_a_user(), sys.executable, "-m", "peftlab", *args], env=env,
                                  capture_output=True, text=True, timeout=300)
            line = one_error_line(proc, str(where))
            assert "permission denied" in line.lower(), line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
        ro_run.chmod(0o755)


def test_a_failed_replacement_keeps_the_old_file_whole(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    folder.chmod(0o555)
    code = ("import sys; from peftlab.files import write_text; from peftlab.errors import UserError\n"
            "try:\n  write_text(sys.argv[1], 'new')\nexcept UserError as e:\n  print(e)")
    try:
        proc = subprocess.run([*as_a_user(), sys.executable, "-c", code, str(folder / "old.txt")], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    finally:
        folder.chmod(0o755)
    assert f"cannot write '{folder / 'old.txt'}': permission denied" in proc.stdout, proc.stderr
    assert (folder / "old.txt").read_text() == "old" and [p.name for p in folder.iterdir()] == ["old.txt"]


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_run(run_dir, tmp_path, tiny_overrides):
    from peftlab.files import clean_stale, temp_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temp_name(tmp_path / "keep.csv")  # this process is alive: its temporaries stay
    mine.write_text("")
    stale = [tmp_path / f".best.pt.{dead.pid}.tmp", tmp_path / f".out.csv.{dead.pid}-0a1b2c3d.tmp",
             tmp_path / f".adapter.{dead.pid}-0a1b2c3d.tmp"]
    stale[0].write_text("x")
    stale[1].write_text("x")
    stale[2].mkdir()
    (stale[2] / "tokenizer.json").write_text("{")
    assert clean_stale(tmp_path, "out.csv") == [stale[1]]
    assert sorted(clean_stale(tmp_path)) == sorted([stale[0], stale[2]])
    assert mine.exists() and not any(p.exists() for p in stale)

    # and a resumed run cleans its own directory (the lock is taken first: the folder is the run's)
    from peftlab.runs.rundir import RunDir

    rd = RunDir(tmp_path / "resumable")
    rd.path.mkdir()
    (rd.checkpoints).mkdir()
    left = [rd.path / f".metrics.json.{dead.pid}.tmp", rd.checkpoints / f".last.pt.{dead.pid}-12345678.tmp"]
    for p in left:
        p.write_text("half")
    rd.lock()
    rd.unlock()
    assert not any(p.exists() for p in left)


def test_library_write_errors_are_told_as_the_os_error_they_were(tmp_path):
    import torch

    from peftlab.errors import UserError
    from peftlab.files import os_error_of, torch_save

    class SafetensorError(Exception):
        pass
    assert os_error_of(SafetensorError("Error while serializing: I/O error: File too large (os error 27)")).errno == 27
    assert os_error_of(RuntimeError("unrelated")) is None
    import sqlite3

    assert os_error_of(sqlite3.OperationalError("database or disk is full")).errno == errno.ENOSPC
    code = ("import resource, signal, sys, torch; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000)); from peftlab.files import torch_save\n"
            "from peftlab.errors import UserError\n"
            "try:\n  torch_save({'w': torch.zeros(100000)}, sys.argv[1])\nexcept UserError as e:\n  print(e)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pt")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert "x.pt" in proc.stdout and "file too large" in proc.stdout, proc.stderr
    assert list(tmp_path.iterdir()) == []
    torch_save({"w": torch.ones(3)}, tmp_path / "ok.pt")  # without a limit: written, and nothing else
    assert [p.name for p in tmp_path.iterdir()] == ["ok.pt"] and UserError


# ---------------------------------------------------------------- 4. config floats are finite

def _float_keys() -> list[str]:
    """Every float setting of the schema (found, not listed: a new one is covered by the test below)."""
    import typing

    from peftlab.config.schema import Config, Section

    keys = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        for name, f in model.model_fields.items():
            args = typing.get_args(f.annotation) or (f.annotation,)
            if float in args and not any(isinstance(a, type) and issubclass(a, Section) for a in args):
                keys.append(f"{section}.{name}")
    return keys


def test_every_float_setting_is_found():
    keys = _float_keys()
    assert {"train.learning_rate", "train.epochs", "method.alpha", "distill.temperature", "eval.threshold",
            "data.validation_fraction", "train.focal_gamma"} <= set(keys), keys


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "inf", "nan", "1e400"])
def test_every_float_setting_refuses_nan_and_inf_in_one_line_naming_the_key(value):
    from peftlab.config import load_config
    from peftlab.errors import UserError

    for key in _float_keys():
        with pytest.raises(UserError) as e:
            load_config(None, [f"{key}={value}"])
        assert f"'{key}'" in str(e.value) and "\n" not in str(e.value), (key, str(e.value))
        load_config(None, [f"{key}=0.5"] if key != "train.epochs" else ["train.epochs=2"])  # a finite value is not


@pytest.mark.parametrize("override, key", [
    ("train.class_weights={sport: .inf}", "train.class_weights"),
    ("sweep.grid={train.learning_rate: [0.001, .nan]}", "sweep.grid"),
    ("sweep.space={train.learning_rate: {type: float, low: 0.0001, high: .inf}}", "sweep.space.train.learning_rate.high"),
    ("train.learning_rate=1e308", "train.learning_rate"),  # finite, but beyond the documented bound
    ("train.epochs=1e9", "train.epochs"),
    ("distill.temperature=1e9", "distill.temperature"),
])
def test_numbers_inside_maps_and_lists_and_absurd_magnitudes_are_refused(override, key):
    from peftlab.config import load_config
    from peftlab.errors import UserError

    with pytest.raises(UserError, match=f"'{key}'"):
        load_config(None, [override])


def test_command_line_numbers_refuse_inf(capsys):
    from tests.test_bad_input import run_cli

    assert "out of range" in run_cli(capsys, ["sweep", "--set", "sweep.seeds=[1]", "--stale-after", "inf"])
    assert "out of range" in run_cli(capsys, ["serve", "RUN", "--batch-window-ms", "nan"])


# ---------------------------------------------------------------- 5. a byte-order mark, wherever text is read

BOM = "\ufeff"


def _write(path: Path, text: str, bom: bool) -> Path:
    data = ((BOM if bom else "") + text).encode("utf-8")
    if path.name.endswith(".gz"):
        import gzip

        data = gzip.compress(data)
    path.write_bytes(data)
    return path


ROWS = [{"text": f"match goal {i}" if i % 2 else f"chip data {i}", "label": i % 2} for i in range(30)]
TABLES = {
    "train.jsonl": "".join(json.dumps(r) + "\n" for r in ROWS),
    "train.jsonl.gz": "".join(json.dumps(r) + "\n" for r in ROWS),
    "train.json": json.dumps(ROWS),  # not a reader suffix: written as .jsonl holding one JSON array below
    "train.csv": "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS),
    "train.tsv": "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_a_byte_order_mark_is_accepted_in_every_data_format_and_labels_file(tmp_path, name):
    from peftlab.config.schema import DataConfig
    from peftlab.data.sources import load_data

    loaded = {}
    for bom in (False, True):
        folder = tmp_path / f"bom-{bom}"
        folder.mkdir()
        file = "train.jsonl" if name == "train.json" else name
        _write(folder / file, TABLES[name], bom)
        _write(folder / "labels.json", json.dumps(["tech", "sport"]), bom)
        data = load_data(DataConfig(path=str(folder)), seed=0)
        loaded[bom] = (data.label_names, data.train.texts, data.train.labels.tolist(), data.test.texts)
    assert loaded[True] == loaded[False] and loaded[True][0] == ["tech", "sport"]


def test_a_byte_order_mark_is_accepted_in_texts_to_predict_unlabeled_texts_and_configs(tmp_path):
    from peftlab.config import load_config
    from peftlab.data.sources import read_texts

    for name, text in (("in.jsonl", '{"text": "first"}\n{"text": "second"}\n'), ("in.csv", "text\nfirst\nsecond\n"),
                       ("in.tsv", "text\nfirst\nsecond\n"), ("in.jsonl.gz", '{"text": "first"}\n{"text": "second"}\n')):
        # predict --input and distill.unlabeled read texts with this one function
        assert read_texts(str(_write(tmp_path / name, text, True)), ["text"], "--input") == ["first", "second"], name
    config = _write(tmp_path / "c.yaml", "train:\n  epochs: 2\n", True)
    assert load_config(str(config)).train.epochs == 2


# ---------------------------------------------------------------- 7. text from runs, escaped in every format

HOSTILE_RUN = "<img src=x onerror=alert(1)>"
HOSTILE = {"business": "$\\frac{$ <b>b</b>", "sport": "sp|ort [x](javascript:alert(1))", "tech": "*tech* `x` <!--"}


def _rewrite(value, mapping: dict[str, str]):
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, list):
        return [_rewrite(v, mapping) for v in value]
    if isinstance(value, dict):
        return {_rewrite(k, mapping): _rewrite(v, mapping) for k, v in value.items()}
    return value


def hostile_runs(root: Path) -> list[Path]:
    """Two runs whose name, model, dataset and labels are markup (Markdown, HTML, mathtext)."""
    import yaml

    from conftest_report_helpers import make_run

    runs = [make_run(root, HOSTILE_RUN, r=8), make_run(root, "plain", r=16, seed=1)]
    for run in runs:
        record = json.loads((run / "metrics.json").read_text())
        record = _rewrite(record, {**HOSTILE, "bbc_news": "data <script>x</script>"})
        record["config"]["model"]["name"] = record["model"] = "[m](http://x) <i>m</i>"
        (run / "metrics.json").write_text(json.dumps(record))
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["model"]["name"] = record["model"]
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        csv_text = (run / "predictions.csv").read_text()
        for old, new in HOSTILE.items():  # csv.writer quotes what needs it
            csv_text = csv_text.replace(f",{old}", "," + json.dumps(new).replace('\\"', '""'))
        (run / "predictions.csv").write_text(csv_text)
    return runs


def test_markdown_report_shows_run_text_as_written_and_never_as_markup(tmp_path):
    from markdown_it import MarkdownIt

    from peftlab.reports import build_report

    hostile_runs(tmp_path / "runs")
    html_path, md_path = build_report([tmp_path / "runs"], tmp_path / "report.html")
    md = md_path.read_text()
    rendered = MarkdownIt("commonmark").enable("table").render(md)  # as a viewer that allows HTML shows it
    for tag in ("<img", "<b>", "<i>", "<script", "<a ", "<em>", "<code>", "<!--"):
        assert tag not in rendered, tag
    assert HOSTILE_RUN.replace("<", "&lt;").replace(">", "&gt;") in rendered  # the name, as text
    assert "[m](http://x) &lt;i&gt;m&lt;/i&gt;" in rendered
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len({line.count(" | ") - line.count("\\|") for line in rows}) == 1  # no cell split by a "|"
    page = html_path.read_text()
    assert "<img src=x" not in page and "<script>x" not in page


def test_run_plots_and_report_charts_draw_labels_as_written(tmp_path):
    from peftlab.runs.plots import write_plots

    runs = hostile_runs(tmp_path)
    written = write_plots(runs[0])  # mathtext would fail on "$\frac{$"
    assert {p.name for p in written} >= {"confusion_matrix.png", "loss.png"}


# ---------------------------------------------------------------- 8. spreadsheet formulas in prediction CSVs

FORMULAS = ["=1+2", "+SUM(A1)", "-2+3", "@cmd", "\tx", "\rx", "plain text", "a=b"]


def test_predict_csv_is_spreadsheet_safe_by_default_and_exact_on_request(run_dir, tmp_path):
    import csv

    args = ["predict", str(run_dir)] + [f"--text={t}" for t in FORMULAS]  # "-2+3" is not an option
    for extra, expect in (([], ["'" + t if t[0] in "=+-@\t\r" else t for t in FORMULAS]), (["--no-csv-safe"], FORMULAS)):
        out = tmp_path / f"out{len(extra)}.csv"
        assert main(args + ["--output", str(out)] + extra) == 0
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert [r["text"] for r in rows] == expect
        assert all(float(r["confidence"]) > 0 for r in rows)  # numbers stay numbers
    out = tmp_path / "out.jsonl"  # JSON Lines is data for programs: never changed
    assert main(args + ["--output", str(out)]) == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == FORMULAS


def test_label_cells_are_spreadsheet_safe_too(tmp_path):
    import csv

    from peftlab.cli.predict import write_rows

    rows = [{"label": "-1", "confidence": 0.75, "probabilities": {"-1": 0.75, "=x": 0.25}},
            {"labels": ["=x", "-1"], "probabilities": {"-1": 0.6, "=x": 0.7}}]
    for i, row in enumerate(rows):
        out = tmp_path / f"{i}.csv"
        write_rows(str(out), ["t"], [row], ["-1", "=x"])
        with open(out, newline="", encoding="utf-8") as f:
            got = next(csv.DictReader(f))
        assert got.get("label", got.get("labels")) == ("'-1" if i == 0 else "'=x|-1")
        assert float(got["prob_-1"]) == row["probabilities"]["-1"]


# ---------------------------------------------------------------- 3. figures about a run describe the rows used

def test_recorded_counts_are_those_of_the_rows_trained_and_scored(tmp_path, tiny_overrides, topic_data_dir, capsys):
    import pandas as pd

    data = tmp_path / "leaky"
    shutil.copytree(topic_data_dir, data)
    train_texts = [json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()]
    with open(data / "test.jsonl", "a") as f:  # 30 train rows also in test (the file's test rows: 60 + 30)
        f.write((data / "train.jsonl").read_text().splitlines()[-30:][0] + "\n")
        f.write("\n".join((data / "train.jsonl").read_text().splitlines()[-29:]) + "\n")
    base = [o for o in tiny_overrides if not o.startswith("data.path")] + [
        f"data.path={data}", "train.max_steps=2", "data.max_eval_samples=20"]

    # every train row is used: the overlap is counted on the 20 test rows scored, not on the file's 90
    out = train_cli(tmp_path, base, "subset")
    m = json.loads((out / "metrics.json").read_text())
    scored = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert m["split_sizes"] == {"train": 240, "validation": 20, "test": 20} and len(scored) == 20
    assert m["overlap_with_train"]["test"] == sum(t in set(train_texts) for t in scored["text"])
    assert m["overlap_with_train"]["test"] < 30
    warned = capsys.readouterr().err
    if m["overlap_with_train"]["test"]:
        assert f"{m['overlap_with_train']['test']:,} test texts also occur in train" in warned
    for name, scores in m["test"]["per_class"].items():  # label counts: those of the rows scored
        assert scores["support"] == int((scored["label"] == name).sum())
    assert sum(m["test"]["confusion_matrix"][i][j] for i in range(3) for j in range(3)) == 20

    # a train subset: leakage is against the rows trained on; dropped, the evaluation subsets keep their size
    out = train_cli(tmp_path, base + ["data.max_train_samples=60", "data.drop_duplicates_across_splits=true"], "drop")
    m = json.loads((out / "metrics.json").read_text())
    scored = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert m["split_sizes"] == {"train": 60, "validation": 20, "test": 20} and len(scored) == 20
    assert m["overlap_with_train"] == {"validation": 0, "test": 0}


def test_load_data_counts_overlap_on_the_subsets(tmp_path, topic_data_dir):
    """The data layer alone, with every combination of subsets: the recorded overlap is recomputed from
    the rows it returns."""
    from peftlab.config.schema import DataConfig
    from peftlab.data.sources import load_data

    data = tmp_path / "leaky"
    shutil.copytree(topic_data_dir, data)
    lines = (data / "train.jsonl").read_text().splitlines()
    with open(data / "test.jsonl", "a") as f:
        f.write("\n".join(lines[::4]) + "\n")  # 60 train rows also in test
    for train_limit in (None, 50):
        for eval_limit in (None, 15):
            for drop in (False, True):
                loaded = load_data(DataConfig(path=str(data), max_train_samples=train_limit,
                                              max_eval_samples=eval_limit, drop_duplicates_across_splits=drop), 0)
                used = set(loaded.train.texts)
                for split in ("validation", "test"):
                    rows = getattr(loaded, split).texts
                    assert loaded.overlap[split] == sum(t in used for t in rows), (train_limit, eval_limit, drop)
                    assert not drop or loaded.overlap[split] == 0
                    if eval_limit:
                        assert len(rows) == eval_limit


def test_export_under_a_file_size_limit_is_one_line_and_leaves_no_folder(run_dir, tmp_path):
    out = tmp_path / "merged"
    proc = peftlab_limited(["export", str(run_dir), "--format", "merged", "--output", str(out)], 200_000, tmp_path)
    assert f"cannot write '{out}'" in one_error_line(proc, "file too large")
    assert not out.exists() and not temporaries(tmp_path)


def test_predictions_csv_keeps_texts_with_carriage_returns_in_their_row(tmp_path):
    import numpy as np
    import pandas as pd

    from peftlab.runs.rundir import RunDir

    texts = ["one\rtwo", "three\r\nfour", "=five", 'six "quoted", seven']
    rd = RunDir(tmp_path)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    rd.write_predictions(texts, np.array([0, 1, 0, 1]), probs, probs.argmax(1), ["a", "b"])
    frame = pd.read_csv(rd.predictions_file, keep_default_na=False)
    assert frame["text"].tolist() == texts and frame["predicted"].tolist() == ["a", "b", "a", "b"]
