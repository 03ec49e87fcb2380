"""peftlab bench-serve RUN_DIR... : requests/s and p50/p99 latency of `peftlab serve` on 127.0.0.1 under a
bounded concurrent load, with mixed-adapter batching on and off (docs/serving.md)."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from peftlab.cli._checks import non_negative_float
from peftlab.errors import UserError
from peftlab.files import write_text


def add_parser(sub):
    p = sub.add_parser("bench-serve", help="measure peftlab serve: requests/s, p50/p99 latency, mixed batching on vs off",
                       description="Start `peftlab serve RUN_DIR...` on 127.0.0.1 once per mode, send a fixed number of "
                                   "requests from a fixed number of concurrent clients (adapters in turn, texts from each "
                                   "run's predictions.csv) and report requests/s, latency percentiles and batch sizes.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="completed runs to serve (e.g. 4 LoRA runs on one base)")
    p.add_argument("--requests", type=int, default=400, help="requests per mode, after the warm-up (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="clients sending at once (default: %(default)s)")
    p.add_argument("--texts-per-request", type=int, default=1, help="texts in each request (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="requests sent first and not counted (default: %(default)s)")
    p.add_argument("--batch-window-ms", type=non_negative_float, default=5.0, help="passed to serve (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=64, help="passed to serve (default: %(default)s)")
    p.add_argument("--modes", default="mixed,per-adapter",
                   help="comma-separated: mixed (--mixed-batching), per-adapter (--no-mixed-batching) (default: %(default)s)")
    p.add_argument("--output", default=None, help="also write the figures as JSON to this file (default: none)")
    return p


MODES = {"mixed": "--mixed-batching", "per-adapter": "--no-mixed-batching"}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def _texts(run_dirs: list[str]) -> dict[str, list[str]]:
    """Served name -> texts to send (the run's own test texts)."""
    import pandas as pd

    from peftlab.runs.rundir import RunDir  # (torch: imported when the command runs)

    out = {}
    for path in run_dirs:
        file = RunDir(path).predictions_file
        if not file.exists():
            raise UserError(f"{file}: missing; bench-serve sends each run its own test texts: pass completed runs")
        out[Path(path).resolve().name] = pd.read_csv(file)["text"].astype(str).tolist()
    return out


def start_server(run_dirs: list[str], flags: list[str], log) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", *run_dirs, "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()  # "serving N run(s) on http://127.0.0.1:PORT ..." once the runs are loaded
    found = re.search(r"http://\S+:(\d+)", line)
    if not found:
        proc.kill()
        log.seek(0)
        raise UserError(f"peftlab serve did not start: {(log.read().strip().splitlines() or [''])[-1]}")
    return proc, f"http://127.0.0.1:{found.group(1)}"


async def _load(url: str, texts: dict[str, list[str]], n: int, concurrency: int, per_request: int,
                start_at: int = 0) -> tuple[float, list[float]]:
    """Send n requests from `concurrency` clients; adapters in turn. (wall seconds, latencies)."""
    import asyncio

    import httpx

    names = list(texts)
    latencies, counter = [], iter(range(start_at, start_at + n))

    async def client(http):
        for i in counter:
            name = names[i % len(names)]
            pool = texts[name]
            batch = [pool[(i * per_request + j) % len(pool)] for j in range(per_request)]
            start = time.perf_counter()
            reply = await http.post(f"{url}/predict", json={"adapter": name, "texts": batch})
            latencies.append(time.perf_counter() - start)
            if reply.status_code != 200:
                raise UserError(f"{name}: HTTP {reply.status_code}: {reply.text[:200]}")

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def _batch_stats(url: str) -> dict[str, float]:
    """Forward passes so far, and the texts and adapters they held (from the server's /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
              for s in f.samples}
    return {"passes": values.get("peftlab_batch_texts_count", 0.0), "texts": values.get("peftlab_batch_texts_sum", 0.0),
            "adapters": values.get("peftlab_batch_adapters_sum", 0.0)}


def measure(run_dirs: list[str], mode: str, args, texts: dict[str, list[str]]) -> dict:
    import asyncio
    import tempfile

    import httpx
    import numpy as np

    longest = max(len(t) for pool in texts.values() for t in pool)  # the runs' own texts must all be accepted
    flags = [MODES[mode], "--batch-window-ms", str(args.batch_window_ms), "--max-batch", str(args.max_batch),
             "--max-texts", str(args.texts_per_request), "--max-chars", str(max(longest, 1)),
             "--max-body-bytes", str(max(1 << 20, 8 * longest * args.texts_per_request + 4096))]
    with tempfile.TemporaryFile("w+") as log:
        proc, url = start_server(run_dirs, flags, log)
        try:
            deadline = time.time() + 60
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    if time.time() > deadline:
                        raise UserError(f"peftlab serve at {url} did not answer /health within 60 s") from None
                    time.sleep(0.1)
            asyncio.run(_load(url, texts, args.warmup, args.concurrency, args.texts_per_request))
            before = _batch_stats(url)
            wall, latencies = asyncio.run(_load(url, texts, args.requests, args.concurrency, args.texts_per_request,
                                                start_at=args.warmup))
            after = _batch_stats(url)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    passes = after["passes"] - before["passes"]
    ms = np.asarray(latencies) * 1000
    return {"mode": mode, "requests": args.requests, "seconds": round(wall, 3),
            "requests_per_second": round(args.requests / wall, 2),
            "texts_per_second": round(args.requests * args.texts_per_request / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "forward_passes": int(passes),
            "texts_per_pass": round((after["texts"] - before["texts"]) / passes, 2) if passes else 0.0,
            "adapters_per_pass": round((after["adapters"] - before["adapters"]) / passes, 2) if passes else 0.0}


def run(args) -> int:
    for name in ("requests", "concurrency", "texts_per_request", "max_batch"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UserError(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    texts = _texts(args.run_dirs)
    command = " ".join(["peftlab", *sys.argv[1:]])
    print(f"machine: {machine()}\n{len(texts)} runs, {args.requests} requests from {args.concurrency} concurrent clients, "
          f"{args.texts_per_request} text(s) each, batch window {args.batch_window_ms} ms, max batch {args.max_batch}",
          flush=True)
    results = []
    for mode in modes:
        results.append(measure(args.run_dirs, mode, args, texts))
        r = results[-1]
        print(f"{mode:>12}: {r['requests_per_second']:8.1f} requests/s   p50 {r['p50_ms']:7.1f} ms   "
              f"p99 {r['p99_ms']:7.1f} ms   {r['texts_per_pass']:.1f} texts and {r['adapters_per_pass']:.1f} "
              f"adapters per forward pass", flush=True)
    if args.output:
        write_text(args.output, json.dumps({"machine": machine(), "command": command, "settings": {
            k: getattr(args, k) for k in ("requests", "concurrency", "texts_per_request", "warmup",
                                          "batch_window_ms", "max_batch")}, "results": results}, indent=2) + "\n")
    return 0
