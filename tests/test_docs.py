"""README.md and docs/*.md, tested (the convention: docs/architecture.md, "Docs that are tested").

Every fenced block carries a `<!-- docs-test: ... -->` marker and is run, compared or validated as its
marker says (a block without one fails); every `<!-- docs-test: figures from SOURCE -->` comment's
figures are checked against SOURCE; and every section that quotes a measured time or speed says on
which machine and at which commit it was measured."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from conftest import REPO, SHARED_DATA, WORDS, make_rows, write_splits

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# `run small`: the settings every block so marked runs with. The tiny model is a sentence-transformers
# checkpoint, so `model.head: auto` gives it the pooled head, as it gives the built-in MiniLM and MPNet.
SMALL = ("model.name={tiny_st}", "data.path={docs_data}", "data.max_length=32", "train.epochs=1",
         "train.batch_size=16", "train.learning_rate=0.005", "output.plots=false")

# five topics named like BBC News's, so that snippets written for the demo (num_labels=5) fit the small runs
DOCS_TOPICS = {"business": ["shares", "profit", "market", "bank", "firm", "economy", "sales", "oil"],
               "entertainment": ["film", "music", "actor", "award", "band", "album", "star", "show"],
               "politics": ["minister", "election", "party", "vote", "labour", "tory", "government", "mp"],
               "sport": WORDS["sport"], "tech": WORDS["tech"]}


# --- reading the docs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str  # dedented to the fence
    marker: str | None  # the text after "docs-test:" of the comment just above the fence

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->", re.S)


def _marker_above(lines: list[str], i: int) -> str | None:
    """The docs-test comment that ends on the last non-blank line above line i (0-based), if any."""
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return None
    k = j
    while k >= 0 and "<!--" not in lines[k]:
        k -= 1
    m = MARKER.search("\n".join(lines[k:j + 1]))
    return " ".join(m.group(1).split()) if m else None


def read_blocks(doc: Path) -> list[Block]:
    """Every fenced block (``` or ~~~, at any indentation) and every indented code block of a Markdown file."""
    from markdown_it import MarkdownIt

    text = doc.read_text()
    lines = text.splitlines()
    out = []
    for tok in MarkdownIt("commonmark").parse(text):
        if tok.type in ("fence", "code_block") and tok.map:
            start = tok.map[0]
            indent = len(lines[start]) - len(lines[start].lstrip())
            body = "\n".join(ln[indent:] for ln in lines[start + 1:tok.map[1] - 1]) if tok.type == "fence" else tok.content
            out.append(Block(doc, start + 1, tok.info.strip() if tok.type == "fence" else "", body,
                             _marker_above(lines, start)))
    return out


BLOCKS = [b for doc in DOCS for b in read_blocks(doc)]


@dataclass
class Spec:
    """A parsed marker: MODE[; OPTION]... (the grammar is in docs/architecture.md)."""
    mode: str  # run | output | config | skip
    small: bool = False
    sets: list[str] = field(default_factory=list)
    command: str | None = None  # output of `command`
    reason: str | None = None  # skip
    given: list[str] = field(default_factory=list)
    makes: list[str] = field(default_factory=list)
    excepts: list[str] = field(default_factory=list)  # line prefixes not run
    check: str | None = None
    xfail: str | None = None


def parse_marker(text: str) -> Spec:
    mode, *options = [p.strip() for p in text.split(";")]
    if mode.startswith("skip:") and mode[5:].strip():
        spec = Spec("skip", reason=mode[5:].strip())
    elif mode == "config":
        spec = Spec("config")
    elif m := re.fullmatch(r"output of `([^`]+)`", mode):
        spec = Spec("output", command=m.group(1))
    elif m := re.fullmatch(r"run( small)?((?: --set \S+)*)", mode):
        spec = Spec("run", small=bool(m.group(1)), sets=m.group(2).split()[1::2])
    else:
        raise ValueError(f"unknown docs-test mode {mode!r}: run, run small [--set K=V]..., output of `CMD`, "
                         "config, skip: REASON")
    for option in options:
        key, _, value = option.partition(":")
        value = value.strip()
        if key == "given":
            spec.given = [v.strip() for v in value.split(",")]
        elif key == "makes":
            spec.makes = [v.strip() for v in value.split(",")]
        elif key == "except":  # PREFIX (reason), PREFIX (reason)
            spec.excepts = [p.strip() for p, _ in re.findall(r"([^,(]+)\(([^)]*)\)", value)]
            if not spec.excepts or any(not p for p in spec.excepts):
                raise ValueError(f"except: give 'PREFIX (reason)' items, got {value!r}")
        elif key == "check":
            spec.check = value
        elif key == "xfail" and value:
            spec.xfail = value
        else:
            raise ValueError(f"unknown docs-test option {option!r}: given, makes, except, check, xfail")
    if spec.mode != "run" and (spec.given or spec.makes or spec.excepts or spec.check or spec.xfail):
        raise ValueError("given/makes/except/check/xfail go with run")
    return spec


# --- running blocks -----------------------------------------------------------------------------------
def cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`peftlab ARGS` in this process (the imports are paid once), in `cwd`: exit code, stdout, stderr."""
    from peftlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # --help
                code = e.code or 0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


def shell_lines(text: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def takes_overrides(command: str) -> bool:
    """Whether `peftlab COMMAND` has --set (the config-driven commands)."""
    import argparse
    import importlib

    from peftlab.cli import command_names

    if command not in command_names():
        return False
    parser = importlib.import_module(f"peftlab.cli.{command}").add_parser(argparse.ArgumentParser().add_subparsers())
    return any("--set" in a.option_strings for a in parser._actions)


class Docs:
    """The session's runner: fixtures, one scratch directory per block, products that blocks make for others."""

    def __init__(self, root: Path, values: dict[str, str]):
        self.root, self.values = root, values
        self.results: dict[str, Any] = {}  # block id -> namespace / outputs, or the exception it raised
        self.makers = {p: b for b in BLOCKS if b.marker and not _bad(b.marker)
                       for p in parse_marker(b.marker).makes}
        self.outputs: dict[str, tuple[int, str, str]] = {}  # command -> exit code, stdout, stderr
        self.configs: dict[tuple[str, ...], Path] = {}

    def fill(self, text: str) -> str:
        return text.format(**self.values)

    def small_sets(self, spec: Spec) -> list[str]:
        return [self.fill(s) for s in (*SMALL, *spec.sets)]

    def scratch(self, block: Block, spec: Spec) -> Path:
        """A fresh directory standing for the repository root: configs/ (the small settings merged in for
        `run small`), bench/, examples/ and tests/, and the block's givens linked in."""
        path = self._repo_like(re.sub(r"\W+", "-", block.id), self.small_configs(spec) if spec.small else None)
        for given in spec.given:
            link, _, product = given.partition("=")  # PATH, or PATH=PRODUCT: the product under another name
            if "/" in link or "." in link:  # a path; names without either are Python values
                (path / link).parent.mkdir(parents=True, exist_ok=True)
                (path / link).symlink_to(self.product(product or link))
        return path

    def _repo_like(self, name: str, configs: Path | None) -> Path:
        """A new directory under the root with the repository's configs/ (or `configs`), bench/, examples/
        and tests/ linked in; its ../shared is the repository's neighbour (the offline data sets)."""
        path = self.root / name
        path.mkdir(parents=True)
        for sub in ("configs", "bench", "examples", "tests"):
            (path / sub).symlink_to(configs if sub == "configs" and configs else REPO / sub)
        shared = self.root / "shared"
        if not shared.is_symlink() and (REPO.parent / "shared").exists():
            shared.symlink_to(REPO.parent / "shared")
        return path

    def small_configs(self, spec: Spec) -> Path:
        """configs/ with the small settings (and the marker's) merged into every file, as --set would."""
        from peftlab.config.load import parse_override, set_in

        sets = tuple(self.small_sets(spec))
        if sets not in self.configs:
            path = self.configs[sets] = self.root.parent / "small-configs" / str(len(self.configs))
            path.mkdir(parents=True)
            for source in sorted((REPO / "configs").glob("*.yaml")):
                tree = yaml.safe_load(source.read_text()) or {}
                for s in sets:
                    set_in(tree, *parse_override(s))
                (path / source.name).write_text(yaml.safe_dump(tree, sort_keys=False))
        return self.configs[sets]

    def product(self, name: str) -> Path:
        """A path another block or a harness recipe (PRODUCTS) makes."""
        if name in self.makers:
            maker = self.makers[name]
            result = self.run(maker)
            if isinstance(result, BaseException):
                raise AssertionError(f"given {name}: the block that makes it, {maker.id}, failed: {result}")
            return result["__scratch__"] / name
        if name in PRODUCTS:
            key = f"product:{name}"
            if key not in self.results:
                self.results[key] = PRODUCTS[name](self)
            return self.results[key]
        raise AssertionError(f"given {name}: no block makes it (makes: {name}) and the harness has no recipe")

    def run(self, block: Block) -> Any:
        """Run a `run` block once (memoized); its namespace (Python) or outputs, or the exception it raised."""
        if block.id not in self.results:
            try:
                self.results[block.id] = self._run(block, parse_marker(block.marker))
            except BaseException as e:  # noqa: BLE001 - reported by the block's own test
                self.results[block.id] = e
        return self.results[block.id]

    def _run(self, block: Block, spec: Spec) -> dict:
        cwd = self.scratch(block, spec)
        ns: dict[str, Any] = {"__name__": "__docs__", "__scratch__": cwd}
        if block.lang == "python":
            for given in spec.given:
                if "/" not in given and "." not in given:
                    ns[given] = VALUES[given](self, cwd)
            out = io.StringIO()
            with contextlib.chdir(cwd), contextlib.redirect_stdout(out):
                exec(compile(block.text, block.id, "exec"), ns)  # noqa: S102 - the docs' own snippet
            ns["__stdout__"] = out.getvalue()
        else:
            ns["__outputs__"] = [self.command(line, cwd, spec) for line in shell_lines(block.text)
                                 if not any(line.startswith(p) for p in spec.excepts)]
        if spec.check:
            with contextlib.chdir(cwd):  # the block's relative paths
                CHECKS[spec.check](self, ns)
        return ns

    def command(self, line: str, cwd: Path, spec: Spec) -> str:
        """One line of a shell block: `[NAME=VALUE ...] peftlab ARGS`, small when the marker says so."""
        words = shlex.split(line, comments=True)
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            k, _, v = words.pop(0).partition("=")
            env[k] = v
        if not words or words[0] != "peftlab" or any(w in ("|", "&&", ";", "||") for w in words):
            raise AssertionError(f"the harness runs peftlab commands only, not {line!r}: give the block "
                                 "'except: PREFIX (reason)' or mark it skip")
        args = words[1:]
        if spec.small and args and takes_overrides(args[0]):
            args += [a for s in self.small_sets(spec) for a in ("--set", s)]
        code, out, err = cli(args, cwd, env)
        if code and "../shared" in err and not SHARED_DATA.exists():
            pytest.skip(f"{line!r} reads ../shared/data, which this checkout has not beside it")
        assert code == 0, f"{line!r} exited {code}:\n{err[-2000:]}"
        if args[0] == "train":  # a loss or a metric that is not a number is a bug (README: a NaN loss stops a run)
            assert not re.search(r"\bnan\b", out, re.I), f"{line!r} printed nan:\n{out}"
        return out

    def output_of(self, command: str) -> str:
        """A command's stdout, run as written in a scratch directory with the repository's configs (memoized)."""
        if command not in self.outputs:
            words = shlex.split(command)
            assert words[0] == "peftlab", f"figures and outputs come from peftlab commands, not {command!r}"
            self.outputs[command] = cli(words[1:], self._repo_like(f"output-{len(self.outputs)}", None))
        code, out, err = self.outputs[command]
        if code and "../shared" in err and not SHARED_DATA.exists():
            pytest.skip(f"`{command}` reads ../shared/data, which this checkout has not beside it")
        assert code == 0, f"`{command}` exited {code}: {err[-1000:]}"
        return out


def _bad(marker: str) -> bool:
    try:
        parse_marker(marker)
        return False
    except ValueError:
        return True


# products that no block makes: how the harness makes them (in the run's own words where a doc has them)
def _tags_export(docs: Docs) -> Path:
    out = docs.root.parent / "products" / "tags-merged"
    out.parent.mkdir(parents=True, exist_ok=True)
    code, _, err = cli(["export", str(docs.product("runs/debtags")), "--format", "merged", "--output", str(out)], docs.root)
    assert code == 0, err
    return out


PRODUCTS: dict[str, Callable[[Docs], Path]] = {"exports/tags-merged": _tags_export}


def _texts(docs: Docs) -> list[str]:
    """Short texts (no truncation at the small max_length) of every topic, and one with none."""
    rows = make_rows(10, seed=7, topics=DOCS_TOPICS)
    return [" ".join(r["text"].split()[:12]) for r in rows] + ["the carmaker said today"]


# Python names a block may be given (given: NAME), made in its scratch directory
VALUES: dict[str, Callable[[Docs, Path], Any]] = {
    "BASE": lambda docs, cwd: docs.values["tiny_st"],  # the base model of the small runs
    "texts": lambda docs, cwd: _texts(docs),
    "peftlab": lambda docs, cwd: __import__("peftlab"),
    "cfg": lambda docs, cwd: __import__("peftlab").load_config(cwd / "configs" / "demo.yaml"),
}


# --- checks a block's marker can name (check: NAME), run after the block ------------------------------
def _reference(docs: Docs, run: str, texts: list[str]) -> list[dict]:
    import peftlab

    return peftlab.load_run(docs.product(run)).predict(texts)


def _probabilities(rows: list[dict]) -> list[dict[str, float]]:
    return [r["probabilities"] for r in rows]


def _close(got: list[dict[str, float]], want: list[dict[str, float]], tol: float, what: str) -> None:
    worst = max(abs(g[k] - w[k]) for g, w in zip(got, want, strict=True) for k in w)
    agree = sum(max(g, key=g.get) == max(w, key=w.get) for g, w in zip(got, want))
    assert worst <= tol, f"{what}: probabilities differ from peftlab predict's by {worst:.3g} " \
                         f"({agree} of {len(want)} top labels agree)"


def check_adapter_agrees(docs: Docs, ns: dict, run_name: str = "runs/demo") -> None:
    """README's adapter snippets: the model it loads answers as the run does."""
    import torch
    from transformers import AutoTokenizer

    run = docs.product(run_name)
    texts = _texts(docs)
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    names = json.loads((run / "metrics.json").read_text())["label_names"]
    with torch.no_grad():
        probs = torch.softmax(ns["model"].eval()(**tok(texts, padding=True, return_tensors="pt")).logits, -1)
    got = [dict(zip(names, p.tolist())) for p in probs]
    _close(got, _probabilities(_reference(docs, run_name, texts)), 1e-4, f"the adapter of {run_name}")


def check_own_head_adapter_agrees(docs: Docs, ns: dict) -> None:
    """README's plain-PEFT snippet, on a run that keeps the checkpoint's own head."""
    check_adapter_agrees(docs, ns, "runs/demo-cls")


def check_pipeline_agrees(docs: Docs, ns: dict) -> None:
    """docs/export.md's pipeline snippet on the merged export: scores as peftlab predict's probabilities."""
    texts = _texts(docs)
    got = [{d["label"]: d["score"] for d in row} for row in ns["classify"](texts, top_k=None, truncation=True)]
    _close(got, _probabilities(_reference(docs, "runs/demo", texts)), 1e-4, "pipeline(exports/demo-merged)")


def check_decision_rule_agrees(docs: Docs, ns: dict) -> None:
    """docs/export.md's decision-rule snippet: the label sets peftlab predict gives."""
    want = [sorted(r["labels"]) for r in _reference(docs, "runs/debtags", ns["texts"])]
    got = [sorted(x) for x in ns["labels"]]
    agree = sum(g == w for g, w in zip(got, want))
    assert agree == len(want), f"decision rule: {agree} of {len(want)} label sets match peftlab predict's"


def check_onnx_agrees(docs: Docs, ns: dict) -> None:
    """docs/export.md's onnxruntime snippet: softmax of its logits = peftlab predict's probabilities."""
    import numpy as np

    names = json.loads((docs.product("runs/demo") / "metrics.json").read_text())["label_names"]
    logits = np.asarray(ns["logits"], dtype=np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    _close([dict(zip(names, p)) for p in probs], _probabilities(_reference(docs, "runs/demo", ns["texts"])), 1e-3,
           "onnxruntime(exports/demo-onnx)")


def check_python_api(docs: Docs, ns: dict) -> None:
    """docs/python.md: the objects the calls return are what the table says."""
    import pandas as pd

    import peftlab

    run = ns["run"]
    assert isinstance(run, peftlab.Run) and isinstance(run.metrics, peftlab.RunRecord)
    assert run.metrics.status == "completed" and run.metrics.config["method"]["r"] == 8  # the overrides applied
    assert run.metrics == peftlab.RunRecord.read(run.path / "metrics.json")
    history = run.history()
    assert isinstance(history, pd.DataFrame) and "validation_macro_f1" in history.columns
    assert history[history["kind"] == "step"]["loss"].notna().all()
    frame = pd.read_csv(run.path / "predictions.csv")
    rows = run.predict(frame["text"].tolist())
    assert [r["label"] for r in rows] == frame["predicted"].tolist()
    assert [r["confidence"] for r in rows] == pytest.approx(frame["confidence"].tolist(), abs=1e-4)
    summary = json.loads((ns["__scratch__"] / "sweeps" / "m" / "sweep.json").read_text())
    assert summary["counts"] == {"completed": 4}, summary["counts"]
    assert (ns["__scratch__"] / "report.html").exists() and (ns["__scratch__"] / "report.md").exists()


def check_mlflow_found_runs(docs: Docs, ns: dict) -> None:
    """docs/tracking.md's MLflow query finds the tracked run, with the figures it asks for."""
    assert ns["runs"], "search_runs found no run in mlflow.db"
    found = ns["runs"][0]
    assert 0 <= found.data.metrics["test.macro_f1"] <= 1 and found.data.params["method.r"] == "16", found


CHECKS: dict[str, Callable[[Docs, dict], None]] = {
    "adapter_agrees": check_adapter_agrees, "own_head_adapter_agrees": check_own_head_adapter_agrees,
    "pipeline_agrees": check_pipeline_agrees,
    "decision_rule_agrees": check_decision_rule_agrees, "onnx_agrees": check_onnx_agrees,
    "python_api": check_python_api, "mlflow_found_runs": check_mlflow_found_runs,
}


@pytest.fixture(scope="session")
def docs(tmp_path_factory, tiny_st_dir, label_set_data_dir) -> Docs:
    root = tmp_path_factory.mktemp("docs")
    values = {"tiny_st": str(tiny_st_dir), "label_sets": str(label_set_data_dir)}
    for name, topics, sizes in (("docs_data", DOCS_TOPICS, (150, 40, 40)),
                                ("two_labels", {k: DOCS_TOPICS[k] for k in ("sport", "tech")}, (120, 40, 40))):
        path = root / name
        path.mkdir()
        values[name] = str(write_splits(path, lambda n, seed, t=topics: make_rows(n, seed, topics=t), sizes))
    with pytest.MonkeyPatch.context() as mp:  # (the cache and the hub: conftest's autouse fixture)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow's default: mlflow.db in the block's directory
        yield Docs(root / "blocks", values)


# --- the tests ----------------------------------------------------------------------------------------
def test_every_block_has_a_marker_that_parses():
    unmarked = [b.id for b in BLOCKS if b.marker is None]
    assert not unmarked, ("code blocks without a <!-- docs-test: ... --> marker on the line above "
                          f"(docs/architecture.md, 'Docs that are tested'): {unmarked}")
    bad = {}
    for b in BLOCKS:
        try:
            parse_marker(b.marker)
        except ValueError as e:
            bad[b.id] = str(e)
    assert not bad, bad
    specs = [parse_marker(b.marker) for b in BLOCKS]
    made = [p for spec in specs for p in spec.makes]
    assert len(made) == len(set(made)), f"a product is made by two blocks: {made}"
    for spec in specs:
        assert spec.check is None or spec.check in CHECKS, f"check: {spec.check} is not in CHECKS"
        for given in spec.given:
            link, _, product = given.partition("=")
            known = (product or link) in set(made) | set(PRODUCTS) if "/" in link or "." in link else link in VALUES
            assert known, f"given: {given}: no block makes it and the harness has no recipe or value for it"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker and not _bad(b.marker)], ids=lambda b: b.id)
def test_block(block: Block, docs: Docs):
    spec = parse_marker(block.marker)
    if spec.mode == "skip":
        pytest.skip(spec.reason)
    if spec.mode == "config":
        return check_config_block(block)
    if spec.mode == "output":
        out = docs.output_of(spec.command)
        assert matches_output(block.text, out), f"{block.id} is not what `{spec.command}` prints now:\n{out}"
        return
    result = docs.run(block)
    if spec.xfail:
        if isinstance(result, BaseException):
            pytest.xfail(f"{spec.xfail} ({type(result).__name__}: {str(result).splitlines()[0][:300]})")
        pytest.fail(f"{block.id} is marked 'xfail: {spec.xfail}' but passes now: change its marker to run")
    if isinstance(result, BaseException):
        raise result


def check_config_block(block: Block) -> None:
    """A YAML fragment: valid as a config file (a sweep block's configurations too)."""
    from peftlab.config.load import build_config
    from peftlab.sweeps.expand import distributions, expand_grid

    tree = yaml.safe_load(block.text)
    assert isinstance(tree, dict), f"{block.id}: not a YAML mapping"
    cfg = build_config(tree, block.id)
    if cfg.sweep.grid or cfg.sweep.teacher:
        expand_grid(cfg)
    if cfg.sweep.space:
        distributions(cfg)


def matches_output(doc: str, out: str) -> bool:
    """The doc's text equals the output, line ends trimmed; '...' in the doc stands for any text."""
    def norm(text: str) -> str:
        return "\n".join(ln.rstrip() for ln in text.strip("\n").splitlines())

    pattern = ".*?".join(re.escape(part) for part in norm(doc).split("..."))
    return re.fullmatch(pattern, norm(out), re.S) is not None


# --- figures ------------------------------------------------------------------------------------------
NUMBER = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])")
FIGURES = re.compile(r"^[ \t]*<!--\s*docs-test:\s*figures from (.+?)-->", re.S | re.M)  # a line of its own


@dataclass(frozen=True)
class Figures:
    doc: Path
    line: int
    sources: tuple[str, ...]
    figures: tuple[str, ...]  # empty: every number of the text
    text: str  # the paragraph, table or block that follows the comment

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def parse_figures(body: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """'SOURCE [and SOURCE]...[: FIGURE ...]' -> (sources, figures); a source is a `command` or a file path."""
    outside = re.sub(r"`[^`]*`", lambda m: "x" * len(m.group(0)), body)  # a ': ' inside a command is no split
    cut = outside.find(": ")
    sources, listed = (body, "") if cut < 0 else (body[:cut], body[cut + 2:])
    found = tuple(s for s in re.findall(r"`[^`]+`|[^\s,`]+", sources) if s != "and")
    return found, tuple(listed.split())


def read_figures(doc: Path) -> list[Figures]:
    text = doc.read_text()
    lines = text.splitlines()
    out = []
    for m in FIGURES.finditer(text):
        sources, listed = parse_figures(" ".join(m.group(1).split()))
        line = text[:m.end()].count("\n") + 1
        after = []  # the paragraph, table or block below: up to the next blank line (a fenced block whole)
        fenced = False
        for ln in lines[line:]:
            if ln.strip().startswith(("```", "~~~")):
                fenced = not fenced
            if not ln.strip() and after and not fenced:
                break
            if ln.strip() and not ln.strip().startswith("<!--"):
                after.append(ln)
        out.append(Figures(doc, line, sources, listed, "\n".join(after)))
    return out


FIGURE_COMMENTS = [f for doc in DOCS for f in read_figures(doc)]


def numbers_of(text: str) -> list[str]:
    return NUMBER.findall(text)


def _value(token: str) -> float:
    return float(token.replace(",", ""))


def _json_numbers(node: Any) -> list[float]:
    if isinstance(node, bool):
        return []
    if isinstance(node, (int, float)):
        return [float(node)]
    if isinstance(node, dict):
        node = list(node.values())
    return [x for v in node for x in _json_numbers(v)] if isinstance(node, list) else []


def source_numbers(docs: Docs, source: str) -> list[float]:
    """The numbers a source states: a command's output (run as written) or a file of the repository
    (a JSON file's numbers, and its byte counts also in MiB)."""
    if source.startswith("`"):
        return [_value(t) for t in numbers_of(docs.output_of(source.strip("`")))]
    path = REPO / source
    assert path.is_file(), f"figures from {source}: no such file in the repository"
    if path.suffix == ".json":
        found = _json_numbers(json.loads(path.read_text()))
        return found + [x / 2**20 for x in found if x >= 2**20]
    return [_value(t) for t in numbers_of(path.read_text())]


def _agrees(token: str, x: float) -> bool:
    decimals = len(token.split(".")[1]) if "." in token else 0
    return math.isclose(round(x, decimals), _value(token), abs_tol=10 ** -(decimals + 3))


@pytest.mark.parametrize("figures", FIGURE_COMMENTS, ids=lambda f: f.id)
def test_figures_match_their_source(figures: Figures, docs: Docs):
    assert figures.text, f"{figures.id}: no text after the figures comment"
    shown = numbers_of(figures.text)
    listed = list(figures.figures) or shown
    missing = [f for f in listed if f not in shown]
    assert not missing, f"{figures.id}: listed figures not in the text below the comment: {missing}"
    near = [f"{t} (next to {f})" for t in shown for f in figures.figures
            if t != f and math.isclose(_value(t), _value(f), rel_tol=0.01)]
    assert not near, f"{figures.id}: numbers within 1% of a listed figure, but not it (a copy that drifted?): {near}"
    known = [x for s in figures.sources for x in source_numbers(docs, s)]
    wrong = [f for f in listed if not any(_agrees(f, x) for x in known)]
    assert not wrong, f"{figures.id}: figures that {', '.join(figures.sources)} does not give: {wrong}"


# --- measured figures say where and when --------------------------------------------------------------
MEASURED = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:[-–]\d[\d,]*(?:\.\d+)?)? ?"
                      r"(?:s|ms|min|samples/s|tokens/s|requests/s)(?![\w/])|(?<![\w.])\d+(?:\.\d+)?×")
PROVENANCE = re.compile(r"measured on\s.+?\bcommits?\s+[0-9a-f]{7,40}\b", re.I | re.S)
COMMIT = re.compile(r"\bcommits?\s+([0-9a-f]{7,40})\b")
NO_MEASUREMENTS = re.compile(r"^[ \t]*<!-- docs-test: no measurements:", re.M)


def sections(doc: Path) -> list[tuple[str, int, str]]:
    """(heading, level, text) per heading, fenced blocks left out; the text runs to the next heading."""
    out, heading, level, body, fenced = [], doc.name, 0, [], False
    for ln in doc.read_text().splitlines():
        if ln.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced:
            continue
        if m := re.match(r"(#+) ", ln):
            out.append((heading, level, "\n".join(body)))
            heading, level, body = ln, len(m.group(1)), []
        else:
            body.append(ln)
    out.append((heading, level, "\n".join(body)))
    return out


def measured_sections() -> list[tuple[str, str, str]]:
    """(doc:heading, the figures found, the provenance text in force) for each section quoting one."""
    out = []
    for doc in DOCS:
        stack: list[tuple[int, str]] = []  # (level, text) of the enclosing headings
        for heading, level, text in sections(doc):
            stack = [(lv, t) for lv, t in stack if lv < level] + [(level, text)]
            found = [m.group(0) for m in MEASURED.finditer(re.sub(r"`[^`]*`", "", text))]
            if found and not NO_MEASUREMENTS.search(text):
                out.append((f"{doc.relative_to(REPO)}: {heading.strip('# ')}", ", ".join(found[:4]),
                            "\n".join(t for _, t in stack)))
    return out


def _known_commit(sha: str) -> bool | None:
    """Whether the repository has this commit; None where that cannot be told (no git, a shallow clone)."""
    try:
        shallow = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"],
                                 capture_output=True, text=True, timeout=30)
        if shallow.returncode or shallow.stdout.strip() != "false":
            return None
        return subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{sha}^{{commit}}"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return None


def test_measured_figures_say_machine_and_commit():
    missing, unknown = [], []
    for where, found, context in measured_sections():
        if not PROVENANCE.search(context):
            missing.append(f"{where} ({found})")
        shas = set(COMMIT.findall(context))
        unknown += [f"{where}: commit {s}" for s in sorted(shas) if _known_commit(s) is False]
    assert not missing, ("sections quoting measured times or speeds without 'measured on MACHINE ... commit SHA' "
                         f"(or '<!-- docs-test: no measurements: REASON -->' where the durations are settings): {missing}")
    assert not unknown, f"provenance naming commits this repository does not have: {unknown}"


# --- README statements that no block shows ------------------------------------------------------------
def test_readme_names_every_config_section():
    from peftlab.config.schema import Config

    sentence = re.search(r"One YAML file with sections (.+?);", (REPO / "README.md").read_text(), re.S)
    assert sentence and set(re.findall(r"`(\w+)`", sentence.group(1))) == set(Config.model_fields)


def test_readme_an_interrupted_run_is_failed_interrupted_and_says_how_to_resume(docs, tmp_path, monkeypatch, capsys):
    """README, "A run": status "failed", error "interrupted", and the command prints how to --resume."""
    from peftlab.cli import main
    from peftlab.training.trainer import Trainer

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "end_epoch", interrupt)
    args = ["train", "--no-progress", "--output-dir", str(tmp_path / "run")]
    assert main(args + [a for s in SMALL for a in ("--set", docs.fill(s))]) == 130
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (record["status"], record["error"]) == ("failed", "interrupted")
    assert f"peftlab train --resume {tmp_path / 'run'}" in capsys.readouterr().err
