"""The CUDA-graph engine: the whole training step (forward, backward, gradient clipping, fused capturable
AdamW, gradient zeroing) captured once per length bucket and replayed; the host then only copies the batch
into static buffers and writes the learning rate into a device tensor.

- Buckets: a few widths up to max_length; a batch is padded to the smallest bucket that holds it.
- A batch smaller than batch_size (an epoch's last) is padded with rows whose label is the ignore index
  (-100): the cross-entropy mean skips them, so the loss is the mean over the valid rows, as in eager.
- Warm-up (forward + backward, then an AdamW step at learning rate 0 on zero gradients to create its
  state without moving a weight) on a side stream before capture; one memory pool for all buckets.
- Dropout draws from the CUDA generator, which graphs replay safely (a fresh offset every replay).
- `capture=False` runs the same body without a graph (static buffers, buckets, padding and all): that is
  how CPU tests check it computes what eager does.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from peftlab.data.batching import fill
from peftlab.training.engines.base import StepEngine, StepParts, four_d_mask

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


def buckets(max_length: int, multiple: int = 8, count: int = 4) -> list[int]:
    """`count` widths spread evenly up to max_length, each rounded up to `multiple` (capped at max_length)."""
    widths = {min(max_length, -(-(max_length * k // count) // multiple) * multiple) for k in range(1, count + 1)}
    return sorted(w for w in widths if w > 0)


def bucket_for(width: int, widths: list[int]) -> int:
    for w in widths:
        if w >= width:
            return w
    return widths[-1]


class CaptureFailed(RuntimeError):
    """Capturing a step failed (an op that syncs or cannot be captured): the run goes on in eager."""


class _Static:
    """A bucket's device buffers: ids, mask and labels in one tensor (one copy per step), the loss."""

    def __init__(self, batch: int, width: int, device: torch.device, pinned: bool):
        self.batch, self.width = batch, width
        size = 2 * batch * width + batch
        # two host buffers in turn, each written only once its previous copy has left (an event)
        self.hosts = [torch.empty(size, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self.copied = [None, None]
        self.turn = 0
        self.device_buffer = torch.empty(size, dtype=torch.int64, device=device)
        cut = batch * width
        self.ids = self.device_buffer[:cut].view(batch, width)
        self.mask = self.device_buffer[cut:2 * cut].view(batch, width)
        self.labels = self.device_buffer[2 * cut:]
        self.loss = torch.zeros((), dtype=torch.float32, device=device)

    def load(self, data, rows: np.ndarray, pad_id: int) -> None:
        self.turn ^= 1
        host, done = self.hosts[self.turn], self.copied[self.turn]
        if done is not None:
            done.synchronize()
        flat, n, b, w = host.numpy(), len(rows), self.batch, self.width
        ids, mask = flat[:b * w].reshape(b, w), flat[b * w:2 * b * w].reshape(b, w)
        fill(data, rows, pad_id, w, ids, mask)
        ids[n:], mask[n:] = pad_id, 0
        mask[n:, 0] = 1  # padding rows see one token: no fully masked attention row
        flat[2 * b * w:2 * b * w + n] = data.labels[rows]
        flat[2 * b * w + n:] = IGNORE_INDEX
        self.device_buffer.copy_(host, non_blocking=True)
        if self.device_buffer.is_cuda:
            self.copied[self.turn] = torch.cuda.Event()
            self.copied[self.turn].record()


class GraphEngine(StepEngine):
    name = "cuda_graphs"

    def __init__(self, parts: StepParts, batch_size: int, max_length: int, capture: bool = True):
        super().__init__(parts)
        self.capture = capture
        self.batch_size = batch_size
        self.widths = buckets(max_length, max(parts.pad_multiple, 8) if capture else 8)
        self.mask_4d = four_d_mask(parts.model)
        self.statics: dict[int, _Static] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.state_ready = bool(parts.optimizer.state)  # a resumed run brings its AdamW state
        self.capture_seconds = 0.0  # warm-up and capture, inside the training time (one-off per bucket)

    def width(self, rows: np.ndarray) -> int:
        return bucket_for(int(self.parts.data.lengths[rows].max()), self.widths)

    def static(self, width: int) -> _Static:
        if width not in self.statics:
            self.statics[width] = _Static(self.batch_size, width, self.device, pinned=self.capture)
        return self.statics[width]

    def autocast(self):
        """The run's autocast, without its cache of cast weights when capturing (PyTorch's advice for
        graphs: a cached cast from outside the capture must not be read inside it)."""
        dtype = self.parts.runtime.dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=not self.capture)

    def body(self, s: _Static) -> None:
        """The step: what is captured (or, with capture off, run as it is)."""
        p = self.parts
        mask = s.mask.bool()[:, None, None, :] if self.mask_4d else s.mask
        with self.autocast():
            logits = p.forward(input_ids=s.ids, attention_mask=mask).logits
            loss = p.loss(logits, s.labels, None)
        loss.backward()
        if p.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(p.trainable, p.max_grad_norm, foreach=self.capture or None)
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=False)
        s.loss.copy_(loss.detach())

    def micro_step(self, rows: np.ndarray, step: int, boundary: bool) -> None:
        s = self.static(self.width(rows))
        s.load(self.parts.data, rows, self.parts.pad_id)
        if self.capture:
            graph = self.graphs.get(s.width)
            if graph is None:
                try:
                    graph = self._capture(s)
                except Exception as e:  # noqa: BLE001 - any op that cannot be captured
                    raise CaptureFailed(f"capture failed at width {s.width}: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''}") from e
            graph.replay()
        else:
            self.body(s)
        self._keep(s.loss, step)
        self.parts.scheduler.step()  # writes the next learning rate into the optimizer's device tensors

    # --- capture ---------------------------------------------------------------------------------
    def _warm_up(self, s: _Static) -> None:
        p = self.parts
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            mask = s.mask.bool()[:, None, None, :] if self.mask_4d else s.mask
            for _ in range(2):  # kernels chosen, workspaces allocated, before capture
                with self.autocast():
                    loss = p.loss(p.forward(input_ids=s.ids, attention_mask=mask).logits, s.labels, None)
                loss.backward()
            p.optimizer.zero_grad(set_to_none=False)  # the gradient tensors stay: the graph writes into them
            if not self.state_ready:
                self._create_optimizer_state()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _create_optimizer_state(self) -> None:
        """One AdamW step at learning rate 0 on zero gradients creates its state and moves no weight
        (moments stay 0, decay multiplies by 1); the step counters are then set back to 0."""
        opt = self.parts.optimizer
        saved = [g["lr"].clone() for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"].fill_(0.0)
        opt.step()
        for g, lr in zip(opt.param_groups, saved):
            g["lr"].copy_(lr)
        for state in opt.state.values():
            if "step" in state:
                state["step"].zero_()
        self.state_ready = True

    def _capture(self, s: _Static) -> torch.cuda.CUDAGraph:
        t0 = time.perf_counter()
        self._warm_up(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.body(s)
        torch.cuda.synchronize(self.device)  # once per bucket: the time it took is recorded
        self.capture_seconds += time.perf_counter() - t0
        self.graphs[s.width] = graph
        return graph
