"""The few-shot study of docs/few-shot.md: peftlab's few-shot methods and SetFit side by side on the same
rows. SST-2 (test: the 872 GLUE dev rows), AG News (test: 1,000 fixed rows of its test split, the
labelled rows drawn from the other 6,600) and IMDb (long reviews, held out from tuning: test 500 fixed
rows of its test split, the labelled rows drawn from its train split), 8 / 16 / 64 labelled rows per
class, seeds 0 / 1 / 2, all on all-MiniLM-L6-v2 (the embedded minilm-l6). Data is read from
../shared/data, never copied into the repo.

    python examples/few_shot_study.py                 # everything, resumable: finished cells are skipped
    python examples/few_shot_study.py --datasets sst2 --sizes 8 --seeds 0,1,2 --systems setfit,contrastive-lora
                                                      # one comparison: accuracy mean +- std, train seconds, ratio
    python examples/few_shot_study.py --table         # the tables of docs/few-shot.md from the results

Both sides run with their own defaults: SetFit 1.2's (20 pair iterations, the checkpoint's 256 tokens,
body learning rate 2e-5, logistic head) and peftlab's few-shot configs (data.max_length unset: the same
256; no validation file, so no labelled row is spent on validation). peftlab runs pin train.precision=fp32
(SetFit trains in fp32 on a CPU), so that the two sides compute alike on any machine. Within a cell the
systems run one after the other, one thread each, so their times are comparable (the machine's load
average is recorded beside each row).

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
import re
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
DATASETS = ("sst2", "ag_news", "imdb")
# peftlab systems: config file and overrides (more with --variant NAME KEY=VALUE ...)
PEFTLAB = {
    "contrastive-lora": ("configs/few-shot-contrastive-lora.yaml", []),
    "contrastive-full": ("configs/few-shot-contrastive-full.yaml", []),
    "probe": ("configs/few-shot-probe.yaml", []),
    "lora": ("configs/few-shot-lora.yaml", []),
}
ORDER = ("setfit", "contrastive-lora", "contrastive-full", "probe", "lora")  # table columns, then variants
PINNED = ["train.precision=fp32"]  # comparable on any CPU (a bf16 default would change peftlab's side only)
THREADS = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # the same for both sides
SETFIT_PACKAGES = ["torch==2.13.0", "setfit==1.2.0"]
SETFIT_AT = re.compile(r"setfit-i(\d+)$")  # SetFit at a fixed pair budget: num_iterations N, 2 x N x rows pairs


def is_setfit(system: str) -> bool:
    return system == "setfit" or bool(SETFIT_AT.match(system))


# --- data ----------------------------------------------------------------------------------------------
def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def dataset(name: str) -> tuple[list[dict], list[dict], list[str]]:
    """(pool of labelled rows to draw from, test rows, label names)."""
    names = json.loads((SHARED / name / "labels.json").read_text())
    if name == "sst2":
        return read(SHARED / "sst2" / "train.jsonl.gz"), read(SHARED / "sst2" / "validation.jsonl.gz"), names
    if name == "imdb":  # 500 fixed test rows (250 per class) of the test split; labelled rows from train
        test = read(SHARED / "imdb" / "test.jsonl.gz")
        labels = np.array([r["label"] for r in test])
        rng = np.random.default_rng(0)
        picks = np.concatenate([rng.choice(np.flatnonzero(labels == c), 250, replace=False) for c in range(2)])
        return read(SHARED / "imdb" / "train.jsonl.gz"), [test[i] for i in sorted(picks.tolist())], names
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
    """OUT/data/NAME-K-sSEED/{train,test}.jsonl: no validation file; peftlab then spares the labelled rows
    (a carved validation split this small could not choose anything) and SetFit trains on all of them."""
    folder = out / "data" / f"{name}-{per_class}-s{seed}"
    if not (folder / "test.jsonl").exists():
        if name not in cache:
            cache[name] = dataset(name)
        pool, test, names = cache[name]
        folder.mkdir(parents=True, exist_ok=True)
        rows = draw(pool, per_class, seed)
        write(folder / "train.jsonl", rows, names)
        write(folder / "test.jsonl", test, names)
    return folder


# --- systems -------------------------------------------------------------------------------------------
def run_peftlab(system: str, folder: Path, seed: int, out: Path) -> dict:
    config, extra = PEFTLAB[system]
    run_dir = out / "runs" / f"{folder.name}-{system}"
    overrides = [f"data.path={folder}", f"train.seed={seed}", "output.plots=false", "eval.baseline=false",
                 *PINNED, *extra]
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
            "few_shot": m.get("few_shot"), "head": (m.get("head") or {}).get("kind"), "overrides": extra,
            "max_length": m.get("max_length"), "precision": m["efficiency"]["precision"]}


def setfit_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import setfit"], capture_output=True).returncode:
        print(f"making SetFit's virtualenv in {venv} ({' '.join(SETFIT_PACKAGES)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SETFIT_PACKAGES], check=True)
    return python


def run_setfit(python: Path, system: str, folder: Path, seed: int, out: Path) -> dict:
    """SetFit 1.2 with its own defaults (few_shot_setfit.py), on the same rows and seed; `setfit-iN` sets
    only its num_iterations (the pair budget of peftlab's method.pair_iterations=N)."""
    from peftlab.models.loading import resolve

    result = out / "runs" / f"{folder.name}-{system}.json"
    cmd = [str(python), str(REPO / "examples" / "few_shot_setfit.py"), "--model", resolve("minilm-l6"),
           "--data", str(folder), "--seed", str(seed), "--output", str(result)]
    if SETFIT_AT.match(system):
        cmd += ["--iterations", SETFIT_AT.match(system).group(1)]
    result.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                  "TRANSFORMERS_OFFLINE": "1", **THREADS})
    return json.loads(result.read_text())


# --- the study -----------------------------------------------------------------------------------------
def cells(systems: list[str], datasets, sizes, seeds) -> list[tuple[str, int, str, int]]:
    """(dataset, per class, system, seed): seed by seed (most signal first), every system of a cell one
    after the other (SetFit and peftlab interleaved, so that their times share the machine's load)."""
    return [(d, k, s, seed) for seed in seeds for k in sizes for d in datasets for s in systems]


def done(results: Path) -> set[tuple]:
    if not results.exists():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["dataset"], r["per_class"], r["system"], r["seed"]) for r in rows}


def study(out: Path, venv: Path, systems: list[str], datasets, sizes, seeds) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results, cache = out / "results.jsonl", {}
    python = setfit_python(venv) if any(map(is_setfit, systems)) else None
    finished = done(results)
    for name, k, system, seed in cells(systems, datasets, sizes, seeds):
        if (name, k, system, seed) in finished:
            continue
        folder = cell_data(out, name, k, seed, cache)
        start, load = time.time(), os.getloadavg()[0]
        try:
            figures = (run_setfit(python, system, folder, seed, out) if is_setfit(system)
                       else run_peftlab(system, folder, seed, out))
        except subprocess.CalledProcessError as e:
            print(f"{name} {k}/class {system} seed {seed}: failed ({e})", flush=True)
            continue
        row = {"dataset": name, "per_class": k, "system": system, "seed": seed, **figures,
               "wall_seconds": round(time.time() - start, 1), "finished": time.strftime("%H:%M:%S"),
               "load": [round(load, 1), round(os.getloadavg()[0], 1)]}
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name} {k}/class {system} seed {seed}: acc {row['accuracy']:.4f} macro-F1 {row['macro_f1']:.4f} "
              f"train {row['train_seconds']:.1f}s (load {row['load'][0]}-{row['load'][1]})", flush=True)


def table(out: Path, systems: list[str] | None = None, reference: str = "setfit") -> str:
    """Per dataset and size: each system's accuracy mean +- std over its seeds (n), train seconds, and the
    ratio of its train time to the reference's (SetFit's) on the same seeds (mean of per-seed ratios)."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    present = list(dict.fromkeys(r["system"] for r in rows))
    systems = [s for s in (systems or [*ORDER, *present]) if s in present]
    systems = list(dict.fromkeys(systems))
    lines = ["| dataset, rows per class | " + " | ".join(systems) + " |", "| --- |" + " --- |" * len(systems)]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for k in sorted({r["per_class"] for r in rows if r["dataset"] == name}):
            here = {(r["system"], r["seed"]): r for r in rows if (r["dataset"], r["per_class"]) == (name, k)}
            cell = []
            for s in systems:
                got = [here[key] for key in sorted(here) if key[0] == s]
                if not got:
                    cell.append("")
                    continue
                acc = [r["accuracy"] for r in got]
                std = statistics.stdev(acc) if len(acc) > 1 else 0.0
                secs = statistics.fmean(r["train_seconds"] for r in got)
                ratios = [r["train_seconds"] / here[(reference, r["seed"])]["train_seconds"]
                          for r in got if (reference, r["seed"]) in here and s != reference]
                ratio = f", x{statistics.fmean(ratios):.2f} of {reference}'s time" if ratios else ""
                pairs = [r.get("pairs") or (r.get("few_shot") or {}).get("pairs") or 0 for r in got]
                cell.append(f"**{statistics.fmean(acc):.3f}** ± {std:.3f} (n={len(acc)}; {secs:.0f}s{ratio}; "
                            f"{statistics.fmean(pairs):,.0f} pairs)")
            lines.append(f"| {name}, {k} | " + " | ".join(cell) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "few-shot-study"), help="results and runs (default runs/few-shot-study)")
    parser.add_argument("--setfit-venv", default=str(Path.home() / ".cache" / "peftlab" / "setfit-venv"))
    parser.add_argument("--systems", default="setfit,contrastive-lora,contrastive-full",
                        help="comma-separated: setfit (its defaults), setfit-iN (num_iterations N), peftlab's "
                             + ", ".join(PEFTLAB) + ", and --variant names")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a peftlab system: contrastive-lora's config with these --set overrides "
                             "(e.g. --variant inbatch method.pair_objective=in_batch); name it in --systems")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ", ".join(DATASETS))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="labelled rows per class, comma-separated")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated")
    parser.add_argument("--table", action="store_true", help="print the results table and stop")
    parser.add_argument("--reference", default="setfit", help="the system whose train time the ratios divide by")
    args = parser.parse_args()
    for name, *overrides in args.variant:
        PEFTLAB[name] = (PEFTLAB["contrastive-lora"][0], overrides)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.table:
        unknown = [s for s in systems if not is_setfit(s) and s not in PEFTLAB]
        if unknown:
            parser.error(f"unknown system {unknown[0]!r}: setfit, setfit-iN, " + ", ".join(PEFTLAB))
        study(Path(args.out), Path(args.setfit_venv), systems, args.datasets.split(","),
              [int(k) for k in args.sizes.split(",")], [int(x) for x in args.seeds.split(",")])
    print(table(Path(args.out), systems if not args.table or "--systems" in sys.argv else None, args.reference))


if __name__ == "__main__":
    main()
