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
from peftlab.sweep import claims as C
from peftlab.sweep.expand import TEACHER_UNIT

METRICS = ("accuracy", "macro_f1")


def _stat(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _read_metrics(path: Path) -> dict | None:
    try:
        return json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def _trial_runs(sweep, number) -> dict:
    if number is None:
        return {}
    try:
        for t in sweep.study.get_trials(deepcopy=False):
            if t.number == int(number):
                return t.user_attrs.get("runs") or {}
    except Exception:  # noqa: BLE001
        pass
    return {}


def _run_entry(sweep, unit, run, state: str, history: list, blocked: str | None) -> dict:
    path = sweep.run_dir(run)
    m = _read_metrics(path)
    entry = {"name": run.name, "configuration": unit.group, "seed": run.seed,
             "run_dir": str(path.relative_to(sweep.dir)) if path.is_relative_to(sweep.dir) else str(path),
             "attempts": len(history)}
    if m is None and state == C.DONE:  # finished on another machine: its figures are in the study
        m = _trial_runs(sweep, history[-1].payload.get("trial")).get(run.name)
        if m is not None:
            entry["run_dir_host"] = "another worker"
    if m is not None and m.get("status") == "completed":
        eff = m.get("efficiency") or {}
        params = m.get("params") or {}
        entry.update(status="completed",
                     validation={k: (m.get("validation") or {}).get(k) for k in METRICS},
                     test={k: (m.get("test") or {}).get(k) for k in METRICS},
                     trainable_params=params.get("trainable"), trainable_pct=params.get("trainable_pct"),
                     train_seconds=eff.get("train_seconds", m.get("train_seconds")),
                     peak_memory_bytes=eff.get("peak_memory_bytes", m.get("peak_memory_bytes")))
        return entry
    if blocked:
        entry.update(status="blocked", reason=blocked)
    elif unit.key in sweep.skipped:
        s = sweep.skipped[unit.key]
        entry.update(status="skipped", reason=f"over budget: {s['trainable']:,} trainable parameters > {s['budget']:,}",
                     trainable_params=s["trainable"])
    elif state == C.PRUNED:
        entry.update(status="pruned", reason=(m or {}).get("reason") or history[-1].payload.get("reason"))
    elif state == C.FAILED:
        entry.update(status="failed", error=history[-1].payload.get("error") or (m or {}).get("error"))
    elif state == C.RUNNING:
        entry.update(status="running")
    else:
        entry.update(status="pending")
    return entry


def summarize(sweep) -> dict:
    attempts = sweep.claims.attempts()
    runs, groups, order = [], {}, []
    over_budget_samples = []
    for key in sweep.keys:
        history = attempts.get(key, [])
        latest = history[-1] if history else None
        state = latest.state if latest else "pending"
        unit = sweep.by_key.get(key)
        if unit is None:  # a search slot: its configuration is whatever was sampled for it
            for c in history:
                over_budget_samples += c.payload.get("over_budget") or []
            params = sweep._params_of(key, history)
            if params is None:
                continue
            unit = sweep.unit_for(key, history[-1])
        blocked = None
        depends = unit.depends_on or (TEACHER_UNIT if key.startswith("slot") and TEACHER_UNIT in sweep.by_key else None)
        if depends and state == "pending":
            dep = (attempts.get(depends) or [None])[-1]
            if dep is not None and dep.state in (C.FAILED, C.PRUNED, C.SKIPPED):
                blocked = f"its teacher ({depends}) did not complete"
        for run in unit.runs:
            entry = _run_entry(sweep, unit, run, state, history, blocked)
            runs.append(entry)
            if unit.group not in groups:
                groups[unit.group] = {"name": unit.group, "overrides": unit.overrides, "runs": [],
                                      "is_teacher": unit.key == TEACHER_UNIT}
                order.append(unit.group)
            groups[unit.group]["runs"].append(entry)

    configurations = []
    for name in order:
        g = groups[name]
        done = [r for r in g["runs"] if r["status"] == "completed"]
        trainable = next((r.get("trainable_params") for r in g["runs"] if r.get("trainable_params") is not None),
                         sweep.counts.get(name))
        statuses = sorted({r["status"] for r in g["runs"]})
        configurations.append({
            "name": name, "overrides": g["overrides"], "teacher": g["is_teacher"],
            "runs": [r["name"] for r in g["runs"]], "completed": len(done), "status": "/".join(statuses),
            "validation": {k: _stat([r["validation"][k] for r in done]) for k in METRICS},
            "test": {k: _stat([r["test"][k] for r in done]) for k in METRICS},
            "trainable_params": trainable,
            "train_seconds": _stat([r.get("train_seconds") for r in done]),
        })

    metric = sweep.metric
    ranked = [c for c in configurations if c["completed"] and not c["teacher"]]
    best = None
    if ranked:
        b = max(sorted(ranked, key=lambda c: c["name"]),
                key=lambda c: (c["validation"][metric]["mean"], -(c["trainable_params"] or 0)))
        best = {"name": b["name"], "selected_by": f"validation {metric} (mean over seeds)",
                "validation": {k: b["validation"][k]["mean"] for k in METRICS},
                "test_reported_not_used": {k: b["test"][k]["mean"] for k in METRICS},
                "trainable_params": b["trainable_params"]}
    counts = {}
    for r in runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    from peftlab.sweep.runner import storage_display

    return {
        "sweep_dir": str(sweep.dir), "mode": "search" if sweep.space else "grid",
        "study": {"name": sweep.study_name, "storage": storage_display(sweep.url)},
        "metric": metric, "selection": "mean validation metric; test figures are reported, never used to choose",
        "seeds": list(sweep.cfg.sweep.seeds), "budget": sweep.budget,
        "complete": not any(r["status"] in ("pending", "running") for r in runs),
        "counts": counts, "best": best, "configurations": configurations, "runs": runs,
        "skipped": list(sweep.skipped.values()), "over_budget_samples": over_budget_samples,
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
