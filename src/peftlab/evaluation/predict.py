"""Batched inference: sorted by length (little padding), large batches, inference mode."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from peftlab.data.batching import collate, to_device
from peftlab.data.tokenize import Encoded


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, data: Encoded, pad_id: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Logits (float32) for every example, in the original order."""
    was_training = model.training
    model.eval()
    order = np.argsort(-data.lengths, kind="stable")
    logits = np.zeros((len(data), model.config.num_labels), dtype=np.float32)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for index in tqdm(batches, desc="predict", disable=not progress, leave=False):
        batch = to_device(collate(data, index, pad_id), device)
        batch.pop("labels")
        with autocast(device, dtype):
            out = model(**batch).logits
        logits[index] = out.float().cpu().numpy()
    model.train(was_training)
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())
