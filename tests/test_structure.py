"""The shape of the code, checked: no import cycles between peftlab's modules (function-level imports
included), data flowing one way through the folders, and a training recipe made of small steps."""
from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

SRC = REPO / "src"
# each folder may import only from folders before it (and from itself): config -> data + models ->
# evaluation -> runs -> training -> report / sweep / serve / export / bench -> cli / api
LAYERS = [
    {"errors", "files", "hub", "runtime"},
    {"config"},
    {"data", "models"},
    {"evaluation"},
    {"runs"},
    {"training"},
    {"reports", "sweeps", "serve", "export", "bench"},
    {"cli", "api", "__main__", ""},
]
# the config validates method.name against the registry, which depends on nothing of peftlab's
ALLOWED = {("peftlab.config.load", "peftlab.models.methods.registry")}


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
