"""The eager engine: each step as plain PyTorch calls, with the per-step host costs removed: one vectorised
collate into one pinned buffer and one copy, a 4-D mask (no padding_mask.all() sync), no extra kernels at
accumulation 1, losses kept on the device until a logging step, gradients zeroed in place."""
from __future__ import annotations

import numpy as np
import torch

from peftlab.data.batching import collate_packed, unpack
from peftlab.training.engines.base import StepEngine, StepParts, four_d_mask


class EagerEngine(StepEngine):
    name = "eager"

    def __init__(self, parts: StepParts):
        super().__init__(parts)
        self.cuda = self.device.type == "cuda"
        # on CPU the model's own mask path costs no sync, and keeping it keeps CPU results as they were
        self.mask_4d = self.cuda and four_d_mask(parts.model)
        self.label_shape = tuple(parts.data.labels.shape[1:])

    def batch(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        p = self.parts
        packed, width = collate_packed(p.data, rows, p.pad_id, p.pad_multiple, pin=self.cuda)
        if self.cuda:
            packed = packed.to(self.device, non_blocking=True)  # pinned: overlaps the previous step's compute
        batch = unpack(packed, len(rows), width, self.label_shape)
        labels = batch.pop("labels")
        if self.mask_4d:
            batch["attention_mask"] = batch["attention_mask"].bool()[:, None, None, :]
        return batch, labels

    def micro_step(self, rows: np.ndarray, step: int, boundary: bool) -> None:
        p = self.parts
        batch, labels = self.batch(rows)
        with p.runtime.autocast():
            loss = p.loss(p.forward(**batch).logits, labels, rows)
        scaled = loss / p.accumulation if p.accumulation > 1 else loss
        (p.scaler.scale(scaled) if p.scaler is not None else scaled).backward()
        self._keep(loss, step)
        if boundary:
            self.optimizer_step()

    def optimizer_step(self) -> None:
        p = self.parts
        if p.scaler is not None:
            p.scaler.unscale_(p.optimizer)  # clip the true gradients, not the scaled ones
        if p.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(p.trainable, p.max_grad_norm)
        if p.scaler is not None:
            p.scaler.step(p.optimizer)  # skipped when fp16 gradients overflowed
            p.scaler.update()
        else:
            p.optimizer.step()
        p.scheduler.step()
        # in place: the gradient buffers are kept, not freed and allocated again every step
        p.optimizer.zero_grad(set_to_none=False)
