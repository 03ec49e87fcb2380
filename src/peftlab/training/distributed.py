"""Training in several processes (torchrun, `accelerate launch`, or `peftlab train --nproc N`), through
accelerate's PartialState, which sets up the process group from the launcher's environment (gloo on
CPU, NCCL on GPUs). The training loop is the same as in one process:

- every rank draws the same global batches (same seed) and takes its own share of each one
  (`shard`), so the global batch is train.batch_size and no example is seen twice in an epoch;
- DistributedDataParallel averages the gradients, which equals one process's gradient of the mean
  loss whenever the shares are equal in size;
- evaluation splits the examples across ranks and gathers the logits exactly once each;
- rank 0 alone writes the run directory (the other ranks hold a read-only view of it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


def launched() -> bool:
    """Whether this process was started by a distributed launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # the rank's own device, when the launcher decides it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, index: np.ndarray) -> np.ndarray:
        return index[self.rank::self.world_size] if self.active else index

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.active:
            return model
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """The values summed over the ranks (one collective call)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather_rows(self, local: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
        """Every rank's rows (`local[i]` belongs at `index[i]`) assembled in order, on every rank."""
        if not self.active:
            return local
        parts = [None] * self.world_size
        torch.distributed.all_gather_object(parts, (index, local))
        out = np.zeros((n, *local.shape[1:]), dtype=local.dtype)
        for idx, rows in parts:
            out[idx] = rows
        return out


def setup() -> Distributed:
    """This process's place among the launched ones (a single process: rank 0 of 1)."""
    if not launched():
        return Distributed()
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()  # accelerate only forms a CPU (gloo) group when told it is one
    state = PartialState(cpu=cpu)
    return Distributed(state.process_index, state.num_processes, None if cpu else torch.device(state.device))


def start_run(run_dir, cfg, resume: bool):
    """RunDir.start on rank 0 (create or reopen, lock, save the config); the other ranks wait for it and
    read the saved config. Returns (config, whether to resume)."""
    dist = setup()
    if dist.main:
        cfg, resume = run_dir.start(cfg, resume)
    dist.barrier()
    if not dist.main:
        cfg = run_dir.config()
    return cfg, resume


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """`peftlab <argv>` in `nproc` local processes under torchrun (its --standalone rendezvous)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "peftlab", *argv]
