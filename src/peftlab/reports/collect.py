"""Find runs below the given paths, group seed repeats, and work out the Pareto front and the best run.

Everything the report shows is computed here once; the HTML and Markdown writers only format it.
"""
from __future__ import annotations

import copy
import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftlab.errors import UserError
from peftlab.runs.plots import read_history, read_json
from peftlab.runs.record import RunRecord
from peftlab.runs.rundir import RunDir
from peftlab.runs.select import pick_best as select_best
from peftlab.tasks import SINGLE_LABEL, Task


@dataclass
class Run:
    name: str
    path: Path
    metrics: RunRecord
    history: list[dict] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.metrics.config or {}

    def value(self, *keys: str) -> float | None:
        """metrics.k1.k2...; None where any level is missing."""
        node = self.metrics
        for k in keys:
            node = node.get(k) if node is not None else None
        return node


@dataclass
class NotCompleted:
    name: str
    path: Path
    status: str


@dataclass
class Group:
    """Runs whose configs differ only in train.seed (and output.dir)."""
    runs: list[Run]
    on_pareto: bool = False

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def name(self) -> str:
        if self.n == 1:
            return self.first.name
        base = self.first.name
        if all(re.search(r"-seed\d+$", r.name) for r in self.runs):  # sweep runs: name-seedN -> name
            base = re.sub(r"-seed\d+$", "", base)
        return f"{base} ×{self.n} seeds"

    @property
    def config(self) -> dict:
        return self.first.config

    def stat(self, *keys: str) -> tuple[float | None, float | None]:
        """(mean, sample std) of a metrics.json value over the seeds; std is None when n == 1."""
        values = [v for v in (r.value(*keys) for r in self.runs) if v is not None]
        if not values:
            return None, None
        mean = statistics.fmean(values) if len(values) > 1 else values[0]
        return mean, (statistics.stdev(values) if len(values) > 1 else None)

    def mean(self, *keys: str) -> float | None:
        return self.stat(*keys)[0]


@dataclass
class Section:
    """The runs on one dataset (and label set), single-label or multi-label: scores are only compared
    within a section."""
    dataset: str
    groups: list[Group]
    metric: str  # the validation metric used to pick the best
    best: Group
    best_run: Run  # the best group's seed with the best validation metric (for its confusion matrix)
    task: Task = SINGLE_LABEL  # its runs' kind: a set of labels per text has its own figures (subset accuracy, ...)


@dataclass
class Report:
    sections: list[Section]
    not_completed: list[NotCompleted]


def _broken_files(run_dir: Path) -> str | None:
    """What a completed run lacks on disk (its weights, its predictions), or None."""
    run = RunDir(run_dir)
    if not run.weight_files():
        return "its trained weights (adapter/ or model/) are missing"
    if not run.predictions_file.is_file():
        return "predictions.csv is missing"
    return None


def _config_of(run_dir: Path, record: RunRecord) -> dict:
    if record.config:
        return record.config
    try:  # older metrics.json without the config: the run's own config.yaml
        return yaml.safe_load(RunDir(run_dir).config_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def find_runs(paths: list[Path]) -> tuple[list[Run], list[NotCompleted]]:
    """Every directory at or below `paths` with a metrics.json (completed or not), plus directories
    that have a history.jsonl but no metrics.json (a run killed before it finished)."""
    dirs: dict[Path, bool] = {}  # run dir -> has metrics.json
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"report: {p} does not exist (give run or sweep directories)")
        if p.is_file():
            if p.name != RunDir.METRICS:
                raise UserError(f"report: {p} is a file; give run or sweep directories")
            dirs[p.parent.resolve()] = True
            continue
        for m in p.rglob(RunDir.METRICS):
            dirs[m.parent.resolve()] = True
        for h in p.rglob(RunDir.HISTORY):
            dirs.setdefault(h.parent.resolve(), False)

    names = _unique_names(sorted(dirs))
    runs, others = [], []
    for d in sorted(dirs):
        if not dirs[d]:
            others.append(NotCompleted(names[d], d, "incomplete (no metrics.json)"))
            continue
        try:
            record = RunDir(d).record()
        except UserError as e:
            others.append(NotCompleted(names[d], d, f"unreadable metrics.json ({str(e).split('(', 1)[-1].rstrip(')')}"))
            continue
        if not record.completed:
            others.append(NotCompleted(names[d], d, record.status))
            continue
        broken = _broken_files(d)
        if broken:
            others.append(NotCompleted(names[d], d, f"broken: {broken}"))
            continue
        record.config = _config_of(d, record)
        runs.append(Run(names[d], d, record, read_history(d)))
    # configurations a sweep skipped for its parameter budget have no run directory: list them too
    for p in map(Path, paths):
        for summary in (p.rglob("sweep.json") if p.is_dir() else []):
            for s in (read_json(summary) or {}).get("skipped") or []:
                others.append(NotCompleted(str(s.get("name")), summary.parent.resolve(),
                                           f"skipped: over budget ({s.get('trainable', 0):,} trainable parameters "
                                           f"> {s.get('budget', 0):,})"))
    return runs, others


def _unique_names(dirs: list[Path]) -> dict[Path, str]:
    """The directory name, or where two runs share it, the path below their common parent."""
    names = {d: d.name for d in dirs}
    if len(set(names.values())) < len(names):
        root = Path(os.path.commonpath([str(d) for d in dirs]))
        clashes = {n for n in names.values() if list(names.values()).count(n) > 1}
        for d in dirs:
            if names[d] in clashes:
                names[d] = d.relative_to(root).as_posix() if d != root else d.name
    return names


def group_key(config: dict) -> str:
    """The config without the keys that seed repeats are allowed to differ in."""
    c = copy.deepcopy(config)
    (c.get("train") or {}).pop("seed", None)
    (c.get("output") or {}).pop("dir", None)
    return json.dumps(c, sort_keys=True, default=str)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs whose configs differ only in the seed form one group, one run per distinct seed: two runs
    of the same config and seed are repeats, not seeds, and stay in separate rows."""
    groups: dict[str, list[list[Run]]] = {}
    for r in sorted(runs, key=lambda r: r.name):
        # A run without any config cannot be matched with others: it stays on its own.
        key = group_key(r.config) if r.config else f"path:{r.path}"
        seed = (r.config.get("train") or {}).get("seed")
        slots = groups.setdefault(key, [])
        slot = next((g for g in slots if seed not in {(x.config.get("train") or {}).get("seed") for x in g}), None)
        if slot is None:
            slots.append([r])
        else:
            slot.append(r)
    out = [Group(rs) for slots in groups.values() for rs in slots]
    out.sort(key=lambda g: (str((g.config.get("method") or {}).get("name", "")),
                            g.mean("params", "trainable") or 0, g.name))
    return out


def mark_pareto(groups: list[Group]) -> None:
    """On the front: no other configuration is at least as accurate (test accuracy, mean over seeds)
    with at most as many trainable parameters, and strictly better in one of the two."""
    points = [(g.mean("params", "trainable"), g.mean("test", "accuracy")) for g in groups]
    for g, (p, a) in zip(groups, points):
        if p is None or a is None:
            g.on_pareto = False
            continue
        g.on_pareto = not any(
            q is not None and b is not None and q <= p and b >= a and (q < p or b > a)
            for q, b in points
        )


def selection_metric(groups: list[Group], task: Task = SINGLE_LABEL) -> str:
    """eval.metric of the runs (they select their best epoch by it); macro_f1 where they disagree."""
    chosen = {str((g.config.get("eval") or {}).get("metric", "macro_f1")) for g in groups}
    return chosen.pop() if len(chosen) == 1 and chosen <= task.selection_metrics else "macro_f1"


def pick_best(groups: list[Group], metric: str) -> tuple[Group, Run]:
    """Best configuration by mean VALIDATION metric (test is never used to choose); ties go to the lower
    mean validation loss, then fewer trainable parameters, then the name (runs.select). Within it, the
    seed with the best validation metric (ties: lower validation loss)."""
    best = select_best(groups, lambda g: g.mean("validation", metric), lambda g: g.mean("params", "trainable"),
                       lambda g: g.name, loss=lambda g: g.mean("validation", "loss"))
    run = select_best(best.runs, lambda r: r.value("validation", metric), lambda r: 0, lambda r: r.name,
                      loss=lambda r: r.value("validation", "loss"))
    return best, run


def dataset_key(run: Run) -> tuple[str, tuple[str, ...], Task]:
    """Runs are compared only with runs of the same key: dataset, label names, and task kind (never
    ranked together, even on the same dataset: their accuracies mean different things)."""
    return str(run.metrics.dataset), tuple(run.metrics.label_names), run.metrics.kind


def section(dataset: str, runs: list[Run], task: Task = SINGLE_LABEL) -> Section:
    groups = group_runs(runs)
    mark_pareto(groups)
    metric = selection_metric(groups, task)
    best, best_run = pick_best(groups, metric)
    return Section(dataset, groups, metric, best, best_run, task)


def section_title(dataset: str, labels: tuple[str, ...], task: Task, clash: bool) -> str:
    """The dataset's name; the task's note (e.g. "multi-label"), and the label names where two sections
    of the same kind share the dataset's name."""
    notes = ([task.section_note] if task.section_note else []) + ([f"labels {', '.join(labels)}"] if clash else [])
    return f"{dataset} ({'; '.join(notes)})" if notes else dataset


def collect(paths: list[Path]) -> Report:
    """Every run under `paths`, in one section per dataset, label set and kind (single- or multi-label)."""
    runs, others = find_runs(paths)
    if not runs:
        where = ", ".join(str(p) for p in paths)
        extra = f" ({len(others)} failed or incomplete)" if others else ""
        raise UserError(f"report: no completed runs (metrics.json with status 'completed') under {where}{extra}")
    by_dataset: dict[tuple, list[Run]] = {}
    for r in runs:
        by_dataset.setdefault(dataset_key(r), []).append(r)
    kinds = [(d, task) for d, _, task in by_dataset]
    ordered = sorted(by_dataset.items(), key=lambda item: (item[0][0], item[0][1], item[0][2].order))
    sections = [section(section_title(d, labels, task, kinds.count((d, task)) > 1), rs, task)
                for (d, labels, task), rs in ordered]
    return Report(sections, others)
