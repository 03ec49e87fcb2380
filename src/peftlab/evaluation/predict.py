"""The one inference path, for evaluation during training, `peftlab predict`, `peftlab serve`,
distillation teachers and the Python API: tokenize, sort by length (little padding), large batches,
inference mode, LoRA merged into the weights, the last layer only where the head reads it."""
from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
from tqdm.auto import tqdm

from peftlab.data.batching import collate, pad_multiple, to_device
from peftlab.data.tokenize import Encoded, encode, tokenize_texts
from peftlab.evaluation.metrics import softmax
from peftlab.models.speed import first_token_context, merged_lora
from peftlab.runtime import Runtime, autocast


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, data: Encoded, pad_id: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, batch_size: int = 64, progress: bool = False,
                   merge_lora: bool = True) -> np.ndarray:
    """Logits (float32) for every example, in the original order."""
    was_training = model.training
    model.eval()
    order = np.argsort(-data.lengths, kind="stable")
    logits = np.zeros((len(data), model.config.num_labels), dtype=np.float32)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    multiple = pad_multiple(device)
    outs = []
    try:
        with (merged_lora(model) if merge_lora else contextlib.nullcontext()), first_token_context(model):
            for index in tqdm(batches, desc="predict", disable=not progress, leave=False):
                batch = to_device(collate(data, index, pad_id, multiple), device)
                batch.pop("labels")
                with autocast(device, dtype):
                    outs.append(model(**batch).logits.float())  # stays on the device: no sync per batch
    finally:
        model.train(was_training)
    if outs:
        logits[order] = torch.cat(outs).cpu().numpy()
    return logits


class Predictor:
    """A classifier ready for texts: `probabilities(texts)`, `predict(texts)`.

    `adapter` names one of several adapters on a shared model (serve); `lock` serialises the
    activation of that adapter and the forward pass, since the active adapter is model state.
    `merge_lora` folds LoRA into the weights per call: worth it for large inputs, not for one request.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, label_names: list[str], max_length: int,
                 runtime: Runtime | None = None, batch_size: int = 64, cache_dir: str | None = None,
                 adapter: str | None = None, lock: threading.Lock | None = None, merge_lora: bool = True):
        self.model, self.tokenizer, self.label_names = model, tokenizer, list(label_names)
        self.max_length, self.batch_size, self.cache_dir = max_length, batch_size, cache_dir
        self.runtime = runtime or Runtime(next(model.parameters()).device, torch.float32)
        self.adapter, self.lock, self.merge_lora = adapter, lock or threading.Lock(), merge_lora
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, texts: list[str], cache: bool = True) -> Encoded:
        labels = np.zeros(len(texts), np.int64)
        if cache:  # the disk cache pays for repeated inputs (evaluation sets, teacher texts)
            return encode(self.tokenizer, texts, labels, self.max_length, self.cache_dir)
        return tokenize_texts(self.tokenizer, texts, labels, self.max_length)

    def logits_of(self, data: Encoded, progress: bool = False) -> np.ndarray:
        with self.lock:
            if self.adapter is not None:
                self.model.set_adapter(self.adapter)
            return predict_logits(self.model, data, self.pad_id, self.runtime.device, self.runtime.dtype,
                                  self.batch_size, progress, self.merge_lora)

    def logits(self, texts: list[str], progress: bool = False, cache: bool = True) -> np.ndarray:
        return self.logits_of(self.encode(list(texts), cache), progress)

    def probabilities(self, texts: list[str], progress: bool = False, cache: bool = True) -> np.ndarray:
        return softmax(self.logits(texts, progress, cache))

    def predict(self, texts: list[str], progress: bool = False, cache: bool = True) -> list[dict]:
        """One {label, confidence, probabilities} per text, in order."""
        return self.rows(self.probabilities(texts, progress, cache))

    def rows(self, probs: np.ndarray) -> list[dict]:
        names = self.label_names
        return [{"label": names[int(p.argmax())], "confidence": float(p.max()),
                 "probabilities": {n: float(v) for n, v in zip(names, p)}} for p in probs]
