"""PNG plots of one run directory: training loss, validation per epoch, test confusion matrix, confidence,
reliability diagram. A multi-label run (a set of labels per text) gets per-label figures instead of the
class confusion matrix: precision/recall/F1 per label and a 2x2 confusion per label; its confidence and
reliability plots are over every label decision (label predicted when its probability is >= 0.5, the
rule of the record's `test` figures), with confidence max(p, 1 - p).

Figures are built with matplotlib's object API (`Figure`, rendered by Agg when saved) rather than
pyplot, so nothing touches the global backend or pyplot's figure registry: safe in servers, threads
and notebooks alike.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from peftlab import tasks
from peftlab.files import replacing
from peftlab.runs.record import RunRecord
from peftlab.runs.rundir import RunDir
from peftlab.tasks import MULTI_LABEL, SINGLE_LABEL, Task
from peftlab.tasks.metrics import ECE_BINS, reliability_bins, softmax

MAX_LABELS_SHOWN = 48  # per-label figures: beyond that, the most frequent labels only
# confusion matrices: counts in the cells up to ANNOTATED classes; beyond MAX_CLASSES_SHOWN, the classes
# with the most errors only; the figure never grows past MAX_FIGURE_INCHES a side (1,400 px at 100 dpi),
# so that its memory is bounded at any class count (600 classes made a 27,500 px image before)
ANNOTATED_CLASSES, MAX_CLASSES_SHOWN, MAX_FIGURE_INCHES = 30, 50, 14.0


def read_history(run_dir: Path) -> list[dict]:
    """Rows of history.jsonl; a torn last line (run killed mid-write) is skipped, not fatal."""
    path = RunDir(run_dir).history_file
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


def most_confused(matrix, names: list[str], limit: int = MAX_CLASSES_SHOWN) -> tuple[np.ndarray, list[str], str]:
    """The confusion matrix to draw: all of it, or the `limit` classes with the most errors (as true
    class or as prediction, in `names` order); and the words saying so ("" when all are shown)."""
    m = np.asarray(matrix, dtype=np.int64)
    if len(names) <= limit:
        return m, list(names), ""
    errors = m.sum(axis=0) + m.sum(axis=1) - 2 * np.diag(m)
    keep = np.sort(np.argsort(-errors, kind="stable")[:limit])
    return m[np.ix_(keep, keep)], [names[i] for i in keep], f"the {limit} classes with the most errors, of {len(names)}"


def confusion_figure(matrix, names: list[str], title: str = "") -> Figure:
    """A confusion matrix as a figure of bounded size at any class count (most_confused)."""
    shown, shown_names, note = most_confused(matrix, names)
    size = min(MAX_FIGURE_INCHES, max(4.5, 0.45 * len(shown_names) + 2.5))
    fig = _new_figure(size, size)
    draw_confusion(fig.subplots(), shown, shown_names, "\n".join(t for t in (title, note) if t))
    return fig


def draw_confusion(ax, matrix, names: list[str], title: str = "") -> None:
    """Counts as a heat map, rows = true class, columns = predicted, each cell annotated up to
    ANNOTATED_CLASSES classes."""
    m = np.asarray(matrix, dtype=int)
    ax.imshow(m, cmap="Blues")
    ticks = range(len(names))
    small = {"fontsize": 6} if len(names) > ANNOTATED_CLASSES else {}
    ax.set_xticks(ticks, names, rotation=45 if not small else 90, ha="right" if not small else "center", **small)
    ax.set_yticks(ticks, names, **small)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if len(names) <= ANNOTATED_CLASSES:  # beyond that the numbers would not be legible
        threshold = m.max() / 2 if m.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > threshold else "black")


def _nan_or(value) -> float:
    return np.nan if value is None else value


def plain_text(function):
    """Titles, ticks and legends hold data (label and run names): drawn as written, never as mathtext,
    where a name like "$\\frac{$" would stop the whole run at its last step."""
    @functools.wraps(function)
    def drawn_plainly(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return function(*args, **kwargs)
    return drawn_plainly


def _save(fig: Figure, out: Path) -> None:
    with replacing(out) as tmp:  # a failed write leaves no truncated PNG
        fig.savefig(tmp, dpi=100, format="png")


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
    _save(fig, out)
    return out


def _validation_plot(history: list[dict], out: Path, task: Task = SINGLE_LABEL) -> Path | None:
    epochs = [r for r in history if r.get("kind") == "epoch" and isinstance(r.get("validation"), dict)]
    if not epochs:
        return None
    fig = _new_figure()
    ax = fig.subplots()
    x = [r["epoch"] for r in epochs]
    # the task's first two figures always; its others where history.jsonl holds them
    keys = list(task.validation_curves[:2])
    keys += [(k, label) for k, label in task.validation_curves[2:]
             if any(r["validation"].get(k) is not None for r in epochs)]
    for key, label in keys:
        ax.plot(x, [_nan_or(r["validation"].get(key)) for r in epochs], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation score")
    ax.set_title("Validation per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out)
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
    _save(confusion_figure(matrix, names, "Test confusion matrix"), out)
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
    _save(fig, out)
    return out


def _reliability_curve(ax, probs: np.ndarray, labels: np.ndarray, label: str, color: str, offset: float) -> float:
    """Accuracy per confidence bin as bars (shifted by `offset` of a bin width); returns the ECE."""
    return _reliability_bars(ax, probs.max(axis=1), probs.argmax(axis=1) == labels, label, color, offset)


def _reliability_bars(ax, conf: np.ndarray, correct: np.ndarray, label: str, color: str, offset: float) -> float:
    """Accuracy per confidence bin of any decisions (confidence, whether right), as bars; returns the ECE."""
    bins = reliability_bins(conf, correct)
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / len(conf)
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
    _save(fig, out)
    return out


# ---------------------------------------------------------------- multi-label runs

def run_task(record: RunRecord | None, predictions: pd.DataFrame | None) -> Task:
    """The record says; without one, the columns of predictions.csv (a multi-label one has label
    probabilities but no confidence column; a single-label one always has it)."""
    if record is not None:
        return record.kind
    return tasks.of_predictions(predictions.columns) if predictions is not None else SINGLE_LABEL


def label_separator(run_dir: Path, record: RunRecord | None) -> str:
    """data.label_separator of the run (its record's config, else its config.yaml; default "|")."""
    config = (record.config if record is not None else None) or {}
    if not config:
        try:
            config = yaml.safe_load(RunDir(run_dir).config_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            config = {}
    data = config.get("data") if isinstance(config, dict) else None
    return str((data if isinstance(data, dict) else {}).get("label_separator") or "|")


def label_sets(cells, names: list[str], separator: str) -> np.ndarray:
    """predictions.csv label-set cells ("a|c", "" for none) as a 0/1 matrix (texts, labels)."""
    return MULTI_LABEL.parse_cells(cells, names, separator)


def label_decisions(predictions: pd.DataFrame | None, names: list[str], separator: str,
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """(true 0/1 labels, label probabilities), both (texts, labels), from a multi-label predictions.csv;
    rows with an unreadable probability are left out. None without the columns."""
    columns = [f"prob_{n}" for n in names]
    if predictions is None or predictions.empty or not names or not set(columns) <= set(predictions.columns):
        return None
    probs = predictions[columns].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    keep = ~np.isnan(probs).any(axis=1)
    if not keep.any():
        return None
    return label_sets(predictions["label"].to_numpy()[keep], names, separator), probs[keep]


def _label_names(record: RunRecord | None, predictions: pd.DataFrame | None) -> list[str]:
    if record is not None and record.label_names:
        return list(record.label_names)
    if predictions is None:
        return []
    return [str(c)[len("prob_"):] for c in predictions.columns if str(c).startswith("prob_")]


def _label_details(record: RunRecord | None, decisions) -> tuple[dict, dict] | None:
    """(per label {precision, recall, f1, support}, per label [[tn, fp], [fn, tp]]) at the 0.5 decisions:
    the record's test figures, else counted from predictions.csv."""
    if record is not None and record.test is not None and record.test.label_confusion:
        per_class = {n: s.model_dump() for n, s in record.test.per_class.items()}
        return per_class, dict(record.test.label_confusion)
    if decisions is None:
        return None
    from peftlab.tasks.multi_label_metrics import multilabel_metrics

    labels, probs, names = decisions
    m = multilabel_metrics(labels, probs, names)
    return m["per_class"], m["label_confusion"]


def most_frequent(names: list[str], per_class: dict, limit: int = MAX_LABELS_SHOWN) -> tuple[list[str], str]:
    """The labels a per-label figure shows (in `names` order): all, or the `limit` with the most test
    support; and the words saying so ("" when all are shown)."""
    names = [n for n in names if n in per_class]
    if len(names) <= limit:
        return names, ""
    keep = set(sorted(names, key=lambda n: -int(per_class[n].get("support") or 0))[:limit])
    return [n for n in names if n in keep], f"the {limit} most frequent of {len(names)} labels"


def draw_label_scores(ax, per_class: dict, names: list[str], at_threshold: dict | None = None) -> None:
    """Precision, recall and F1 per label as horizontal bars (one row per label, its support beside its
    name); with `at_threshold` (label -> scores at the run's thresholds), that F1 as a fourth bar."""
    names = [n for n in names if n in per_class]
    y = np.arange(len(names))
    keys = [("precision", "precision", "tab:blue"), ("recall", "recall", "tab:orange"), ("f1", "F1", "tab:green")]
    bars = len(keys) + (1 if at_threshold else 0)
    h = 0.8 / bars
    for i, (key, label, color) in enumerate(keys):
        ax.barh(y + (i - (bars - 1) / 2) * h, [per_class[n].get(key, np.nan) for n in names], h, label=label,
                color=color)
    if at_threshold:
        ax.barh(y + (bars - 1) / 2 * h, [(at_threshold.get(n) or {}).get("f1", np.nan) for n in names], h,
                label="F1 at the run's thresholds", color="tab:purple")
    ax.set_yticks(y, [f"{n} ({per_class[n].get('support', 0)})" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("test score (label support in brackets)")
    ax.grid(axis="x", alpha=0.3)


def _scores_dump(per_class) -> dict | None:
    if not per_class:
        return None
    return {n: (s.model_dump() if hasattr(s, "model_dump") else dict(s)) for n, s in per_class.items()}


def _label_scores_plot(record: RunRecord | None, details, names: list[str], out: Path) -> Path | None:
    if details is None or not names:
        return None
    per_class, _ = details
    shown, note = most_frequent(names, per_class)
    if not shown:
        return None
    at = record.test_at_threshold if record is not None else None
    fig = _new_figure(7.0, 1.6 + 0.42 * len(shown))
    ax = fig.subplots()
    draw_label_scores(ax, per_class, shown, _scores_dump(at.per_class) if at is not None else None)
    title = "Test precision, recall, F1 per label\n(label predicted when p ≥ 0.5)"
    ax.set_title(title + (f"\n{note}" if note else ""))
    fig.legend(loc="outside lower center", ncol=4, fontsize=8)
    _save(fig, out)
    return out


def _label_confusion_plot(details, names: list[str], out: Path) -> Path | None:
    """One 2x2 confusion per label (rows true no/yes, columns predicted no/yes), up to MAX_LABELS_SHOWN
    labels (the most frequent ones beyond that)."""
    if details is None or not names:
        return None
    per_class, confusion = details
    shown, note = most_frequent([n for n in names if n in confusion], per_class)
    title = "Test confusion per label (label predicted when p ≥ 0.5)" + (f", {note}" if note else "")
    if not shown:
        return None
    cols = min(len(shown), 4 if len(shown) <= 16 else 6)
    rows = -(-len(shown) // cols)
    fig = _new_figure(2.4 * cols + 0.4, 2.3 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax, name in zip(axes, shown):
        m = np.asarray(confusion[name], dtype=int)
        ax.imshow(m, cmap="Blues", vmin=0)
        ax.set_xticks([0, 1], ["no", "yes"])
        ax.set_yticks([0, 1], ["no", "yes"])
        f1 = (per_class.get(name) or {}).get("f1")
        ax.set_title(name if f1 is None else f"{name} (F1 {f1:.2f})", fontsize=9)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    fig.supxlabel("predicted", fontsize=9)
    fig.supylabel("true", fontsize=9)
    fig.suptitle(title, fontsize=10)
    _save(fig, out)
    return out


def _decision_confidence(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every label decision at 0.5: its confidence max(p, 1 - p) and whether it is right (flattened)."""
    return np.maximum(probs, 1 - probs).reshape(-1), ((probs >= 0.5) == (labels == 1)).reshape(-1)


def _label_confidence_plot(decisions, out: Path) -> Path | None:
    if decisions is None:
        return None
    labels, probs, _ = decisions
    conf, correct = _decision_confidence(labels, probs)
    fig = _new_figure()
    ax = fig.subplots()
    ax.hist([conf[correct], conf[~correct]], bins=np.linspace(0.5, 1, 11), stacked=True,
            color=["tab:green", "tab:red"],
            label=[f"right ({int(correct.sum())})", f"wrong ({int((~correct).sum())})"])
    ax.set_xlabel("confidence max(p, 1 − p) of each label decision")
    ax.set_ylabel("label decisions (texts × labels)")
    ax.set_title("Test confidence of every label decision\n(label predicted when p ≥ 0.5)", fontsize=10)
    ax.legend()
    _save(fig, out)
    return out


def _label_reliability_plot(record: RunRecord | None, decisions, out: Path) -> Path | None:
    """Share of right label decisions per confidence bin (max(p, 1 - p), 15 equal-width bins over [0, 1], as
    the record's ECE), with the calibration temperature's probabilities beside when the run fitted one."""
    if decisions is None:
        return None
    from peftlab.tasks.multi_label_metrics import sigmoid

    labels, probs, _ = decisions
    fig = _new_figure(5.2, 5.0)
    ax = fig.subplots()
    ax.plot([0.5, 1], [0.5, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    calibration = record.calibration if record is not None else None
    _reliability_bars(ax, *_decision_confidence(labels, probs), "model", "tab:blue", -0.25 if calibration else 0.0)
    if calibration is not None:
        clipped = np.clip(probs, 1e-15, 1 - 1e-15)
        scaled = sigmoid(np.log(clipped / (1 - clipped)) / calibration.temperature)
        _reliability_bars(ax, *_decision_confidence(labels, scaled), f"temperature {calibration.temperature:.2f}",
                          "tab:orange", 0.25)
    ax.set_xlim(0.45, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence max(p, 1 − p) of each label decision")
    ax.set_ylabel("share of right decisions")
    ax.set_title("Test reliability, every label decision\n(label predicted when p ≥ 0.5)", fontsize=10)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)  # below the axes: never over a bar
    _save(fig, out)
    return out


def _label_set_plots(run_dir: Path, record: RunRecord | None, predictions: pd.DataFrame | None,
                     out: Path) -> list[Path | None]:
    names = _label_names(record, predictions)
    found = label_decisions(predictions, names, label_separator(run_dir, record))
    decisions = (*found, names) if found is not None else None
    details = _label_details(record, decisions)
    return [_label_scores_plot(record, details, names, out / "label_scores.png"),
            _label_confusion_plot(details, names, out / "label_confusion.png"),
            _label_confidence_plot(decisions, out / "confidence.png"),
            _label_reliability_plot(record, decisions, out / "reliability.png")]


def _class_plots(run_dir: Path, record: RunRecord | None, predictions: pd.DataFrame | None,
                 out: Path) -> list[Path | None]:
    return [_confusion_plot(record, predictions, out / "confusion_matrix.png"),
            _confidence_plot(predictions, out / "confidence.png"),
            _reliability_plot(record, predictions, out / "reliability.png")]


# a task's plots beside loss and validation (Task.plot_set): one class per text, or a set of labels
PLOT_SETS = {"classes": _class_plots, "label_sets": _label_set_plots}


def _read_predictions(run_dir: Path) -> pd.DataFrame | None:
    path = RunDir(run_dir).predictions_file
    if not path.is_file():
        return None
    # keep_default_na=False: class names such as "None" or "NA" must stay strings.
    df = pd.read_csv(path, keep_default_na=False, dtype={"label": str, "predicted": str})
    return df if {"label", "predicted"} <= set(df.columns) else None


@plain_text
def write_plots(run_dir: Path, record: RunRecord | None = None) -> list[Path]:
    """Write loss.png, validation.png, confusion_matrix.png, confidence.png, reliability.png into run_dir/plots/, from
    `record` (default: the run's metrics.json), history.jsonl and predictions.csv. A multi-label run gets
    label_scores.png and label_confusion.png instead of confusion_matrix.png, and its confidence.png and
    reliability.png are over every label decision.

    A plot whose data is missing is skipped; the written paths are returned.
    """
    run_dir = Path(run_dir)
    history = read_history(run_dir)
    record = record or RunRecord.read_or_none(RunDir(run_dir).metrics_file)
    predictions = _read_predictions(run_dir)
    out = RunDir(run_dir).plots
    out.mkdir(parents=True, exist_ok=True)
    task = run_task(record, predictions)
    written = [_loss_plot(history, out / "loss.png"), _validation_plot(history, out / "validation.png", task)]
    written += PLOT_SETS[task.plot_set](run_dir, record, predictions, out)
    return [p for p in written if p is not None]
