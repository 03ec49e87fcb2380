"""The report's charts, each returned as a base64 PNG so the HTML stays one self-contained file."""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from peftlab.reports.collect import Group, Section
from peftlab.runs.plots import confusion_figure, draw_label_scores, most_frequent, plain_text
from peftlab.tasks import SINGLE_LABEL, Task

MIB = 2**20


@dataclass
class Chart:
    title: str
    png_base64: str
    note: str = ""


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _barh_figure(groups: list[Group]) -> tuple[Figure, object, np.ndarray]:
    """Horizontal bars, one row per configuration: long run names stay readable on the y axis."""
    fig = Figure(figsize=(7.5, 1.2 + 0.45 * len(groups)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(groups))
    ax.set_yticks(y, [g.name for g in groups])
    ax.invert_yaxis()  # same order as the table, top to bottom
    ax.grid(axis="x", alpha=0.3)
    return fig, ax, y


def _nan(v):
    """None -> NaN, which matplotlib leaves out (no bar, no zero-width error bar for a single seed)."""
    return np.nan if v is None else v


def _clipped(stats: list[tuple], low: float = 0.0, high: float = np.inf) -> np.ndarray:
    """Error bars of (mean, std) as (below, above), never reaching outside [low, high] (an accuracy
    cannot exceed 1, a time cannot be negative)."""
    below = [np.nan if m is None or s is None else min(s, m - low) for m, s in stats]
    above = [np.nan if m is None or s is None else min(s, high - m) for m, s in stats]
    return np.array([below, above])


def _truncated_note(start: float) -> str:
    return f"; axis starts at {start:.2f}, not 0" if start > 0 else ""


def scores_chart(groups: list[Group], task: Task = SINGLE_LABEL) -> Chart:
    fig, ax, y = _barh_figure(groups)
    scores = task.chart_scores
    h = 0.76 / len(scores)
    for i, (key, label) in enumerate(scores):
        stats = [g.stat("test", key) for g in groups]
        ax.barh(y + (i - (len(scores) - 1) / 2) * h, [_nan(m) for m, _ in stats], h, label=label,
                xerr=_clipped(stats, 0.0, 1.0), capsize=3)
    lows = [g.mean("test", k) for g in groups for k, _ in scores]
    lows = [v for v in lows if v is not None]
    # Zoom in on the range the scores occupy (differences between methods are often small), and say so.
    start = round(max(0.0, min(lows, default=0.0) - 0.05), 2)
    ax.set_xlim(start, 1.0)
    ax.set_xlabel(f"score (error bars: std over seeds, clipped to [0, 1]{_truncated_note(start)})")
    fig.legend(loc="outside lower center", ncol=len(scores))  # below the axes: never over a bar
    return Chart("Test metrics by configuration", _png(fig), task.chart_note)


def params_chart(groups: list[Group]) -> Chart:
    fig, ax, y = _barh_figure(groups)
    ax.barh(y, [_nan(g.mean("params", "trainable")) for g in groups], color="tab:purple")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    return Chart("Trainable parameters", _png(fig))


def time_chart(groups: list[Group]) -> Chart:
    fig, ax, y = _barh_figure(groups)
    ax.barh(y, [_nan(g.mean("efficiency", "train_seconds")) for g in groups],
            xerr=_clipped([g.stat("efficiency", "train_seconds") for g in groups]), capsize=3, color="tab:orange")
    ax.set_xlabel("training time (s)")
    return Chart("Training time", _png(fig))


def memory_chart(groups: list[Group]) -> Chart:
    fig, ax, y = _barh_figure(groups)
    kinds = [g.first.value("efficiency", "peak_memory_kind") for g in groups]
    colors = ["tab:red" if k == "gpu_max_allocated" else "tab:gray" for k in kinds]
    values = [g.mean("efficiency", "peak_memory_bytes") for g in groups]
    ax.barh(y, [np.nan if v is None else v / MIB for v in values], color=colors)
    ax.set_xlabel("peak memory (MiB)")
    note = ""
    if len(set(kinds)) > 1:
        note = "Red: GPU max allocated; grey: CPU peak RSS. The two are not comparable."
    return Chart("Peak memory", _png(fig), note)


def pareto_chart(groups: list[Group], task: Task = SINGLE_LABEL) -> Chart:
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    pts = [(g.mean("params", "trainable"), g.stat("test", "accuracy"), g) for g in groups]
    pts = [(p, s, g) for p, s, g in pts if p is not None and s[0] is not None]
    for p, (acc, std), g in pts:
        ax.errorbar(p, acc, yerr=_clipped([(acc, std)], 0.0, 1.0), fmt="o", capsize=3,
                    color="tab:green" if g.on_pareto else "tab:gray", ms=8 if g.on_pareto else 6)
        ax.annotate(g.name, (p, acc), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = sorted((p, s[0]) for p, s, g in pts if g.on_pareto)
    if front:
        ax.plot(*zip(*front), color="tab:green", lw=1.5, label="Pareto front")
        fig.legend(loc="outside lower center")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    bottom = ax.get_ylim()[0]
    accuracy = f"test {task.metric_label('accuracy')}"
    ax.set_ylabel(f"{accuracy}{' (axis starts at %.2f, not 0)' % bottom if bottom > 0 else ''}")
    ax.grid(alpha=0.3)
    return Chart(f"{accuracy.capitalize()} vs trainable parameters", _png(fig),
                 "Green: on the Pareto front (no other configuration is as accurate with fewer trainable parameters).")


def curves_chart(groups: list[Group]) -> Chart | None:
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(groups))]
    drawn = False
    for g, color in zip(groups, colors):
        for i, run in enumerate(g.runs):  # every seed in its configuration's colour, labelled once
            steps = [r for r in run.history if r.get("kind") == "step" and r.get("loss") is not None]
            if steps:
                ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color=color, lw=1.1,
                        alpha=0.85, label=g.name if i == 0 else None)
                drawn = True
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)  # beside the axes: never over a curve
    return Chart("Training loss", _png(fig))


def label_scores_chart(report: Section) -> Chart | None:
    """Multi-label: the best run's test precision, recall and F1 per label (and F1 at its thresholds)."""
    run = report.best_run
    test, names = run.metrics.test, run.metrics.get("label_names")
    if test is None or not test.per_class or not names:
        return None
    per_class = {n: s.model_dump() for n, s in test.per_class.items()}
    at = run.metrics.test_at_threshold
    at_threshold = {n: s.model_dump() for n, s in at.per_class.items()} if at is not None and at.per_class else None
    shown, note = most_frequent(names, per_class)
    if not shown:
        return None
    fig = Figure(figsize=(7.5, 1.6 + 0.42 * len(shown)), layout="constrained")
    draw_label_scores(fig.subplots(), per_class, shown, at_threshold)
    fig.legend(loc="outside lower center", ncol=4, fontsize=8)
    return Chart(f"Test precision, recall and F1 per label of the best run by validation ({run.name})", _png(fig),
                 "Labels predicted when p ≥ 0.5" + (f"; {note}" if note else "")
                 + ("; the purple bar: F1 at the run's thresholds." if at_threshold else "."))


def confusion_chart(report: Section) -> Chart | None:
    """The best run's test confusion matrix (a multi-label section has none: a 2x2 confusion per label,
    and label_scores_chart shows its per-label scores)."""
    run = report.best_run
    matrix, names = run.value("test", "confusion_matrix"), run.metrics.get("label_names")
    if not matrix or not names:
        return None
    fig = confusion_figure(matrix, names)
    return Chart(f"Test confusion matrix of the best run by validation ({run.name})", _png(fig))


# the chart of the best run, by the task's Task.best_run_chart
BEST_RUN_CHARTS = {"confusion_matrix": confusion_chart, "label_scores": label_scores_chart}


@plain_text
def all_charts(report: Section) -> list[Chart]:
    g, task = report.groups, report.task
    charts = [scores_chart(g, task), pareto_chart(g, task), params_chart(g), time_chart(g), memory_chart(g),
              curves_chart(g), BEST_RUN_CHARTS[task.best_run_chart](report)]
    return [c for c in charts if c is not None]
