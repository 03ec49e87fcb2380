"""The sweep's summary: sweep.json and the table printed at the end.

Every figure comes from the run's own metrics.json (or, for a run finished on another machine, from
the copy its worker stored in the Optuna trial). Configurations are ranked by their mean VALIDATION
metric; test figures are reported beside it and never used to choose.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from peftlab.runs.rundir import atomic_write_text
from peftlab.runs.select import pick_best

# the figures kept per run and summarised per configuration: every run has the first two; multi-label runs
# (accuracy = subset accuracy) the rest, which a summary of single-label runs leaves out
METRICS = ("accuracy", "macro_f1", "micro_f1", "samples_f1", "hamming_loss")
ALWAYS = ("accuracy", "macro_f1")
SELECTION = "mean validation metric (ties: lower mean validation loss); test figures are reported, never used to choose"


def _stat(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _trim(row: dict) -> dict:
    """The row without the multi-label figures a single-label run does not have (None)."""
    out = dict(row)
    for part in ("validation", "test"):
        if isinstance(out.get(part), dict):
            out[part] = {k: v for k, v in out[part].items() if v is not None or k in ALWAYS}
    return out


def summarize(rows: list[dict], metric: str, **meta) -> dict:
    """sweep.json from plain rows, one per run (name, configuration, overrides, teacher, seed, status,
    validation, test, trainable_params, train_seconds, ...): configurations in order of first
    appearance, mean ± std over seeds, and the best by the one selection rule. `meta` (sweep_dir,
    mode, study, seeds, budget, skipped, over_budget_samples) is copied in."""
    rows = [_trim(r) for r in rows]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["configuration"], []).append(r)
    done_rows = [r for r in rows if r["status"] == "completed"]
    metrics = [k for k in METRICS if k in ALWAYS or k == metric
               or any((r.get(part) or {}).get(k) is not None for r in done_rows for part in ("validation", "test"))]
    configurations = []
    for name, runs in groups.items():
        done = [r for r in runs if r["status"] == "completed"]
        trainable = next((r.get("trainable_params") for r in runs if r.get("trainable_params") is not None), None)
        configurations.append({
            "name": name, "overrides": runs[0].get("overrides", {}), "teacher": bool(runs[0].get("teacher")),
            "runs": [r["name"] for r in runs], "completed": len(done),
            "status": "/".join(sorted({r["status"] for r in runs})),
            "validation": {k: _stat([r["validation"].get(k) for r in done]) for k in metrics},
            "test": {k: _stat([r["test"].get(k) for r in done]) for k in metrics},
            "validation_loss": _stat([r.get("validation_loss") for r in done]),
            "trainable_params": trainable,
            "train_seconds": _stat([r.get("train_seconds") for r in done]),
        })
    ranked = [c for c in configurations if c["completed"] and not c["teacher"]]
    b = pick_best(ranked, lambda c: c["validation"][metric]["mean"], lambda c: c["trainable_params"],
                  lambda c: c["name"], loss=lambda c: c["validation_loss"]["mean"])
    best = None if b is None else {
        "name": b["name"], "selected_by": f"validation {metric} (mean over seeds)",
        "validation": {k: b["validation"][k]["mean"] for k in metrics},
        "test_reported_not_used": {k: b["test"][k]["mean"] for k in metrics},
        "trainable_params": b["trainable_params"]}
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        **meta, "metric": metric, "selection": SELECTION,
        "complete": not any(r["status"] in ("pending", "running") for r in rows),
        "counts": counts, "best": best, "configurations": configurations, "runs": rows,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_summary(directory: Path, summary: dict) -> Path:
    path = Path(directory) / "sweep.json"
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return path


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.4f}" if stat["std"] is None else f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def table(summary: dict) -> str:
    metric = summary["metric"]
    best = (summary.get("best") or {}).get("name")
    head = ["configuration", "runs", "trainable", f"val {metric}", "test accuracy", "test macro_f1", "train s", "status"]
    rows = []
    for c in summary["configurations"]:
        n = f"{c['completed']}/{len(c['runs'])}"
        rows.append([("* " if c["name"] == best else "  ") + c["name"] + (" (teacher)" if c["teacher"] else ""), n,
                     f"{c['trainable_params']:,}" if c["trainable_params"] is not None else "–",
                     _fmt(c["validation"][metric]), _fmt(c["test"]["accuracy"]), _fmt(c["test"]["macro_f1"]),
                     f"{c['train_seconds']['mean']:.1f}" if c["train_seconds"]["mean"] is not None else "–",
                     c["status"]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    if summary["skipped"]:
        lines.append(f"skipped (over the budget of {summary['budget']:,} trainable parameters):")
        lines += [f"  {s['name']}: {s['trainable']:,}" for s in summary["skipped"]]
    for r in summary["runs"]:
        if r["status"] in ("failed", "blocked"):
            lines.append(f"{r['status']}: {r['name']}: {r.get('error') or r.get('reason')}")
    if best:
        lines.append(f"best by validation {metric}: {best} (test figures are reported, not used to choose)")
    if not summary["complete"]:
        lines.append("not complete: some runs are pending or running elsewhere; run the same command again to finish")
    lines.append(f"summary: {Path(summary['sweep_dir']) / 'sweep.json'}   report: peftlab report {summary['sweep_dir']}")
    return "\n".join(lines)
