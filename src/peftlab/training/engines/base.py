"""What every step engine shares: the parts of a run it steps (StepParts), the loss window kept on the
device and read only at logging steps, and the mask path that needs no host sync."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from peftlab.data.tokenize import Encoded
from peftlab.runtime import Runtime

# model types whose forward takes a prepared 4-D mask as-is (transformers 5's create_bidirectional_mask):
# from a 2-D mask transformers builds the 4-D one each forward and calls padding_mask.all(), a GPU->host sync
FOUR_D_MASK_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "mpnet", "distilbert"}


@dataclass
class StepParts:
    """The pieces of a run a step engine works with (built by the Trainer)."""
    model: torch.nn.Module
    forward: Callable  # the model, maybe wrapped (DDP, torch.compile)
    loss: Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]  # (logits, labels, rows) -> mean loss
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    trainable: list[torch.nn.Parameter]
    runtime: Runtime
    data: Encoded  # the training split
    pad_id: int
    pad_multiple: int
    max_grad_norm: float | None
    accumulation: int
    window: int  # most micro-steps between two readings of the loss (log_every x accumulation)


def four_d_mask(model: torch.nn.Module) -> bool:
    """Whether the model can be given a [batch, 1, 1, width] boolean mask: a transformers classifier
    (not a wrapper of ours, whose head may read the 2-D mask) of a known type, with sdpa attention."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return (type(base).__module__.startswith("transformers.") and config is not None
            and getattr(config, "model_type", None) in FOUR_D_MASK_TYPES
            and getattr(config, "_attn_implementation", None) == "sdpa")


class StepEngine:
    """One optimizer step at a time: `micro_step` for every batch (with `boundary` on the batch that ends
    an optimizer step), `read` at logging steps. Losses wait on the device in a window until read."""
    name = "base"

    def __init__(self, parts: StepParts):
        self.parts = parts
        self.device = parts.runtime.device
        self.losses = torch.zeros(max(parts.window, 1), dtype=torch.float32, device=self.device)
        self.steps: list[int] = []  # the optimizer step of each loss in the window (host side: no sync)

    def micro_step(self, rows: np.ndarray, step: int, boundary: bool) -> None:
        raise NotImplementedError

    def _keep(self, loss: torch.Tensor, step: int) -> None:
        k = len(self.steps)
        if k == len(self.losses):  # a longer window than planned (e.g. an epoch's tail): grow, rarely
            self.losses = torch.cat([self.losses, torch.zeros_like(self.losses)])
        self.losses[k].copy_(loss.detach())  # one small copy on the device; no sync
        self.steps.append(step)

    def read(self) -> tuple[float, int, int]:
        """(sum of the window's losses, how many, first optimizer step whose loss was not finite or -1):
        the one host sync, at logging steps. Empties the window."""
        values = self.losses[:len(self.steps)].double().cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(values))
        first_bad = self.steps[bad[0]] if len(bad) else -1
        total, count = float(values.sum()), len(self.steps)
        self.steps = []
        return total, count, first_bad

    def batch(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError
