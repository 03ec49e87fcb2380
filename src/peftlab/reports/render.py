"""Format the collected report as one self-contained HTML page and as Markdown.

Both writers take their cell text from `result_rows`, so the two files always show the same numbers,
each formatted one way: metrics with 4 decimals, counts with thousands separators.
"""
from __future__ import annotations

import datetime as _dt
import html
import re
from pathlib import Path

from peftlab.models.methods import registry
from peftlab.reports.charts import Chart
from peftlab.reports.collect import Group, Report, Section
from peftlab.tasks import SINGLE_LABEL, Task

MIB = 2**20
DASH = "–"
CONFIG_COLUMNS = ["run", "seeds", "method", "model", "r", "alpha", "dropout", "targets"]
COST_COLUMNS = ["trainable params", "trainable %", "train time", "peak memory", "Pareto"]
COLUMNS = CONFIG_COLUMNS + ["val acc", "val F1", "test acc", "test F1"] + COST_COLUMNS

AT_THRESHOLDS = " @ thresholds"  # test_at_threshold's figures: the run's eval.threshold, not p >= 0.5


def metric_label(metric: str, task: Task = SINGLE_LABEL) -> str:
    return task.metric_label(metric)


def _has_thresholds(sec: Section) -> bool:
    return any(r.metrics.test_at_threshold is not None for g in sec.groups for r in g.runs)


def validation_columns(sec: Section) -> dict[str, str]:
    """A section with its own columns (multi-label): validation accuracy (subset) and macro-F1, and the
    selection metric where it is neither."""
    keys = ["accuracy", "macro_f1"] + ([sec.metric] if sec.metric not in ("accuracy", "macro_f1") else [])
    return {f"val {metric_label(k, sec.task).replace('subset accuracy', 'subset acc')}": k for k in keys}


def columns(sec: Section) -> list[str]:
    """The results table's columns: a task with its own figures (multi-label) has its own columns, and the
    test figures at the runs' thresholds where any run has them (eval.threshold tune or a fixed value)."""
    test = sec.task.report_columns
    if not test:
        return COLUMNS
    thresholds = ["thresholds"] + [c + AT_THRESHOLDS for c in test] if _has_thresholds(sec) else []
    return CONFIG_COLUMNS + list(validation_columns(sec)) + list(test) + thresholds + COST_COLUMNS


def fmt_metric(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return DASH
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def fmt_count(x: float | None) -> str:
    return DASH if x is None else f"{round(x):,}"


def fmt_pct(x: float | None) -> str:
    return DASH if x is None else f"{x:.4f}%"


def fmt_seconds(x: float | None) -> str:
    return DASH if x is None else f"{x:,.1f} s"


def fmt_memory(nbytes: float | None, kind: str | None) -> str:
    if nbytes is None:
        return DASH
    where = {"gpu_max_allocated": "GPU", "cpu_peak_rss": "CPU RSS"}.get(kind or "", kind or "")
    return f"{nbytes / MIB:,.1f} MiB" + (f" ({where})" if where else "")


def _method_cell(g: Group) -> str:
    text = str((g.config.get("method") or {}).get("name", DASH))
    q = g.first.metrics.quantization
    if q and q.requested and q.used != q.requested:
        text += f" (quantization {q.requested} requested, {q.used or 'none'} used)"
    elif q and q.used:
        text += f" ({q.used})"
    if g.first.metrics.distill:
        text += " + distillation"
    return text


def _applies(method: dict, key: str) -> bool:
    """Whether a method.* setting means anything for this run's method (the method says)."""
    known = registry.find(str(method.get("name")))
    return known is None or key in known.hyperparameters


def _targets_cell(method: dict) -> str:
    if not _applies(method, "target_modules"):
        return "all weights"
    modules = ",".join(method.get("target_modules") or []) or "default modules"
    layers = method.get("layers")
    text = f"{modules}; " + (f"layers {','.join(map(str, layers))}" if layers else "all layers")
    if method.get("rank_pattern"):
        text += "; ranks " + ",".join(f"{k}={v}" for k, v in method["rank_pattern"].items())
    return text


def _hyper(method: dict, key: str) -> str:
    if not _applies(method, key) or method.get(key) is None:
        return DASH
    return f"{method[key]:g}"


def _threshold_rule(g: Group) -> str:
    """How the group's runs decide at their thresholds: tuned (per label or global, for which metric) or fixed."""
    at = g.first.metrics.test_at_threshold
    if at is None:
        return DASH
    if at.tuned_for == "fixed":
        values = sorted(set((at.thresholds or {}).values()))
        return f"fixed {values[0]:g}" if len(values) == 1 else "fixed"
    if str((g.config.get("eval") or {}).get("threshold_scope", "per_label")) == "global":
        return f"tuned globally for {metric_label(at.tuned_for, g.first.metrics.kind)}"
    return "tuned per label (each for its F1)"  # eval.threshold_scope=per_label maximises each label's F1


def _task_cells(sec: Section, g: Group) -> dict[str, str]:
    """The cells of the task's own columns (Task.report_columns); none for a task without them."""
    test = sec.task.report_columns
    if not test:
        return {}
    cells = {c: fmt_metric(*g.stat("validation", k)) for c, k in validation_columns(sec).items()}
    cells.update({c: fmt_metric(*g.stat("test", k)) for c, k in test.items()})
    if _has_thresholds(sec):
        cells["thresholds"] = _threshold_rule(g)
        cells.update({c + AT_THRESHOLDS: fmt_metric(*g.stat("test_at_threshold", k))
                      for c, k in test.items()})
    return cells


def result_rows(report: Section) -> list[dict[str, str]]:
    rows = []
    for g in report.groups:
        method = g.config.get("method") or {}
        rows.append({
            "run": g.name,
            "seeds": str(g.n),
            "method": _method_cell(g),
            "model": str((g.config.get("model") or {}).get("name", DASH)),
            "r": _hyper(method, "r"),
            "alpha": _hyper(method, "alpha"),
            "dropout": _hyper(method, "dropout"),
            "targets": _targets_cell(method),
            "val acc": fmt_metric(*g.stat("validation", "accuracy")),
            "val F1": fmt_metric(*g.stat("validation", "macro_f1")),
            "test acc": fmt_metric(*g.stat("test", "accuracy")),
            "test F1": fmt_metric(*g.stat("test", "macro_f1")),
            "trainable params": fmt_count(g.mean("params", "trainable")),
            "trainable %": fmt_pct(g.mean("params", "trainable_pct")),
            "train time": fmt_seconds(g.mean("efficiency", "train_seconds")),
            "peak memory": fmt_memory(g.mean("efficiency", "peak_memory_bytes"),
                                      g.first.value("efficiency", "peak_memory_kind")),
            "Pareto": "yes" if g.on_pareto else "",
            **_task_cells(report, g),
        })
    return rows


def _task_figures(g: Group, part: str, task: Task) -> str:
    """'subset accuracy is A, macro-F1 B, micro-F1 C, samples-F1 D and Hamming loss E' of metrics.json's `part`."""
    figures = [f"{metric_label(k, task)}{' is' if i == 0 else ''} {fmt_metric(*g.stat(part, k))}"
               for i, k in enumerate(task.report_columns.values())]
    return ", ".join(figures[:-1]) + " and " + figures[-1]


def best_summary(report: Section, esc=str) -> str:
    """One plain-text paragraph: the best configuration by validation, and its test figures. `esc` is
    applied to the names that come from the runs (escape_markdown for Markdown; HTML escapes it whole)."""
    task = report.task
    g, label = report.best, metric_label(report.metric, task)
    text = (f"Best by validation {label}: {esc(g.name)} (validation {label} "
            f"{fmt_metric(*g.stat('validation', report.metric))}). ")
    if task.report_columns:
        text += f"Its test {_task_figures(g, 'test', task)} (labels predicted when p ≥ 0.5)."
        at = g.first.metrics.test_at_threshold
        if at is not None:
            text += f" At its thresholds ({_threshold_rule(g)}): test {_task_figures(g, 'test_at_threshold', task)}."
    else:
        text += (f"Its test accuracy is {fmt_metric(*g.stat('test', 'accuracy'))} and test macro-F1 "
                 f"{fmt_metric(*g.stat('test', 'macro_f1'))}.")
    base_acc = g.mean("baseline", "test", "accuracy")
    if base_acc is not None:
        seeds = f" (mean over its {g.n} seeds)" if g.n > 1 else ""
        text += (f" Before fine-tuning the model scored test {metric_label('accuracy', task)} {fmt_metric(base_acc)}, "
                 f"macro-F1 {fmt_metric(g.mean('baseline', 'test', 'macro_f1'))}{seeds}.")
    if g.n > 1:
        text += (f" Its {task.best_run_figure} is that of seed run {esc(report.best_run.name)}, the best of its "
                 f"seeds by validation.")
    return text


NOTES = [
    "Runs whose configs differ only in train.seed (and output.dir) are one row: mean ± sample standard "
    "deviation over the distinct seeds (std only when there are several); repeats of one seed stay separate rows.",
    "Runs on different datasets (or label sets) are compared within their own section, never across.",
    "The best run is chosen by the validation metric; test figures are reported, never used to choose.",
    "Pareto: no other configuration reaches at least the same test accuracy (mean) with fewer trainable parameters.",
    "Peak memory: GPU = torch max allocated; CPU RSS = peak resident memory of the process.",
]
def notes(report: Report) -> list[str]:
    kinds = dict.fromkeys(sec.task for sec in sorted(report.sections, key=lambda sec: sec.task.order))
    return NOTES + [note for task in kinds for note in task.report_notes]


# ---------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem; color: #222; }
h1 { margin-bottom: .2rem; } .meta { color: #666; font-size: .9rem; }
.best { background: #eef7ee; border-left: 4px solid #3a3; padding: .6rem 1rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .8rem; margin: .5rem 0 1rem; width: 100%; }
th, td { border: 1px solid #ccc; padding: .25rem .4rem; text-align: right; }
th { white-space: normal; vertical-align: bottom; } td { white-space: normal; }
th { background: #f2f2f2; } .text { text-align: left; }
td.wrap { white-space: normal; min-width: 9rem; }
tr.best-row td { background: #eef7ee; font-weight: 600; }
figure { display: inline-block; margin: .5rem 1rem 1.5rem 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-weight: 600; margin-bottom: .3rem; } .note { color: #555; font-size: .85rem; }
"""

_TEXT_COLUMNS = {"run", "method", "model", "targets", "status", "path"}  # left-aligned
_WRAP_COLUMNS = {"targets"}  # long free text: let it wrap so the table fits the page


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _cell_class(column: str) -> str:
    return " ".join(c for c, on in (("text", column in _TEXT_COLUMNS), ("wrap", column in _WRAP_COLUMNS)) if on)


def _table(columns: list[str], rows: list[dict[str, str]], highlight: int | None = None) -> str:
    head = "".join(f'<th class="{_cell_class(c)}">{_e(c)}</th>' for c in columns)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="best-row"' if i == highlight else ""
        cells = "".join(f'<td class="{_cell_class(c)}">{_e(row[c])}</td>' for c in columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _figure(c: Chart) -> str:
    note = f'<div class="note">{_e(c.note)}</div>' if c.note else ""
    return (f"<figure><figcaption>{_e(c.title)}</figcaption>"
            f'<img src="data:image/png;base64,{c.png_base64}" alt="{_e(c.title)}">{note}</figure>')


def _section_html(sec: Section, charts: list[Chart], several: bool) -> str:
    title = f"<h2>{_e(sec.dataset)}</h2>" if several else ""
    return f"""{title}
<p class="best" id="best">{_e(best_summary(sec))}</p>
<h{3 if several else 2}>Results</h{3 if several else 2}>
{_table(columns(sec), result_rows(sec), sec.groups.index(sec.best))}
<h{3 if several else 2}>Charts</h{3 if several else 2}>
{"".join(_figure(c) for c in charts)}
"""


def render_html(report: Report, charts: list[list[Chart]], inputs: list[Path]) -> str:
    """`charts`: one list per section."""
    others = ""
    if report.not_completed:
        rows = [{"run": r.name, "status": r.status, "path": str(r.path)} for r in report.not_completed]
        others = ("<h2>Failed or incomplete runs</h2><p>Not included in the tables or charts.</p>"
                  + _table(["run", "status", "path"], rows))
    several = len(report.sections) > 1
    n_runs = sum(g.n for sec in report.sections for g in sec.groups)
    n_groups = sum(len(sec.groups) for sec in report.sections)
    kinds = ("sections (dataset, label set, multi-label or not)" if any(sec.task.section_note for sec in report.sections)
             else "datasets")
    datasets = (f" on {len(report.sections)} {kinds} (compared within each, never across)" if several
                else f" on {_e(report.sections[0].dataset)}")
    sections = "".join(_section_html(sec, c, several) for sec, c in zip(report.sections, charts))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>peftlab report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>peftlab report</h1>
<p class="meta">{n_runs} completed run(s) in {n_groups} configuration(s){datasets} from {_e(", ".join(map(str, inputs)))}
· generated {_e(_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))}</p>
{sections}
<ul class="note">{"".join(f"<li>{_e(n)}</li>" for n in notes(report))}</ul>
{others}
</body></html>
"""


# ---------------------------------------------------------------- Markdown

# Markdown viewers render inline HTML and links: text from runs (names, paths, models, labels, configs)
# must show as written. Markup characters are entities; the ones that start emphasis, code, links and
# images (no link without "["), math, strike-through or a new cell are backslash-escaped. Line-start
# syntax (#, -, +, 1.) cannot apply: such text never starts a line. Figures read as they are.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$])")


def escape_markdown(x: object) -> str:
    text = html.escape(str(x), quote=False)  # & < > as entities: no tag, no comment, no entity trick
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return " ".join(text.split())  # a newline (or a tab) would end the paragraph or the table row


def _md_table(columns: list[str], rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(escape_markdown(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(escape_markdown(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    parts = ["# peftlab report", ""]
    several = len(report.sections) > 1
    for sec in report.sections:
        suffix = f": {escape_markdown(sec.dataset)}" if several else ""
        parts += [best_summary(sec, escape_markdown), "", f"## Results{suffix}", "", _md_table(columns(sec), result_rows(sec)), ""]
    parts += [f"- {n}" for n in notes(report)] + [""]
    if report.not_completed:
        rows = [{"run": r.name, "status": r.status, "path": str(r.path)} for r in report.not_completed]
        parts += ["## Failed or incomplete runs", "", _md_table(["run", "status", "path"], rows), ""]
    return "\n".join(parts)
