"""PNG plots of one run directory: training loss, validation per epoch, test confusion matrix, confidence.

Figures are built with matplotlib's object API (`Figure`, rendered by Agg when saved) rather than
pyplot, so nothing touches the global backend or pyplot's figure registry: safe in servers, threads
and notebooks alike.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from peftlab.runs.record import RunRecord


def read_history(run_dir: Path) -> list[dict]:
    """Rows of history.jsonl; a torn last line (run killed mid-write) is skipped, not fatal."""
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def draw_confusion(ax, matrix, names: list[str], title: str = "") -> None:
    """Counts as a heat map, rows = true class, columns = predicted, each cell annotated."""
    m = np.asarray(matrix, dtype=int)
    ax.imshow(m, cmap="Blues")
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if len(names) <= 30:  # beyond that the numbers would not be legible
        threshold = m.max() / 2 if m.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > threshold else "black")


def _new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _loss_plot(history: list[dict], out: Path) -> Path | None:
    steps = [r for r in history if r.get("kind") == "step" and r.get("loss") is not None]
    if not steps:
        return None
    fig = _new_figure()
    ax = fig.subplots()
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    return out


def _validation_plot(history: list[dict], out: Path) -> Path | None:
    epochs = [r for r in history if r.get("kind") == "epoch" and isinstance(r.get("validation"), dict)]
    if not epochs:
        return None
    fig = _new_figure()
    ax = fig.subplots()
    x = [r["epoch"] for r in epochs]
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        ax.plot(x, [r["validation"].get(key, np.nan) for r in epochs], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation score")
    ax.set_title("Validation per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=100)
    return out


def _confusion_plot(record: RunRecord | None, predictions: pd.DataFrame | None, out: Path) -> Path | None:
    names = record.label_names if record is not None else None
    matrix = record.test.confusion_matrix if record is not None and record.test is not None else None
    if (matrix is None or not names) and predictions is not None:
        # No metrics.json yet (or an older one): count from the predictions themselves.
        names = names or sorted(set(predictions["label"]) | set(predictions["predicted"]))
        index = {n: i for i, n in enumerate(names)}
        m = np.zeros((len(names), len(names)), dtype=int)
        for t, p in zip(predictions["label"], predictions["predicted"]):
            if t in index and p in index:
                m[index[t], index[p]] += 1
        matrix = m
    if matrix is None or not names:
        return None
    size = max(4.0, 0.45 * len(names) + 2.5)
    fig = _new_figure(size, size)
    draw_confusion(fig.subplots(), matrix, names, "Test confusion matrix")
    fig.savefig(out, dpi=100)
    return out


def _confidence_plot(predictions: pd.DataFrame | None, out: Path) -> Path | None:
    if predictions is None or "confidence" not in predictions or predictions.empty:
        return None
    conf = pd.to_numeric(predictions["confidence"], errors="coerce")
    correct = predictions["label"] == predictions["predicted"]
    fig = _new_figure()
    ax = fig.subplots()
    bins = np.linspace(0, 1, 21)
    ax.hist([conf[correct].dropna(), conf[~correct].dropna()], bins=bins, stacked=True,
            color=["tab:green", "tab:red"],
            label=[f"correct ({int(correct.sum())})", f"incorrect ({int((~correct).sum())})"])
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("test examples")
    ax.set_title("Test confidence")
    ax.legend()
    fig.savefig(out, dpi=100)
    return out


def _read_predictions(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "predictions.csv"
    if not path.is_file():
        return None
    # keep_default_na=False: class names such as "None" or "NA" must stay strings.
    df = pd.read_csv(path, keep_default_na=False, dtype={"label": str, "predicted": str})
    return df if {"label", "predicted"} <= set(df.columns) else None


def write_plots(run_dir: Path, record: RunRecord | None = None) -> list[Path]:
    """Write loss.png, validation.png, confusion_matrix.png, confidence.png into run_dir/plots/, from
    `record` (default: the run's metrics.json), history.jsonl and predictions.csv.

    A plot whose data is missing is skipped; the written paths are returned.
    """
    run_dir = Path(run_dir)
    history = read_history(run_dir)
    record = record or RunRecord.read_or_none(run_dir / "metrics.json")
    predictions = _read_predictions(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _loss_plot(history, out / "loss.png"),
        _validation_plot(history, out / "validation.png"),
        _confusion_plot(record, predictions, out / "confusion_matrix.png"),
        _confidence_plot(predictions, out / "confidence.png"),
    ]
    return [p for p in written if p is not None]
