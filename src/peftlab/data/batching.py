"""Batches: which examples go together, and padding only to the longest one in each batch.

Length grouping cuts padding without biasing training: examples are shuffled, then sorted by length
only inside windows of `window` batches, and the resulting batches are shuffled again, so every batch
is still a random draw of labels (transformers 5.x's group_by_length trained to chance here; a test
checks ours trains like random batches).
"""
from __future__ import annotations

import numpy as np
import torch

from peftlab.data.tokenize import Encoded


def batch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                strategy: str = "length_grouped", window: int = 50) -> list[np.ndarray]:
    """Index arrays, one per batch, for one epoch; deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if strategy == "length_grouped":
        span = batch_size * window
        chunks = [order[i:i + span] for i in range(0, len(order), span)]
        # stable sort on the shuffled order: ties stay random
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    elif strategy != "random":
        raise ValueError(f"unknown batching strategy {strategy!r}")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if strategy == "length_grouped":
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pad_multiple(device: torch.device, compiled: bool = False, max_length: int = 128) -> int:
    """How far to round a batch's width up. On CPU not at all: every padded column costs its full share
    of compute. On GPU to a multiple of 8 (tensor-core tiles). With torch.compile on GPU to a quarter
    of max_length (a multiple of 8): at most 4 widths, so few recompilations and reusable graphs."""
    if device.type != "cuda":
        return 1
    if compiled:
        return max(8, -(-max_length // 32) * 8)
    return 8


def fill(data: Encoded, index: np.ndarray, pad_id: int, width: int, ids: np.ndarray, mask: np.ndarray) -> None:
    """Write the examples in index, padded to `width`, into the first rows of ids and mask (vectorised:
    one gather, no Python loop over rows)."""
    lengths = data.lengths[index]
    cols = np.arange(width)
    valid = cols[None, :] < lengths[:, None]
    positions = np.minimum(data.offsets[index][:, None] + cols[None, :], max(len(data.ids) - 1, 0))
    n = len(index)
    ids[:n, :width] = np.where(valid, data.ids[positions] if len(data.ids) else pad_id, pad_id)
    mask[:n, :width] = valid


def width_of(data: Encoded, index: np.ndarray, pad_to_multiple: int = 8) -> int:
    return int(-(-data.lengths[index].max() // pad_to_multiple) * pad_to_multiple)


def collate(data: Encoded, index: np.ndarray, pad_id: int, pad_to_multiple: int = 8,
            pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels for the examples in index, padded to the batch's longest
    (rounded up to a multiple, which keeps the number of distinct shapes small) or to pad_to."""
    width = pad_to or width_of(data, index, pad_to_multiple)
    ids = np.empty((len(index), width), dtype=np.int64)
    mask = np.empty((len(index), width), dtype=np.int64)
    fill(data, index, pad_id, width, ids, mask)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(data.labels[index])}


def collate_packed(data: Encoded, index: np.ndarray, pad_id: int, pad_to_multiple: int = 8,
                   pin: bool = False) -> tuple[torch.Tensor, int]:
    """ids, mask and labels of a batch in ONE int64 host tensor (rows: ids, then mask, then labels; pinned
    when `pin`, for a GPU), so that a batch costs one pinned allocation and one host-to-device copy. Returns
    (packed, width); unpack with `unpack` on the device."""
    width = width_of(data, index, pad_to_multiple)
    n, label_shape = len(index), data.labels.shape[1:]
    label_cols = int(np.prod(label_shape)) if label_shape else 1
    packed = torch.empty(2 * n * width + n * label_cols, dtype=torch.int64, pin_memory=pin)
    flat = packed.numpy()
    ids, mask = flat[:n * width].reshape(n, width), flat[n * width:2 * n * width].reshape(n, width)
    fill(data, index, pad_id, width, ids, mask)
    flat[2 * n * width:] = data.labels[index].reshape(-1)
    return packed, width


def unpack(packed: torch.Tensor, n: int, width: int, label_shape: tuple = ()) -> dict[str, torch.Tensor]:
    """The views of a `collate_packed` tensor (no copies)."""
    cut = n * width
    return {"input_ids": packed[:cut].view(n, width), "attention_mask": packed[cut:2 * cut].view(n, width),
            "labels": packed[2 * cut:].view(n, *label_shape)}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        # pinned host memory lets the copy run asynchronously with the previous step's compute
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch
