"""The few-shot study of docs/few-shot.md: peftlab's few-shot methods and SetFit side by side on the same
rows. SST-2 (test: the 872 GLUE dev rows) and AG News (test: 1,000 fixed rows of its test split, the
labelled rows drawn from the other 6,600), 8 / 16 / 64 labelled rows per class, seeds 0 / 1 / 2, all on
all-MiniLM-L6-v2 (the embedded minilm-l6). Data is read from ../shared/data, never copied into the repo.

    python examples/few_shot_study.py                 # everything, resumable: finished cells are skipped
    python examples/few_shot_study.py --table         # the tables of docs/few-shot.md from the results

SetFit runs in a virtualenv of its own that this script makes (pip install setfit with torch==2.13.0 pinned,
the CPU build where the index offers it), never in peftlab's environment; it reads the same MiniLM folder.
Each finished cell is appended to OUT/results.jsonl at once, so a stopped study keeps what it measured.
Order: seed 0 of every cell first (most signal soonest), then seeds 1 and 2, plain LoRA last.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SIZES = (8, 16, 64)
SEEDS = (0, 1, 2)
DATASETS = ("sst2", "ag_news")
# peftlab systems: config file and overrides; pair iterations as SetFit's num_iterations below (same pairs)
PEFTLAB = {
    "contrastive-lora": ("configs/few-shot-contrastive-lora.yaml", []),
    "probe": ("configs/few-shot-probe.yaml", []),
    "lora": ("configs/few-shot-lora.yaml", []),
}
FIRST = ("contrastive-lora", "setfit", "probe")  # every seed of these before plain LoRA
THREADS = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # the same for both sides
SETFIT_PACKAGES = ["torch==2.13.0", "setfit==1.2.0"]


def pair_iterations(per_class: int) -> int:
    """Pair iterations (SetFit's num_iterations) for both sides alike: 2 x this many pairs per labelled row.
    A budget for 2 shared CPU cores: 10 at 8 rows per class (about SetFit's default pair count there), 5 above
    (the issue's SetFit runs at 64 per class)."""
    return 10 if per_class <= 8 else 5


# --- data ----------------------------------------------------------------------------------------------
def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def dataset(name: str) -> tuple[list[dict], list[dict], list[str]]:
    """(pool of labelled rows to draw from, test rows, label names)."""
    names = json.loads((SHARED / name / "labels.json").read_text())
    if name == "sst2":
        return read(SHARED / "sst2" / "train.jsonl.gz"), read(SHARED / "sst2" / "validation.jsonl.gz"), names
    rows = read(SHARED / "ag_news" / "test.jsonl.gz")
    rng = np.random.default_rng(0)  # the 1,000 fixed test rows: 250 per class
    labels = np.array([r["label"] for r in rows])
    test = set(np.concatenate([rng.choice(np.flatnonzero(labels == c), 250, replace=False) for c in range(4)]).tolist())
    return [r for i, r in enumerate(rows) if i not in test], [rows[i] for i in sorted(test)], names


def draw(pool: list[dict], per_class: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = np.array([r["label"] for r in pool])
    picks = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                            for c in sorted(set(labels.tolist()))])
    return [pool[i] for i in sorted(picks.tolist())]


def write(path: Path, rows: list[dict], names: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": r["text"], "label": names[r["label"]]}) + "\n" for r in rows)
    os.replace(tmp, path)


def cell_data(out: Path, name: str, per_class: int, seed: int, cache: dict) -> Path:
    """OUT/data/NAME-K-sSEED/{train,validation,test}.jsonl: validation is the labelled rows again (a few
    rows cannot spare a validation split; the issue's comparison did the same)."""
    folder = out / "data" / f"{name}-{per_class}-s{seed}"
    if not (folder / "test.jsonl").exists():
        if name not in cache:
            cache[name] = dataset(name)
        pool, test, names = cache[name]
        folder.mkdir(parents=True, exist_ok=True)
        rows = draw(pool, per_class, seed)
        write(folder / "train.jsonl", rows, names)
        write(folder / "validation.jsonl", rows, names)
        write(folder / "test.jsonl", test, names)
    return folder


# --- systems -------------------------------------------------------------------------------------------
def run_peftlab(system: str, folder: Path, per_class: int, seed: int, out: Path) -> dict:
    config, extra = PEFTLAB[system]
    run_dir = out / "runs" / f"{folder.name}-{system}"
    overrides = [f"data.path={folder}", f"train.seed={seed}", "output.plots=false", "eval.baseline=false", *extra]
    if system.startswith("contrastive"):
        overrides.append(f"method.pair_iterations={pair_iterations(per_class)}")
    cmd = [sys.executable, "-m", "peftlab", "train", str(REPO / config), "--no-progress", "--output-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # an interrupted run: start it again
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src"), **THREADS},
                   stdout=subprocess.DEVNULL)
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"accuracy": m["test"]["accuracy"], "macro_f1": m["test"]["macro_f1"],
            "train_seconds": m["efficiency"]["train_seconds"], "run_dir": str(run_dir.relative_to(out)),
            "few_shot": m.get("few_shot"), "head": (m.get("head") or {}).get("kind")}


def setfit_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import setfit"], capture_output=True).returncode:
        print(f"making SetFit's virtualenv in {venv} ({' '.join(SETFIT_PACKAGES)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SETFIT_PACKAGES], check=True)
    return python


def run_setfit(python: Path, folder: Path, per_class: int, seed: int, out: Path) -> dict:
    from peftlab.models.loading import resolve

    result = out / "runs" / f"{folder.name}-setfit.json"
    cmd = [str(python), str(REPO / "examples" / "few_shot_setfit.py"), "--model", resolve("minilm-l6"),
           "--data", str(folder), "--seed", str(seed), "--iterations", str(pair_iterations(per_class)),
           "--max-length", "128", "--output", str(result)]
    result.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                  "TRANSFORMERS_OFFLINE": "1", **THREADS})
    return json.loads(result.read_text())


# --- the study -----------------------------------------------------------------------------------------
def cells(systems: list[str]) -> list[tuple[str, int, str, int]]:
    """(dataset, per class, system, seed), most signal first."""
    first = [s for s in systems if s in FIRST]
    later = [s for s in systems if s not in FIRST]
    order = []
    for group in (first, later):
        for seed in SEEDS:
            order += [(d, k, s, seed) for k in SIZES for d in DATASETS for s in group]
    return order


def done(results: Path) -> set[tuple]:
    if not results.exists():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["dataset"], r["per_class"], r["system"], r["seed"]) for r in rows}


def study(out: Path, venv: Path, systems: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results, cache = out / "results.jsonl", {}
    python = setfit_python(venv) if "setfit" in systems else None
    finished = done(results)
    for name, k, system, seed in cells(systems):
        if (name, k, system, seed) in finished:
            continue
        folder = cell_data(out, name, k, seed, cache)
        start = time.time()
        try:
            figures = (run_setfit(python, folder, k, seed, out) if system == "setfit"
                       else run_peftlab(system, folder, k, seed, out))
        except subprocess.CalledProcessError as e:
            print(f"{name} {k}/class {system} seed {seed}: failed ({e})", flush=True)
            continue
        row = {"dataset": name, "per_class": k, "system": system, "seed": seed, **figures,
               "wall_seconds": round(time.time() - start, 1), "finished": time.strftime("%H:%M:%S")}
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name} {k}/class {system} seed {seed}: acc {row['accuracy']:.4f} macro-F1 {row['macro_f1']:.4f} "
              f"train {row['train_seconds']:.1f}s", flush=True)


def table(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    systems = [s for s in ("setfit", "contrastive-lora", "probe", "lora") if any(r["system"] == s for r in rows)]
    lines = ["| dataset, rows per class | " + " | ".join(systems) + " |", "| --- |" + " --- |" * len(systems)]
    for name in DATASETS:
        for k in SIZES:
            cell = []
            for s in systems:
                got = sorted((r for r in rows if (r["dataset"], r["per_class"], r["system"]) == (name, k, s)),
                             key=lambda r: r["seed"])
                if not got:
                    cell.append("")
                    continue
                acc = [r["accuracy"] for r in got]
                f1 = statistics.fmean(r["macro_f1"] for r in got)
                secs = statistics.fmean(r["train_seconds"] for r in got)
                cell.append(f"{' / '.join(f'{a:.3f}' for a in acc)} (mean **{statistics.fmean(acc):.3f}**, "
                            f"F1 {f1:.3f}, {secs:.0f}s)")
            lines.append(f"| {name}, {k} | " + " | ".join(cell) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "few-shot-study"), help="results and runs (default runs/few-shot-study)")
    parser.add_argument("--setfit-venv", default=str(Path.home() / ".cache" / "peftlab" / "setfit-venv"))
    parser.add_argument("--systems", default="contrastive-lora,setfit,probe,lora",
                        help="comma-separated: setfit and peftlab's " + ", ".join(PEFTLAB))
    parser.add_argument("--table", action="store_true", help="print the results table and stop")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return
    study(Path(args.out), Path(args.setfit_venv), [s.strip() for s in args.systems.split(",") if s.strip()])


if __name__ == "__main__":
    main()
