"""Where a run executes: device, precision (autocast and, for fp16, gradient scaling), seeding, RNG
state for resuming, and peak memory. One place, so training, evaluation and prediction agree."""
from __future__ import annotations

import contextlib
import os
import random
import resource
from dataclasses import dataclass

import numpy as np
import torch

from peftlab.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available: use train.device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


CPU_BF16_ENV = "PEFTLAB_CPU_BF16"  # 0: act as if this CPU had no bf16 units; 1: as if it had; unset: ask torch


def cpu_bf16() -> tuple[bool, str]:
    """(whether this CPU multiplies bf16 matrices in hardware, why): AVX512-BF16 or AMX, as torch reports
    them. Without such units bf16 is emulated, and far slower than fp32. $PEFTLAB_CPU_BF16 overrides it."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise UserError(f"${CPU_BF16_ENV}={forced!r}: use 1 (this CPU has bf16 units), 0 (it has none) or "
                            f"leave it unset (ask torch)")
        return forced == "1", f"${CPU_BF16_ENV}={forced}"
    cpu = torch.cpu
    units = [name for name, check in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
             if getattr(cpu, check, lambda: False)()]
    if units:
        return True, f"the CPU has {' and '.join(units)}"
    return False, f"the CPU has no bf16 units (no AVX512-BF16 or AMX; torch: {torch.backends.cpu.get_cpu_capability()})"


def auto_precision(device: torch.device) -> tuple[torch.dtype, str]:
    """What precision=auto picks on `device`, and why: bf16 where the device multiplies bf16 in hardware
    (a bf16 GPU; a CPU with AVX512-BF16 or AMX), else fp32."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bf16, the GPU supports it"
        return torch.float32, "auto: fp32, the GPU has no bf16 support"
    if device.type == "cpu":
        native, why = cpu_bf16()
        return (torch.bfloat16, f"auto: bf16, {why}") if native else (torch.float32, f"auto: fp32, {why}")
    return torch.float32, f"auto: fp32 on {device.type}"


def pick_precision(choice: str, device: torch.device) -> torch.dtype:
    """auto: auto_precision's choice. bf16/fp16 run on any CPU (autocast), but slowly without 16-bit units."""
    if choice == "auto":
        return auto_precision(device)[0]
    if choice == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.precision=bf16: this GPU has no bf16 support; use train.precision=fp16 (with "
                        "gradient scaling) or auto")
    return DTYPES[choice]


def precision_reason(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why a run computes in `dtype` (metrics.json efficiency.precision_reason)."""
    if choice == "auto":
        return auto_precision(device)[1]
    slow = emulated_bf16(device, dtype)
    return f"precision={choice} as set" + (f" (slow here: {slow})" if slow else "")


def emulated_bf16(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why bf16 is emulated here (a CPU without bf16 units: far slower than fp32), or None."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return None
    native, why = cpu_bf16()
    return None if native else why


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state() -> dict:
    """Every random generator a run draws from, for an exact resume."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): the GPU's peak allocation, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "gpu_max_allocated"
    try:  # VmHWM: the peak RSS, which a sweep resets between the runs it trains in one process
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), "cpu_peak_rss"
    except (OSError, StopIteration, ValueError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def reset_peak_rss() -> None:
    """Start a fresh CPU peak-memory reading for the next run in this process (Linux: VmHWM): first
    hand the previous run's freed memory back to the system, so that it does not count again."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@dataclass(frozen=True)
class Runtime:
    """The device and precision one run (or one predictor) uses, and why that precision."""
    device: torch.device
    dtype: torch.dtype
    reason: str = ""

    @classmethod
    def pick(cls, device: str | torch.device = "auto", precision: str = "auto") -> "Runtime":
        d = device if isinstance(device, torch.device) else pick_device(device)
        dtype = pick_precision(precision, d)
        return cls(d, dtype, precision_reason(precision, d, dtype))

    def autocast(self):
        return autocast(self.device, self.dtype)

    @property
    def precision(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def setting(self) -> str:
        """The precision as a setting names it: fp32, bf16, fp16."""
        return next(k for k, v in DTYPES.items() if v == self.dtype)
