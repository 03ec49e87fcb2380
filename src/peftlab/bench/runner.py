"""Run one benchmark scenario: our training path against the reference Trainer + PEFT baseline.

Every contender runs in its own process (same Python), on the same rows, model, hyper-parameters,
seed and number of optimizer steps, in an order that rotates between parts and repeats:

  peftlab          `peftlab train` with the scenario's settings (the real training path)
  seed, tuned      the baseline script with --style seed / --style tuned
  peftlab-<name>   peftlab with a variant's extra overrides (e.g. full fine-tuning, torch.compile)

Figures come from each contender's own record: peftlab's metrics.json ("efficiency": train_seconds
over the training loop only, real tokens = non-padding tokens of the samples processed) and the
baseline's JSON line (the same definitions). Peak memory: on GPU each contender's own
max_memory_allocated; on CPU the peak resident set size of its process (wait4 rusage), measured
the same way for all.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import yaml

from peftlab.bench import flops
from peftlab.bench.scenarios import Part, Scenario
from peftlab.errors import UserError
from peftlab.runs.record import RunRecord
from peftlab.runs.rundir import RunDir

BASELINE_STYLES = ("seed", "tuned")
PEFTLAB_MAIN = "peftlab"
PEFTLAB_FP32 = "peftlab-fp32"  # the CPU scenarios' fp32 contender: what precision=auto gains over it


# ------------------------------------------------------------------------------------------ data

def _baseline_module(path: Path):
    """The baseline script as a module: its own reader draws the rows, so both sides get the same."""
    spec = importlib.util.spec_from_file_location("hf_trainer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the script only runs main() under __main__
    return module


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n")


def prepare_data(part: Part, scenario: Scenario, baseline: Path, into: Path) -> dict:
    """train/validation/test JSON Lines for this part in `into` (outside the repository).

    Rows are drawn by the baseline's own read_jsonl (stratified, seeded), so the baseline reading
    these files sees exactly the rows it would have drawn itself. peftlab also needs a validation
    split to choose its best epoch: it gets the first `validation_rows` *training* rows, so the
    choice never sees the test rows (the baseline evaluates its last epoch)."""
    data_dir = scenario.path(part.data)
    train_src, test_src = data_dir / part.train_file, data_dir / part.test_file
    for f in (train_src, test_src):
        if not f.is_file():
            raise UserError(f"scenario {scenario.name}: data file {f} not found (data paths are relative to {scenario.root})")
    reader = _baseline_module(baseline)
    train = reader.read_jsonl(str(train_src), part.max_train, part.seed)
    test = reader.read_jsonl(str(test_src), part.max_test, part.seed)
    into.mkdir(parents=True, exist_ok=True)
    _write_jsonl(into / "train.jsonl", train)
    _write_jsonl(into / "validation.jsonl", train[:part.validation_rows])
    _write_jsonl(into / "test.jsonl", test)
    labels = data_dir / "labels.json"
    if labels.is_file():
        shutil.copy(labels, into / "labels.json")
    counts = statistics.multimode(r["label"] for r in test)
    majority = sum(1 for r in test if r["label"] == counts[0]) / max(len(test), 1)
    return {"source": str(data_dir), "train_file": part.train_file, "test_file": part.test_file,
            "train_rows": len(train), "test_rows": len(test), "validation_rows": min(part.validation_rows, len(train)),
            "num_labels": max(r["label"] for r in train + test) + 1,
            "chance_accuracy": round(majority, 4), "dir": into}  # chance: always the test's commonest label


# ------------------------------------------------------------------------------------- processes

def _spawn(cmd: list[str], env: dict, log: Path, timeout: float | None) -> tuple[int, str, int, float]:
    """Run cmd to completion: (exit code, stdout, peak RSS bytes of the process, seconds). Output
    goes to files (no pipe can fill up); wait4 gives this child's own resource usage."""
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        timer = None
        if timeout:
            def kill():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and its helpers
                except ProcessLookupError:
                    pass
            timer = threading.Timer(timeout, kill)
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
    return proc.returncode, out_path.read_text(errors="replace"), int(usage.ru_maxrss) * 1024, seconds


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _env(scenario: Scenario, threads: int | None) -> dict:
    env = dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_HUB_OFFLINE", "1")
    if scenario.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU scenario stays on the CPU even on a GPU machine
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def model_ref(part: Part, scenario: Scenario) -> str:
    """The part's model as peftlab names it: an alias, random:SHAPE, a hub id, or an absolute folder."""
    model = part.model
    if not model.startswith("random:") and ("/" in model or model.startswith(".")) and scenario.path(model).exists():
        return str(scenario.path(model))
    return model


def peftlab_config(part: Part, scenario: Scenario, data: dict, overrides: dict) -> dict:
    """The `peftlab train` config: the scenario's hyper-parameters, the same as the baseline's."""
    lora = part.lora
    model = model_ref(part, scenario)
    cfg = {
        "data": {"path": str(data["dir"]), "max_length": part.max_length},
        # the same computation as the baselines: their [CLS] head, their batch size however few the rows
        "model": {"name": model, "head": "cls"},
        "method": {"name": "lora", "r": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"],
                   "target_modules": list(lora["target_modules"])},
        "train": {"epochs": part.epochs, "batch_size": part.batch_size, "learning_rate": part.learning_rate,
                  "seed": part.seed, "device": scenario.device, "weight_decay": 0.01, "warmup_ratio": 0.1,
                  "max_grad_norm": 1.0, "checkpoint_every_epoch": False, "min_steps_per_epoch": 1},
        "eval": {"baseline": False, "batch_size": 128, "metric": "accuracy"},
        "output": {"plots": False},
    }
    for key, value in {**part.peftlab, **overrides}.items():
        _set_dotted(cfg, key, value)
    return cfg


def _baseline_model_args(part: Part, scenario: Scenario) -> list[str]:
    from peftlab.models.loading import ALIASES, resolve

    model = part.model
    if model.startswith("random:"):
        return ["--model", model, "--tokenizer", resolve("minilm-l6")]
    if model in ALIASES:
        return ["--model", resolve(model)]
    return ["--model", model_ref(part, scenario)]


def run_peftlab(name: str, part: Part, scenario: Scenario, data: dict, overrides: dict, work: Path,
                env: dict, timeout: float | None) -> dict:
    cfg = peftlab_config(part, scenario, data, overrides)
    work.mkdir(parents=True, exist_ok=True)
    cfg_file = work / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-c", "import sys; from peftlab.cli import main; sys.exit(main())",
           "train", str(cfg_file), "--output-dir", str(work / "run"), "--no-progress"]
    code, _, rss, seconds = _spawn(cmd, env, work / "log", timeout)
    record = RunRecord.read_or_none(RunDir(work / "run").metrics_file)
    if code != 0 or record is None or not record.completed:
        return {"contender": name, "ok": False, "error": f"exit {code}: {_tail(work / 'log.err')}",
                "process_seconds": round(seconds, 1)}
    eff = record.efficiency
    gpu = eff.peak_memory_kind == "gpu_max_allocated"
    return {
        "contender": name, "ok": True, "kind": "peftlab", "method": cfg["method"]["name"],
        "overrides": {**part.peftlab, **overrides},
        "precision": eff.precision, "precision_reason": eff.precision_reason, "padding": "dynamic (length-grouped)", "sampler": cfg["train"].get("sampler", "length_grouped"),
        "optimizer_steps": eff.optimizer_steps, "train_seconds": eff.train_seconds,
        "real_tokens_per_second": eff.train_tokens_per_second,
        "samples_per_second": eff.train_samples_per_second,
        "peak_memory_bytes": eff.peak_memory_bytes if gpu else rss,
        "peak_memory_kind": "gpu_max_allocated" if gpu else "cpu_process_peak_rss",
        "test_accuracy": round(record.test.accuracy, 4), "test_macro_f1": round(record.test.macro_f1, 4),
        "device": eff.device, "process_seconds": round(seconds, 1),
        # as built and as run, from the run's own record
        "step_engine": eff.step_engine, "step_engine_reason": eff.step_engine_reason, "frozen_dtype": eff.frozen_dtype,
        "graph_capture_seconds": eff.graph_capture_seconds,
        "quantization": record.quantization.model_dump() if record.quantization else None,
    }


# transformers 5 refuses TrainingArguments(bf16=True) on a machine without a GPU unless use_cpu=True is set too
# (its own error says so): what a user tuning the Trainer for bf16 on a CPU sets. The baseline script is run
# unchanged, with that default added to TrainingArguments.
CPU_BF16_LAUNCHER = """import functools, runpy, sys
import transformers
init = transformers.TrainingArguments.__init__
@functools.wraps(init)
def with_use_cpu(self, *args, **kwargs):
    kwargs.setdefault("use_cpu", True)
    init(self, *args, **kwargs)
transformers.TrainingArguments.__init__ = with_use_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def baseline_precision(style: str, scenario: Scenario) -> str | None:
    """The tuned Trainer trains in bf16 on a CPU with bf16 units (bf16=True, as a user tuning it would set);
    otherwise each style keeps its own choice (None)."""
    from peftlab.runtime import cpu_bf16

    return "bf16" if style == "tuned" and scenario.device == "cpu" and cpu_bf16()[0] else None


def run_baseline(style: str, part: Part, scenario: Scenario, data: dict, baseline: Path, work: Path,
                 env: dict, timeout: float | None) -> dict:
    lora = part.lora
    if float(lora["alpha"]) != int(lora["alpha"]):
        raise UserError(f"scenario {scenario.name}: the baseline takes an integer lora alpha, not {lora['alpha']}")
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(baseline), *_baseline_model_args(part, scenario),
           "--train", str(data["dir"] / "train.jsonl"), "--test", str(data["dir"] / "test.jsonl"),
           "--style", style, "--max-length", str(part.max_length), "--batch-size", str(part.batch_size),
           "--epochs", str(part.epochs), "--lr", str(part.learning_rate), "--r", str(lora["r"]),
           "--alpha", str(int(lora["alpha"])), "--dropout", str(lora["dropout"]),
           "--targets", ",".join(lora["target_modules"]), "--seed", str(part.seed),
           "--output-dir", str(work / "trainer")]
    precision = baseline_precision(style, scenario)
    if precision:
        cmd += ["--precision", precision]
        if scenario.device == "cpu":
            cmd[1:1] = ["-c", CPU_BF16_LAUNCHER]
    code, stdout, rss, seconds = _spawn(cmd, env, work / "log", timeout)
    line = next((ln for ln in reversed(stdout.strip().splitlines()) if ln.startswith("{")), None)
    if code != 0 or line is None:
        return {"contender": style, "ok": False, "error": f"exit {code}: {_tail(work / 'log.err')}",
                "process_seconds": round(seconds, 1)}
    res = json.loads(line)
    gpu = res.get("peak_gpu_memory_bytes") is not None
    return {
        "contender": style, "ok": True, "kind": "baseline", "method": "lora", "style": style,
        "precision": res["precision"], "padding": res["padding"], "sampler": res["sampler"],
        "optimizer_steps": res["steps"], "train_seconds": res["train_seconds"],
        "real_tokens_per_second": res["real_tokens_per_second"], "samples_per_second": res["samples_per_second"],
        "peak_memory_bytes": res["peak_gpu_memory_bytes"] if gpu else rss,
        "peak_memory_kind": "gpu_max_allocated" if gpu else "cpu_process_peak_rss",
        "test_accuracy": res["test_accuracy"], "test_macro_f1": res["test_macro_f1"],
        "device": res["device"], "process_seconds": round(seconds, 1),
        "step_engine": "transformers Trainer", "quantization": None,
        "use_cpu": bool(precision) and scenario.device == "cpu",  # CPU_BF16_LAUNCHER's one addition
    }


# ---------------------------------------------------------------------------------------- summary

def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def summarise(runs: list[dict], flops_token: float | None, peak: float | None, cpu: dict | None = None) -> dict:
    """One contender's figures over its repeats: medians of speed, max of memory, mean of accuracy; on a
    CPU (`cpu`: flops.cpu_peaks) its share of the fp32 and of the bf16 matmul peak."""
    good = [r for r in runs if r.get("ok")]
    if not good:
        return {"ok": False, "error": runs[-1].get("error") if runs else "not run", "runs": runs}
    first = good[0]
    tps = _median([r["real_tokens_per_second"] for r in good])
    out = {
        "ok": True, "kind": first["kind"], "method": first["method"], "precision": first["precision"],
        "padding": first["padding"], "sampler": first["sampler"], "device": first["device"],
        "optimizer_steps": first["optimizer_steps"],
        "train_seconds": _median([r["train_seconds"] for r in good]),
        "real_tokens_per_second": tps,
        "samples_per_second": _median([r["samples_per_second"] for r in good]),
        "real_tokens": round(tps * _median([r["train_seconds"] for r in good])) if tps else None,
        "peak_memory_bytes": max(r["peak_memory_bytes"] or 0 for r in good) or None,
        "peak_memory_kind": first["peak_memory_kind"],
        "test_accuracy": round(statistics.mean(r["test_accuracy"] for r in good), 4),
        "test_macro_f1": round(statistics.mean(r["test_macro_f1"] for r in good), 4),
        "model_flops_per_token": flops_token,
        "mfu": _round(flops.mfu(tps, flops_token, peak) if flops_token else None, 4),
        "share_of_fp32_peak": _round(flops.share(tps, flops_token, cpu["fp32"]), 4) if cpu else None,
        "share_of_bf16_peak": _round(flops.share(tps, flops_token, cpu["bf16"]), 4) if cpu else None,
        "runs": runs,
    }
    for key in ("overrides", "precision_reason", "step_engine", "step_engine_reason", "frozen_dtype", "quantization"):
        if key in first:
            out[key] = first[key]
    return out


def at_chance(summaries: dict, chance: float, margin: float = 0.02) -> bool:
    """Every contender that ran is within `margin` of always answering the commonest test label: then
    nothing was learnt, and a speed ratio between them says nothing about training."""
    ok = [s for s in summaries.values() if s.get("ok")]
    return bool(ok) and all(s["test_accuracy"] <= chance + margin for s in ok)


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not a.get("ok") or not b.get("ok") or not b["real_tokens_per_second"]:
        return None
    return round(a["real_tokens_per_second"] / b["real_tokens_per_second"], 2)


def _versions() -> dict:
    import numpy
    import peft
    import torch
    import transformers

    import peftlab

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "numpy": numpy.__version__, "peftlab": getattr(peftlab, "__version__", None),
            "cuda": torch.version.cuda}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peaks_line(cpu: dict) -> str:
    return (f"CPU matmul peak ({cpu['threads']} thread(s), x @ W.T, W {cpu['shape']['fp32'][2]}x{cpu['shape']['fp32'][1]}): "
            f"fp32 {cpu['fp32'] / 1e9:,.1f} GFLOP/s, bf16 {cpu['bf16'] / 1e9:,.1f} GFLOP/s "
            f"({'bf16 units' if cpu['bf16_units'] else 'bf16 emulated'}: {cpu['bf16_reason']})")


# ------------------------------------------------------------------------------------------- main

def _append(path: Path | None, row: dict) -> None:
    """One finished contender as one JSON line, written as soon as it finishes (a later timeout or crash
    still leaves it)."""
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_scenario(scenario: Scenario, output_dir: str | Path, *, repeats: int | None = None,
                 only: list[str] | None = None, threads: int | None = None, max_train: int | None = None,
                 max_test: int | None = None, keep_work: bool = False, peak_tflops: float | None = None,
                 log: Callable[[str], None] = print, parts: list[str] | None = None, timeout_s: float | None = None,
                 append: str | Path | None = None) -> dict:
    """Run every part and contender of `scenario` (or the named `parts`); write and return
    <output_dir>/<name>.json. `timeout_s`: each contender's limit; `append`: a JSON Lines file that gets
    every contender's result as it finishes."""
    import torch

    if scenario.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"scenario {scenario.name} needs a CUDA GPU and none is available here; "
                        f"on this machine run a CPU scenario (cpu-sst2, cpu-imdb)")
    overrides = {k: v for k, v in {"repeats": repeats, "max_train": max_train, "max_test": max_test,
                                   "only": only, "threads": threads}.items() if v is not None}
    if parts:
        unknown = set(parts) - {p.name for p in scenario.parts}
        if unknown:
            raise UserError(f"--part: scenario {scenario.name} has no part {', '.join(sorted(unknown))} "
                            f"(its parts: {', '.join(p.name for p in scenario.parts)})")
        scenario.parts = [p for p in scenario.parts if p.name in parts]
        overrides["parts"] = parts
    if timeout_s:
        overrides["timeout_s"] = timeout_s
    for part in scenario.parts:
        for key in ("repeats", "max_train", "max_test", "timeout_s"):
            if key in overrides:
                part.settings[key] = overrides[key]
    baselines = {scenario.path(p.baseline) for p in scenario.parts}
    for b in baselines:
        if not b.is_file():
            raise UserError(f"scenario {scenario.name}: baseline script {b} not found (paths are relative to "
                            f"{scenario.root}; the reference lives in ../shared/bench/)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(0) if scenario.device == "cuda" else "cpu"
    versions = _versions()
    peak = peak_tflops * 1e12 if peak_tflops else (flops.peak_bf16_flops(device_name) if scenario.device == "cuda" else None)
    env = _env(scenario, threads)
    # the CPU's own ceilings, with the contenders' thread count: every share is read against them
    cpu = flops.cpu_peaks(threads) if scenario.device == "cpu" else None
    if cpu:
        log(peaks_line(cpu))
    work_root = Path(tempfile.mkdtemp(prefix=f"peftlab-bench-{scenario.name}-"))
    started, load_before = time.time(), _load()
    if load_before and load_before[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load_before[0]} on {os.cpu_count()} cores: other processes are running, "
            f"so timings will be noisy (on a shared CPU, --threads 1 is steadier)")
    parts_out = []
    try:
        for p_index, part in enumerate(scenario.parts):
            baseline = scenario.path(part.baseline)
            data = prepare_data(part, scenario, baseline, work_root / f"data-{p_index}")
            contenders = [PEFTLAB_MAIN, *BASELINE_STYLES, *(f"peftlab-{v}" for v in part.variants)]
            if only:
                unknown = set(only) - set(contenders)
                if unknown:
                    raise UserError(f"--only: unknown contender(s) {', '.join(sorted(unknown))} (known: {', '.join(contenders)})")
                contenders = [c for c in contenders if c in only]
            params = flops.non_embedding_params(model_ref(part, scenario), data["num_labels"])
            runs: dict[str, list[dict]] = {c: [] for c in contenders}
            orders = []
            for k in range(part.repeats):
                shift = (p_index + k) % len(contenders)
                order = contenders[shift:] + contenders[:shift]  # rotate: nobody always goes first
                orders.append(order)
                for position, name in enumerate(order):
                    work = work_root / f"part{p_index}-{name}-{k}"
                    log(f"[{scenario.name}/{part.name}] {name} (run {k + 1}/{part.repeats}, position {position + 1}) ...")
                    if name in BASELINE_STYLES:
                        res = run_baseline(name, part, scenario, data, baseline, work, env, part.timeout_s)
                    else:
                        variant = {} if name == PEFTLAB_MAIN else part.variants[name.split("-", 1)[1]]
                        res = run_peftlab(name, part, scenario, data, variant, work, env, part.timeout_s)
                    res.update(repeat=k, position=position, load_after=_load())
                    runs[name].append(res)
                    _append(Path(append) if append else None, {
                        "scenario": scenario.name, "part": part.name, "model": part.model, "device": device_name,
                        "torch": versions["torch"], "cuda": versions["cuda"], "chance_accuracy": data["chance_accuracy"],
                        "train_rows": data["train_rows"], "test_rows": data["test_rows"],
                        "model_flops_per_token": flops.flops_per_token(params, res.get("method", "lora")), **res})
                    if res["ok"]:
                        log(f"    {res['real_tokens_per_second']:>12,.1f} real tokens/s  {res['samples_per_second']:>9,.2f} samples/s  "
                            f"train {res['train_seconds']:.1f}s  test acc {res['test_accuracy']:.4f}  ({res['process_seconds']:.0f}s in all)")
                    else:
                        log(f"    FAILED: {res['error']}")
            summaries = {}
            for name in contenders:
                method = runs[name][0].get("method", "lora") if runs[name] else "lora"
                summaries[name] = summarise(runs[name], flops.flops_per_token(params, method), peak, cpu)
            ok = [s for s in summaries.values() if s.get("ok")]
            tokens = [s["real_tokens"] for s in ok if s["real_tokens"]]
            steps = {s["optimizer_steps"] for s in ok}
            ratios = {name: {"ratio_vs_seed": _ratio(s, summaries.get("seed")),
                             "ratio_vs_tuned": _ratio(s, summaries.get("tuned")),
                             **({"ratio_vs_fp32": _ratio(s, summaries[PEFTLAB_FP32])}
                                if PEFTLAB_FP32 in summaries and name != PEFTLAB_FP32 else {})}
                      for name, s in summaries.items() if name.startswith(PEFTLAB_MAIN)}
            chance = at_chance(summaries, data["chance_accuracy"])
            parts_out.append({
                "name": part.name, "model": part.model, "non_embedding_params": params,
                "data": {k: v for k, v in data.items() if k != "dir"},
                "settings": {k: part.settings[k] for k in ("epochs", "batch_size", "max_length", "learning_rate",
                                                           "seed", "lora", "repeats", "peftlab", "variants")},
                "orders": orders,
                "same_optimizer_steps": len(steps) <= 1,
                # every contender processes the same real tokens; their figures must agree (rounding aside)
                "real_tokens_agree": bool(tokens) and (max(tokens) - min(tokens)) <= 0.01 * max(tokens),
                "contenders": summaries,
                "ratios": ratios,
                # every contender at chance: the ratios compare runs that learnt nothing (not a result)
                "all_at_chance": chance,
                "ratio_vs_seed": ratios.get(PEFTLAB_MAIN, {}).get("ratio_vs_seed"),
                "ratio_vs_tuned": ratios.get(PEFTLAB_MAIN, {}).get("ratio_vs_tuned"),
                "ratio_vs_fp32": ratios.get(PEFTLAB_MAIN, {}).get("ratio_vs_fp32"),
            })
    finally:
        if keep_work:
            log(f"work files kept in {work_root}")
        else:
            shutil.rmtree(work_root, ignore_errors=True)

    head = parts_out[0]
    result = {
        "scenario": scenario.name, "description": scenario.description,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - started, 1),
        "device": device_name, "device_kind": scenario.device,
        "host": {"cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                 "omp_num_threads": env.get("OMP_NUM_THREADS"),
                 "load_average_before": load_before, "load_average_after": _load(),
                 "matmul_peak_flops": cpu},
        "peak_bf16_flops": peak,
        "mfu_formula": "real tokens/s x FLOPs per real token / device dense bf16 peak; FLOPs per real token = "
                       "4 x non-embedding params (frozen backbone: LoRA, QLoRA, IA3) or 6 x (full fine-tuning)",
        "versions": versions,
        "cli_overrides": overrides,
        "scenario_file": str(scenario.source),
        # the first part is the speed part: its contenders and ratios are the headline figures
        "contenders": head["contenders"],
        "ratio_vs_seed": head["ratio_vs_seed"],
        "ratio_vs_tuned": head["ratio_vs_tuned"],
        "ratio_vs_fp32": head["ratio_vs_fp32"],
        "all_at_chance": head["all_at_chance"],
        "parts": parts_out,
    }
    path = output_dir / f"{scenario.name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    result["path"] = str(path)
    return result
