"""Where a run executes: device, precision (autocast and, for fp16, gradient scaling), seeding, RNG
state for resuming, and peak memory. One place, so training, evaluation and prediction agree."""
from __future__ import annotations

import contextlib
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


def pick_precision(choice: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, else fp32. bf16/fp16 run on CPU too (autocast), but slowly on CPUs
    without 16-bit matrix units."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if choice == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.precision=bf16: this GPU has no bf16 support; use train.precision=fp16 (with "
                        "gradient scaling) or auto")
    return DTYPES[choice]


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
    """The device and precision one run uses."""
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def pick(cls, device: str = "auto", precision: str = "auto") -> "Runtime":
        d = pick_device(device)
        return cls(d, pick_precision(precision, d))

    def autocast(self):
        return autocast(self.device, self.dtype)

    @property
    def precision(self) -> str:
        return str(self.dtype).replace("torch.", "")
