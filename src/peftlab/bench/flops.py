"""Model FLOPs per real token and model FLOPs utilisation (MFU).

A dense matmul with a weight of N parameters costs 2N FLOPs per token forward. Training then costs,
per real (non-padding) token, with N = the model's non-embedding parameters:

    full fine-tuning        6 N   (2 forward + 2 gradient w.r.t. activations + 2 w.r.t. weights)
    frozen backbone (LoRA,  4 N   (2 forward + 2 w.r.t. activations; weight gradients only for the
      QLoRA, IA3)                  adapters, which are <1% of N and left out)

Attention's own score/value products (4 * layers * width * sequence length per token) are left out,
as in the usual "6N" convention, so MFU is slightly understated, never inflated. Only real tokens
count: padding is work, but not useful work. MFU = tokens/s * FLOPs per token / the device's dense
bf16 peak. On a CPU the peaks are measured (one matmul of MiniLM's feed-forward shape, in fp32 and in
bf16) and each contender's share of both is reported.
"""
from __future__ import annotations

import time

import torch

# dense (not sparse) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets; first match wins
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),       # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
]


def peak_bf16_flops(device_name: str) -> float | None:
    """FLOP/s for a CUDA device name, or None when unknown (CPUs included)."""
    upper = device_name.upper()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in upper:
            return tflops * 1e12
    return None


def non_embedding_params(model_name: str, num_labels: int = 2) -> int:
    """Parameters of the classifier outside its embedding tables, counted on the meta device (no
    weights are loaded or allocated)."""
    from transformers import AutoModelForSequenceClassification

    from peftlab.models.loading import model_config

    config = model_config(model_name, [str(i) for i in range(num_labels)])
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    # the embedding tables (a decoder's embed_tokens too), and the rest of BERT's embeddings block
    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n and id(p) not in tables)


def flops_per_token(params: int, method: str) -> float:
    from peftlab.models.methods import registry

    return registry.get(method).flops_per_token(params)


def mfu(tokens_per_second: float | None, flops_token: float, peak: float | None) -> float | None:
    if not tokens_per_second or not peak:
        return None
    return tokens_per_second * flops_token / peak


# the matmul of the CPU peaks: 4,096 tokens through a 384 -> 1536 linear layer (MiniLM's feed-forward)
PEAK_SHAPE = (4096, 384, 1536)


def cpu_matmul_peak(dtype: torch.dtype, threads: int | None = None, budget_s: float = 0.5) -> tuple[float, int]:
    """(FLOP/s, rows) of a PEAK_SHAPE matmul in `dtype` on this CPU with `threads` threads (default: torch's),
    the best of as many repeats as fit in about `budget_s` (at least two): the ceiling a contender's share
    is read against. Where one call would take longer than budget_s / 2 (bf16 emulated on a CPU without
    bf16 units: seconds), fewer rows are timed."""
    m, k, n = PEAK_SHAPE
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        # as a layer computes it: x @ W.T with W stored [out, in] (an emulated bf16 mm of another layout is slower)
        x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        t0 = time.perf_counter()
        torch.nn.functional.linear(x[:256], w)  # warm up (allocations, kernel choice) on a slice
        first = time.perf_counter() - t0
        rows = max(256, min(m, int(m * budget_s / 2 / (first * m / 256)) // 256 * 256))
        best, spent, runs = float("inf"), 0.0, 0
        while runs < 2 or spent < budget_s:
            t0 = time.perf_counter()
            torch.nn.functional.linear(x[:rows], w)
            seconds = time.perf_counter() - t0
            best, spent, runs = min(best, seconds), spent + seconds, runs + 1
    finally:
        torch.set_num_threads(before)
    return 2 * rows * k * n / best, rows


def cpu_peaks(threads: int | None = None) -> dict:
    """The CPU's fp32 and bf16 matmul peaks (FLOP/s, and the rows timed), whether it has bf16 units, and
    the threads used."""
    from peftlab.runtime import cpu_bf16

    native, why = cpu_bf16()
    (fp32, fp32_rows), (bf16, bf16_rows) = (cpu_matmul_peak(d, threads) for d in (torch.float32, torch.bfloat16))
    return {"fp32": fp32, "bf16": bf16, "threads": threads or torch.get_num_threads(),
            "shape": {"fp32": [fp32_rows, *PEAK_SHAPE[1:]], "bf16": [bf16_rows, *PEAK_SHAPE[1:]]},
            "bf16_units": native, "bf16_reason": why}


def share(tokens_per_second: float | None, flops_token: float | None, peak: float | None) -> float | None:
    """The share of a peak a contender's useful work (real tokens x model FLOPs per token) reaches."""
    return mfu(tokens_per_second, flops_token, peak) if flops_token else None
