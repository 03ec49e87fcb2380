"""PNG plots of one run directory: training loss, validation per epoch, test confusion matrix, confidence,
reliability diagram.

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

from peftlab.evaluation.metrics import ECE_BINS, reliability_bins, softmax
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


def _reliability_curve(ax, probs: np.ndarray, labels: np.ndarray, label: str, color: str, offset: float) -> float:
    """Accuracy per confidence bin as bars (shifted by `offset` of a bin width); returns the ECE."""
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    bins = reliability_bins(conf, correct)
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / len(labels)
    width = 1.0 / ECE_BINS
    full = [b for b in bins if b["count"]]
    ax.bar([b["lower"] + width * (0.5 + offset) for b in full], [b["accuracy"] for b in full], width=width * 0.45,
           color=color, alpha=0.8, label=f"{label} (ECE {ece:.3f})")
    return ece


def _reliability_plot(record: RunRecord | None, predictions: pd.DataFrame | None, out: Path) -> Path | None:
    """Test accuracy per confidence bin (15 equal-width bins) against the diagonal; with the calibration
    temperature's probabilities beside the model's own when the run fitted one."""
    names = record.label_names if record is not None and record.label_names else None
    if predictions is None or predictions.empty or not names:
        return None
    columns = [f"prob_{n}" for n in names]
    if not set(columns) <= set(predictions.columns):
        return None
    probs = predictions[columns].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    index = {str(n): i for i, n in enumerate(names)}
    labels = predictions["label"].astype(str).map(index).fillna(-1).to_numpy(int)
    keep = ~np.isnan(probs).any(axis=1) & (labels >= 0)
    if not keep.any():
        return None
    probs, labels = probs[keep], labels[keep]
    fig = _new_figure(5.2, 4.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    calibration = record.calibration
    _reliability_curve(ax, probs, labels, "model", "tab:blue", -0.25 if calibration else 0.0)
    if calibration is not None:
        scaled = softmax(np.log(np.clip(probs, 1e-30, 1.0)) / calibration.temperature)
        _reliability_curve(ax, scaled, labels, f"temperature {calibration.temperature:.2f}", "tab:orange", 0.25)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title("Test reliability")
    ax.legend(loc="upper left")
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
    """Write loss.png, validation.png, confusion_matrix.png, confidence.png, reliability.png into run_dir/plots/, from
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
        _reliability_plot(record, predictions, out / "reliability.png"),
    ]
    return [p for p in written if p is not None]
