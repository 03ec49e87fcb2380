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
from peftlab.models.speed import first_token_context, merged_lora
from peftlab.runtime import Runtime, autocast
from peftlab.tasks import SINGLE_LABEL, Task


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, data: Encoded, pad_id: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, batch_size: int = 64, progress: bool = False,
                   merge_lora: bool = True, adapter_names: list[str] | None = None,
                   num_labels: int | None = None) -> np.ndarray:
    """Logits (float32) for every example, in the original order.

    `adapter_names` (one per example) sends each row through its own adapter of a shared peft model in
    the same pass (peft's mixed batches); `num_labels` is the logits' width when it is not the model
    config's (heads of several widths over one model: narrower rows are padded with zeros)."""
    was_training = model.training
    model.eval()
    order = np.argsort(-data.lengths, kind="stable")
    width = num_labels or model.config.num_labels
    logits = np.zeros((len(data), width), dtype=np.float32)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    multiple = pad_multiple(device)
    outs = []
    try:
        with (merged_lora(model) if merge_lora else contextlib.nullcontext()), first_token_context(model):
            for index in tqdm(batches, desc="predict", disable=not progress, leave=False):
                batch = to_device(collate(data, index, pad_id, multiple), device)
                batch.pop("labels")
                if adapter_names is not None:
                    batch["adapter_names"] = [adapter_names[i] for i in index]
                with autocast(device, dtype):
                    out = model(**batch).logits.float()  # stays on the device: no sync per batch
                outs.append(out if out.shape[1] == width else torch.nn.functional.pad(out, (0, width - out.shape[1])))
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
    `temperature` (a run's eval.calibrate=temperature) divides the logits before the softmax (sigmoid);
    `threshold` (eval.threshold=tune or a value) picks the second class of a two-class run when its
    probability is at least that, instead of the most probable class; multi-label: one threshold per label
    (default 0.5). `task`: the run's kind (tasks/), e.g. a set of labels per text with a sigmoid per label.
    Logits stay the model's own.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, label_names: list[str], max_length: int,
                 runtime: Runtime | None = None, batch_size: int = 64, cache_dir: str | None = None,
                 adapter: str | None = None, lock: threading.Lock | None = None, merge_lora: bool = True,
                 temperature: float = 1.0, threshold: float | list[float] | None = None, task: Task = SINGLE_LABEL):
        self.model, self.tokenizer, self.label_names = model, tokenizer, list(label_names)
        self.max_length, self.batch_size, self.cache_dir = max_length, batch_size, cache_dir
        self.runtime = runtime or Runtime(next(model.parameters()).device, torch.float32)
        self.adapter, self.lock, self.merge_lora = adapter, lock or threading.Lock(), merge_lora
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.temperature, self.threshold = float(temperature), threshold
        self.task = task
        task.check_threshold(threshold, self.label_names)

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
                                  self.batch_size, progress, self.merge_lora, num_labels=len(self.label_names))

    def logits(self, texts: list[str], progress: bool = False, cache: bool = True) -> np.ndarray:
        return self.logits_of(self.encode(list(texts), cache), progress)

    def probabilities(self, texts: list[str], progress: bool = False, cache: bool = True) -> np.ndarray:
        return self.probabilities_of(self.logits(texts, progress, cache))

    def probabilities_of(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities of logits: softmax(logits / temperature); multi-label: sigmoid per label."""
        return self.task.probabilities(np.asarray(logits), self.temperature)

    def predict(self, texts: list[str], progress: bool = False, cache: bool = True) -> list[dict]:
        """One row per text, in order: {label, confidence, probabilities}; multi-label {labels, probabilities}."""
        return self.rows(self.probabilities(texts, progress, cache))

    def labels_of(self, probs: np.ndarray) -> np.ndarray:
        """The decisions: class indices (the threshold where there is one, else the most probable class);
        multi-label: 0/1 per label (probability >= the label's threshold, default 0.5)."""
        return self.task.decide(np.asarray(probs), self.threshold)

    def rows(self, probs: np.ndarray) -> list[dict]:
        """One {label, confidence (the predicted label's probability), probabilities} per row; multi-label:
        {labels (the decided set, in label order), probabilities}."""
        names = self.label_names
        return [self.task.row(p, k, names) for p, k in zip(probs, self.labels_of(probs))]


def logits_together(predictors: list[Predictor], parts: list[Encoded]) -> list[np.ndarray]:
    """Logits of parts[i] through predictors[i], all predictors being adapters of one shared model
    (serve's micro-batches): one sorted, batched pass over every row, each row through its own adapter
    and head (peft's per-example adapter_names) when several adapters are present. One array per part."""
    first = predictors[0]
    assert all(p.model is first.model and p.lock is first.lock for p in predictors), "one shared model"
    sizes = [len(part) for part in parts]
    data = Encoded.join(parts)
    mixed = len({p.adapter for p in predictors}) > 1
    names = [p.adapter for p, n in zip(predictors, sizes) for _ in range(n)] if mixed else None
    width = max(len(p.label_names) for p in predictors)
    with first.lock:
        if not mixed and first.adapter is not None:
            first.model.set_adapter(first.adapter)
        logits = predict_logits(first.model, data, first.pad_id, first.runtime.device, first.runtime.dtype,
                                first.batch_size, merge_lora=first.merge_lora and not mixed,
                                adapter_names=names, num_labels=width)
    bounds = np.cumsum([0] + sizes)
    return [logits[a:b, :len(p.label_names)] for p, a, b in zip(predictors, bounds[:-1], bounds[1:])]
