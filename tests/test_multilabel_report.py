"""Multi-label runs in the run plots, the report, sweep summaries and tracking: two real seeds of the tiny
model on label sets (plots on, thresholds tuned, TensorBoard on), fabricated runs beside single-label ones
on the same dataset name, and a real two-configuration multi-label sweep. Every expected figure is read
from the runs' own metrics.json."""
from __future__ import annotations

import json
import re
import shutil
import statistics
import warnings
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest_report_helpers import LABELS, make_multilabel_run, make_run
from peftlab.cli import main
from peftlab.reports import build_report
from peftlab.reports.charts import all_charts
from peftlab.reports.collect import collect
from peftlab.reports.render import COLUMNS
from peftlab.runs.plots import label_decisions, write_plots
from peftlab.runs.record import RunRecord
from peftlab.sweeps.runner import _brief
from peftlab.sweeps.summary import METRICS, summarize
from peftlab.tasks.multi_label_metrics import probability_metrics
from peftlab.training.tracking import TrackingWarning

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MULTI_LABEL_PLOTS = ["loss.png", "validation.png", "label_scores.png", "label_confusion.png", "confidence.png",
                     "reliability.png"]
# report column -> (metrics.json part, figure)
TEST_COLUMNS = {"test subset acc": "accuracy", "test macro-F1": "macro_f1", "test micro-F1": "micro_f1",
                "test samples-F1": "samples_f1", "test Hamming loss": "hamming_loss"}


def _tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def ml_runs(tmp_path_factory, tiny_model_dir, label_set_data_dir) -> list[Path]:
    """Two real multi-label runs, seeds 1 and 2 of one configuration: plots on, selected by micro-F1,
    thresholds tuned per label, a calibration temperature, logged to TensorBoard (when installed)."""
    root = tmp_path_factory.mktemp("ml") / "runs"
    overrides = [f"model.name={tiny_model_dir}", f"data.path={label_set_data_dir}", "data.multi_label=true",
                 "data.label_column=labels", "data.max_length=48", "train.batch_size=16", "method.name=full",
                 "train.learning_rate=0.003", "train.epochs=4", "output.plots=true", "eval.metric=micro_f1",
                 "eval.threshold=tune", "eval.calibrate=temperature"]
    if _tensorboard():
        overrides.append("tracking.backends=[tensorboard]")
    runs = []
    for seed in (1, 2):
        args = ["train", "--no-progress", "--output-dir", str(root / f"ml-seed{seed}")]
        for o in overrides + [f"train.seed={seed}"]:
            args += ["--set", o]
        with warnings.catch_warnings():
            warnings.simplefilter("error", TrackingWarning)  # the tracker may not have given up
            assert main(args) == 0
        runs.append(root / f"ml-seed{seed}")
    return runs


def _record(run: Path) -> RunRecord:
    return RunRecord.read(run / "metrics.json")


def _fmt(values: list[float]) -> str:
    """The report's cell for these values: one, or mean ± sample std."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _md_tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Every '## Results...' table of report.md as {heading suffix: rows (dicts by column)}."""
    tables, title, lines = {}, None, md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## Results"):
            title = re.sub(r"\\(.)", r"\1", line.removeprefix("## Results").removeprefix(": "))  # as shown
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([re.sub(r"\\(.)", r"\1", c.strip()) for c in row.strip("|").split(" | ")])
            tables[title] = [dict(zip(rows[0], r)) for r in rows[2:]]
    return tables


class _HtmlTables(HTMLParser):
    """The results tables of report.html, each under the <h2> before it (the section's dataset)."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.title, self.in_h2, self.cell, self.row = "", False, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self.in_h2, self.title = True, ""
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self.in_h2 = False
        elif tag in ("td", "th") and self.row is not None:
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.tables.setdefault(self.title, []).append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.in_h2:
            self.title += data
        if self.cell is not None:
            self.cell += data


def _html_tables(page: str) -> dict[str, list[dict[str, str]]]:
    parser = _HtmlTables()
    parser.feed(page)
    # the first table under each heading is its results table (the failed-runs one has its own heading)
    out = {}
    for title, rows in parser.tables.items():
        head = rows[0]
        body = []
        for r in rows[1:]:
            if r == head:  # a second table under the same heading: stop
                break
            body.append(dict(zip(head, r)))
        out[title] = body
    return out


# ---------------------------------------------------------------- plots of one run

def test_real_multilabel_run_writes_label_plots_not_a_confusion_matrix(ml_runs):
    for run in ml_runs:
        record = _record(run)
        assert record.multi_label and record.test.confusion_matrix is None and record.test.label_confusion
        written = sorted(p.name for p in (run / "plots").glob("*.png"))
        assert written == sorted(MULTI_LABEL_PLOTS) and "confusion_matrix.png" not in written
        for name in written:
            png = run / "plots" / name
            assert png.read_bytes()[:8] == PNG_MAGIC
            h, w = matplotlib.image.imread(png).shape[:2]
            assert h > 100 and w > 100
    # written again from the run directory alone: the same plots, in order
    shutil.rmtree(ml_runs[0] / "plots")
    assert [p.name for p in write_plots(ml_runs[0])] == MULTI_LABEL_PLOTS


def test_plots_read_the_label_sets_the_record_scored(ml_runs, tmp_path):
    """The label sets and probabilities the plots read from predictions.csv give the record's own 2x2
    confusions at 0.5 and its ECE (the reliability plot's figure)."""
    run = ml_runs[1]
    record = _record(run)
    frame = pd.read_csv(run / "predictions.csv", keep_default_na=False, dtype={"label": str, "predicted": str})
    assert "confidence" not in frame.columns
    labels, probs = label_decisions(frame, record.label_names, "|")
    assert labels.shape == probs.shape == (record.split_sizes["test"], len(record.label_names))
    decided = probs >= 0.5
    for j, name in enumerate(record.label_names):
        y = labels[:, j] == 1
        counts = [[int((~y & ~decided[:, j]).sum()), int((~y & decided[:, j]).sum())],
                  [int((y & ~decided[:, j]).sum()), int((y & decided[:, j]).sum())]]
        assert counts == record.test.label_confusion[name], name
    assert probability_metrics(labels, probs)["ece"] == pytest.approx(record.test.ece, abs=1e-9)

    # no metrics.json (a run killed after its predictions): still label plots, never a class matrix
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("metrics.json", "plots"))
    names = [p.name for p in write_plots(copy)]
    assert "confusion_matrix.png" not in names
    assert {"label_confusion.png", "label_scores.png", "confidence.png", "reliability.png"} <= set(names)


def test_fabricated_multilabel_run_with_a_custom_separator(tmp_path):
    run = make_multilabel_run(tmp_path, "sep")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["label_separator"] = ";"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    frame = pd.read_csv(run / "predictions.csv", keep_default_na=False, dtype={"label": str, "predicted": str})
    frame["label"] = frame["label"].str.replace("|", ";", regex=False)
    frame.to_csv(run / "predictions.csv", index=False)
    (run / "metrics.json").unlink()  # the separator then comes from config.yaml
    assert "label_confusion.png" in [p.name for p in write_plots(run)]
    labels, _ = label_decisions(frame, LABELS, ";")
    assert labels.sum(axis=1).max() == len(LABELS)  # sets of several labels were split, not dropped


# ---------------------------------------------------------------- the report

def test_report_keeps_multilabel_runs_in_their_own_sections(tmp_path, ml_runs):
    fab = tmp_path / "fab"
    single = make_run(fab, "single", val_f1=0.90)
    # same dataset name and label names as the single-label run, and a higher validation macro-F1:
    # ranked together it would be "best"
    multi = make_multilabel_run(fab, "multi", validation={"macro_f1": 0.99, "micro_f1": 0.97}, threshold=0.3,
                                trainable=20_000)
    html_path, md_path = build_report([fab, ml_runs[0].parent], tmp_path / "out" / "report.html")

    report = collect([fab, ml_runs[0].parent])
    kinds = {sec.dataset: sec.task.multi_label for sec in report.sections}
    real = _record(ml_runs[0])
    assert kinds == {"bbc_news": False, "bbc_news (multi-label)": True, f"{real.dataset} (multi-label)": True}
    by_title = {sec.dataset: sec for sec in report.sections}
    assert [r.name for g in by_title["bbc_news"].groups for r in g.runs] == ["single"]
    assert by_title["bbc_news"].best.name == "single"
    assert [r.name for g in by_title["bbc_news (multi-label)"].groups for r in g.runs] == ["multi"]
    assert all(r.metrics.multi_label for sec in report.sections if sec.task.multi_label for g in sec.groups for r in g.runs)

    md_tables = _md_tables(md_path.read_text())
    html_tables = _html_tables(html_path.read_text())
    assert set(md_tables) == set(html_tables) == set(kinds)
    # the single-label section: its usual columns, no multi-label ones
    assert list(md_tables["bbc_news"][0]) == COLUMNS
    m = _record(single)
    assert md_tables["bbc_news"][0]["test acc"] == f"{m.test.accuracy:.4f}"
    # the multi-label section: its own columns, equal to the record's figures, in both files
    m = _record(multi)
    [row] = md_tables["bbc_news (multi-label)"]
    assert [row] == html_tables["bbc_news (multi-label)"]
    assert "test acc" not in row and "val acc" not in row
    for column, key in TEST_COLUMNS.items():
        assert row[column] == f"{getattr(m.test, key):.4f}", column
        assert row[f"{column} @ thresholds"] == f"{getattr(m.test_at_threshold, key):.4f}", column
    assert row["thresholds"] == "fixed 0.3"
    assert row["val subset acc"] == f"{m.validation.accuracy:.4f}"
    assert row["val macro-F1"] == f"{m.validation.macro_f1:.4f}"
    assert row["trainable params"] == f"{m.params.trainable:,}" and row["seeds"] == "1"
    md = md_path.read_text()
    assert (f"Best by validation macro-F1: multi (validation macro-F1 {m.validation.macro_f1:.4f}). Its test subset "
            f"accuracy is {m.test.accuracy:.4f}, macro-F1 {m.test.macro_f1:.4f}, micro-F1 {m.test.micro_f1:.4f}") in md
    # every section has its charts, none crashed on the missing confusion matrix
    page = html_path.read_text()
    assert page.count("<img ") == 7 * len(kinds)
    assert page.count("<figcaption>Test precision, recall and F1 per label of the best run by validation") == 2
    assert "<figcaption>Test confusion matrix of the best run by validation (single)" in page


def test_multilabel_seeds_are_one_row_with_mean_and_std(ml_runs, tmp_path):
    records = [_record(r) for r in ml_runs]
    html_path, md_path = build_report([ml_runs[0].parent], tmp_path / "report.html")
    [sec] = collect([ml_runs[0].parent]).sections
    assert sec.task.multi_label and sec.metric == "micro_f1"  # the runs' eval.metric
    [group] = sec.groups
    assert group.n == 2 and group.name == "ml ×2 seeds"  # sweep-style names: -seedN dropped
    [row] = next(iter(_md_tables(md_path.read_text()).values()))
    assert row["seeds"] == "2"
    for column, key in TEST_COLUMNS.items():
        assert row[column] == _fmt([getattr(r.test, key) for r in records]), column
        assert row[f"{column} @ thresholds"] == _fmt([getattr(r.test_at_threshold, key) for r in records]), column
    for column, key in (("val subset acc", "accuracy"), ("val macro-F1", "macro_f1"), ("val micro-F1", "micro_f1")):
        assert row[column] == _fmt([getattr(r.validation, key) for r in records]), column
    assert row["thresholds"] == "tuned per label (each for its F1)"
    assert " ± " in row["test micro-F1"]
    best = max(records, key=lambda r: r.validation.micro_f1)
    assert sec.best_run.name == Path(best.run_dir).name
    md = md_path.read_text()
    micro = _fmt([r.validation.micro_f1 for r in records])
    assert f"Best by validation micro-F1: ml ×2 seeds (validation micro-F1 {micro})." in md
    assert "Multi-label runs (a set of labels per text) have their own sections" in md
    assert [row] == next(iter(_html_tables(html_path.read_text()).values()))


def test_multilabel_charts(ml_runs):
    [sec] = collect([ml_runs[0].parent]).sections
    charts = all_charts(sec)
    titles = [c.title for c in charts]
    assert len(charts) == 7 and not any("confusion matrix" in t for t in titles)
    assert titles[1] == "Test subset accuracy vs trainable parameters"
    assert titles[-1] == f"Test precision, recall and F1 per label of the best run by validation ({sec.best_run.name})"
    assert "thresholds" in charts[-1].note  # the runs tuned thresholds: their F1 is drawn too


@pytest.mark.parametrize("metric, best", [("micro_f1", "a"), ("macro_f1", "b"), ("samples_f1", "b")])
def test_best_multilabel_run_by_its_eval_metric(tmp_path, metric, best):
    make_multilabel_run(tmp_path, "a", metric=metric, r=4, validation={"micro_f1": 0.90, "macro_f1": 0.70,
                                                                       "samples_f1": 0.60})
    make_multilabel_run(tmp_path, "b", metric=metric, r=8, validation={"micro_f1": 0.80, "macro_f1": 0.85,
                                                                       "samples_f1": 0.75})
    [sec] = collect([tmp_path]).sections
    assert sec.metric == metric and sec.best.name == best


def test_multilabel_runs_that_disagree_on_the_metric_fall_back_to_macro_f1(tmp_path):
    make_multilabel_run(tmp_path, "a", metric="micro_f1", validation={"micro_f1": 0.90, "macro_f1": 0.70})
    make_multilabel_run(tmp_path, "b", metric="samples_f1", validation={"micro_f1": 0.80, "macro_f1": 0.85})
    [sec] = collect([tmp_path]).sections
    assert sec.metric == "macro_f1" and sec.best.name == "b"


# ---------------------------------------------------------------- sweep summaries

def test_multilabel_sweep_summary_and_report(tmp_path, tiny_model_dir, label_set_data_dir):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(label_set_data_dir), "multi_label": True, "label_column": "labels", "max_length": 48},
        "method": {"name": "full"}, "train": {"epochs": 1, "batch_size": 16},
        "eval": {"metric": "micro_f1"}, "output": {"plots": False},
        "sweep": {"grid": {"train.learning_rate": [0.003, 0.0003]}, "seeds": [1]}}))
    out = tmp_path / "sw"
    assert main(["sweep", str(config), "--output-dir", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    records = {c["name"]: _record(out / "trials" / c["runs"][0]) for c in summary["configurations"]}
    assert len(records) == 2
    for c in summary["configurations"]:
        m = records[c["name"]]
        for k in METRICS:
            assert c["validation"][k]["mean"] == pytest.approx(getattr(m.validation, k)), k
            assert c["test"][k]["mean"] == pytest.approx(getattr(m.test, k)), k
    best = max(records, key=lambda n: records[n].validation.micro_f1)
    assert summary["best"]["name"] == best and summary["best"]["selected_by"].startswith("validation micro_f1")
    [sec] = collect([out]).sections
    assert sec.task.multi_label and sec.metric == "micro_f1" and sec.best.name == Path(records[best].run_dir).name


def test_single_label_sweep_summary_keeps_its_two_metrics(tmp_path):
    """Single-label rows (as the runner builds them) carry no multi-label figures into sweep.json."""
    m = _record(make_run(tmp_path, "r"))
    brief = _brief(m)
    row = {"name": "r-seed1", "configuration": "r", "status": "completed", "trainable_params": 1,
           "validation": {k: brief["validation"][k] for k in METRICS}, "test": brief["test"], "train_seconds": 1.0}
    summary = summarize([row], "macro_f1")
    [conf] = summary["configurations"]
    assert set(conf["validation"]) == set(conf["test"]) == {"accuracy", "macro_f1"}
    assert set(summary["runs"][0]["validation"]) == {"accuracy", "macro_f1"}
    assert conf["validation"]["macro_f1"]["mean"] == m.validation.macro_f1


# ---------------------------------------------------------------- tracking

@pytest.mark.skipif(not _tensorboard(), reason="tensorboard not installed")
def test_tensorboard_logs_the_multilabel_figures(ml_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = ml_runs[0]
    record = _record(run)
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for k in ("micro_f1", "samples_f1", "hamming_loss", "accuracy", "macro_f1"):
        assert ea.Scalars(f"test.{k}")[-1].value == pytest.approx(getattr(record.test, k), rel=1e-6), k
        assert ea.Scalars(f"validation.{k}")[-1].value == pytest.approx(getattr(record.validation, k), rel=1e-6), k
    for name, t in record.test_at_threshold.thresholds.items():
        assert ea.Scalars(f"test_at_threshold.thresholds.{name}")[-1].value == pytest.approx(t, rel=1e-6)
    assert not any("confusion" in t for t in tags)  # 2x2 lists stay in metrics.json
    # per epoch: val/micro_f1 (not in history.jsonl), whose best epoch's point is the recorded validation figure
    epochs = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    points = {s.step: s.value for s in ea.Scalars("val/micro_f1")}
    assert sorted(points) == [e["step"] for e in epochs]
    best_step = next(e["step"] for e in epochs if e["epoch"] == record.best_epoch)
    assert points[best_step] == pytest.approx(record.validation.micro_f1, rel=1e-6)
    assert max(points.values()) == pytest.approx(record.validation.micro_f1, rel=1e-6)  # selected by micro-F1
    for k in ("samples_f1", "hamming_loss"):
        assert len(ea.Scalars(f"val/{k}")) == len(epochs)
    subset = [s.value for s in ea.Scalars("val/accuracy")]
    assert subset == pytest.approx([e["validation"]["accuracy"] for e in epochs], rel=1e-6)
    assert np.all(np.isfinite(list(points.values())))
