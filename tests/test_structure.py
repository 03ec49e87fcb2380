"""The shape of the code, checked: no import cycles between peftlab's modules (function-level imports
included), data flowing one way through the folders, and a training recipe made of small steps."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SRC = REPO / "src"
# each folder may import only from folders before it (and from itself): config -> tasks -> data + models
# -> evaluation -> runs -> training -> report / sweep / serve / export / bench -> cli / api
LAYERS = [
    {"discovery", "errors", "files", "hub", "runtime"},
    {"config"},
    {"tasks"},
    {"data", "models"},
    {"evaluation"},
    {"runs"},
    {"training"},
    {"reports", "sweeps", "serve", "export", "bench"},
    {"cli", "api", "__main__", ""},
]
# no exceptions: config validates method.name through config/choices.py, which the methods fill
ALLOWED: set[tuple[str, str]] = set()


def _modules() -> dict[str, object]:
    mods = {}
    for p in (SRC / "peftlab").rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = p
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("peftlab")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peftlab"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(resolve(full) if full in mods else resolve(node.module))
        graph[name] = deps - {None, name}
    return graph


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    graph, seen, done = _graph(), set(), set()

    def visit(v: str, path: list[str]) -> None:
        seen.add(v)
        for w in graph[v]:
            if w in path:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(w):] + [w]))
            if w not in done:
                visit(w, path + [w])
        done.add(v)

    for v in graph:
        if v not in done:
            visit(v, [v])


def test_data_flows_one_way_through_the_folders():
    layer = {folder: i for i, group in enumerate(LAYERS) for folder in group}
    graph = _graph()
    unknown = {_folder(m) for m in graph} - set(layer) - {"peftlab"}
    assert not unknown, f"place these folders in LAYERS: {unknown}"
    wrong = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
             if m != "peftlab" and d != "peftlab" and layer[_folder(d)] > layer[_folder(m)] and (m, d) not in ALLOWED]
    assert not wrong, wrong


def test_training_functions_are_small():
    long = []
    for path in (SRC / "peftlab" / "training").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_config_imports_nothing_above_it_and_still_knows_the_methods():
    """config/ reaches no later folder, and a fresh interpreter that imports only peftlab.config still
    rejects an unknown method.name (the package root wires the methods' names into config/choices.py)."""
    graph, layer = _graph(), {folder: i for i, group in enumerate(LAYERS) for folder in group}
    up = sorted(f"{m} imports {d}" for m, deps in graph.items() if _folder(m) == "config"
                for d in deps if layer[_folder(d)] > layer["config"])
    assert not up, up
    code = ("from peftlab.config import load_config\nfrom peftlab.errors import UserError\n"
            "try:\n    load_config(None, ['method.name=nope'])\nexcept UserError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "PYTHONPATH": str(SRC)}, check=True).stdout
    assert "unknown method.name 'nope' (allowed: " in out and "lora" in out


# the run directory's file names (runs/rundir.py's RunDir spells them); the folders are caught where a
# path is joined with them (`x / "plots"`), the files wherever they are spelled as a whole string
RUN_FILES = {"metrics.json", "config.yaml", "predictions.csv", "history.jsonl", "teacher_logits.npy"}
RUN_FOLDERS = {"adapter", "model", "plots", "checkpoints", "tensorboard"}
# spelled for something else than a run directory
NOT_A_RUN = {("peftlab.models.loading", "model"),  # the embedded MiniLM's folder inside the package
             ("peftlab.bench.runner", "config.yaml")}  # the config file a contender is trained from


def _run_file_names(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in RUN_FILES:
            found.add(node.value)
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
              and node.right.value in RUN_FOLDERS | RUN_FILES):
            found.add(node.right.value)
    return found


def test_only_the_run_directory_names_its_files():
    spelled = []
    for name, path in _modules().items():
        if name == "peftlab.runs.rundir":
            continue
        spelled += [f"{name}: {n!r}" for n in sorted(_run_file_names(ast.parse(path.read_text())))
                    if (name, n) not in NOT_A_RUN]
    assert not spelled, "use runs/rundir.py's RunDir accessors instead: " + ", ".join(spelled)


def test_the_run_file_check_sees_what_it_looks_for():
    """The check above would fail on code that spells a run file, or joins a run folder onto a path."""
    assert _run_file_names(ast.parse('p = run / "metrics.json"\nq = d / "plots"\nr = "adapter"')) == {"metrics.json",
                                                                                                       "plots"}


# where the task kind may be named: the task package, the config that chooses it, the record that stores it
KIND_OWNERS = ("peftlab.tasks", "peftlab.config", "peftlab.runs.record")


def _kind_tests(tree: ast.AST) -> int:
    """Reads of `.multi_label`, `multi_label=` arguments, `multi_label` parameters and variables read (a
    wire schema may still declare the field: serve's /adapters answers multi_label)."""
    n = 0
    for node in ast.walk(tree):
        n += isinstance(node, ast.Attribute) and node.attr == "multi_label"
        n += isinstance(node, ast.keyword) and node.arg == "multi_label"
        n += isinstance(node, ast.arg) and node.arg == "multi_label"
        n += isinstance(node, ast.Name) and node.id == "multi_label" and isinstance(node.ctx, ast.Load)
    return n


def test_only_the_task_knows_which_kind_it_is():
    """Callers ask the task (tasks/); none tests whether a run is multi-label."""
    found = [f"{name} ({n})" for name, path in _modules().items() if not name.startswith(KIND_OWNERS)
             for n in [_kind_tests(ast.parse(path.read_text()))] if n]
    assert not found, "ask the task (peftlab.tasks) instead of testing multi_label: " + ", ".join(found)
    assert _kind_tests(ast.parse("if run.multi_label:\n    f(multi_label=True)")) == 2
