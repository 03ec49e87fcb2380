"""One training run, start to finish: data -> model -> train (with validation each epoch) -> test ->
run directory. A plain PyTorch loop rather than the Trainer: it is where the speed comes from
(length-grouped dynamic padding, no host sync per step, bf16 autocast, fused AdamW)."""
from __future__ import annotations

import math
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from peftlab.config import Config, save_config
from peftlab.data import load_data
from peftlab.data.batching import batch_order, collate, pad_multiple, to_device
from peftlab.data.tokenize import encode
from peftlab.evaluation.metrics import classification_metrics
from peftlab.evaluation.predict import autocast, cross_entropy, first_token_only, predict_logits, softmax
from peftlab.models.build import build_model, count_parameters
from peftlab.models.loading import load_tokenizer, pick_device, pick_precision
from peftlab.runs.rundir import RunDir
from peftlab.training.distill import distill_loss, teacher_logits


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # biases and LayerNorm weights are not decayed (as in BERT's recipe)
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "gpu_max_allocated"
    try:  # VmHWM: the peak RSS, which a sweep resets between the runs it trains in one process
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), "cpu_peak_rss"
    except (OSError, StopIteration, ValueError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def _scores(logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    return {**classification_metrics(labels, softmax(logits), label_names), "loss": cross_entropy(logits, labels)}


def _write_predictions(path: Path, texts: list[str], labels: np.ndarray, probs: np.ndarray, names: list[str]) -> None:
    import pandas as pd

    predicted = probs.argmax(1)
    frame = pd.DataFrame({"text": texts, "label": [names[i] for i in labels],
                          "predicted": [names[i] for i in predicted], "confidence": probs.max(1)})
    for j, name in enumerate(names):
        frame[f"prob_{name}"] = probs[:, j]
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def train(cfg: Config, run: RunDir, resume: bool = False, progress: bool = True, on_epoch=None) -> dict:
    """Train, evaluate and record one run in `run`. `on_epoch(epoch, validation_metric)` lets a sweep
    prune (it may raise to stop). Returns metrics.json's content."""
    started = time.time()
    device = pick_device(cfg.train.device)
    dtype = pick_precision(cfg.train.precision, device)
    seed_everything(cfg.train.seed)
    if not resume:
        save_config(cfg, run.config_file)

    # --- data ---------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.tokenizer)  # first: a wrong model name fails fast
    data = load_data(cfg.data, cfg.train.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = {s: encode(tokenizer, getattr(data, s).texts, getattr(data, s).labels, cfg.data.max_length, cfg.data.cache_dir)
           for s in ("train", "validation", "test")}
    train_set = enc["train"]

    # --- model --------------------------------------------------------------------------------
    built = build_model(cfg, data.label_names, device)
    model = built.model
    params = count_parameters(model)
    first_token_only(model)  # last layer only where the head reads it: same loss and gradients, less work
    forward = torch.compile(model) if cfg.train.compile else model
    multiple = pad_multiple(device, cfg.train.compile, cfg.data.max_length)

    state = run.load_checkpoint("last") if resume else None
    if state is None and resume:
        run.history_file.unlink(missing_ok=True)  # killed before the first epoch ended
    eval_bs = cfg.eval.batch_size
    if state is not None:
        baseline = state["baseline"]
    elif cfg.eval.baseline:
        base_logits = predict_logits(model, enc["test"], pad_id, device, dtype, eval_bs)
        scores = _scores(base_logits, enc["test"].labels, data.label_names)
        baseline = {"test": {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}}
    else:
        baseline = None

    teacher = None
    if cfg.distill.teacher:
        cached = run.checkpoints / "teacher_logits.npy"
        if cached.exists():
            teacher_np = np.load(cached)
        else:
            teacher_np = teacher_logits(cfg.distill, data.train.texts, data.label_names, device, cfg.data.cache_dir, eval_bs)
            run.checkpoints.mkdir(exist_ok=True)
            np.save(cached, teacher_np)
        teacher = torch.from_numpy(teacher_np)

    # --- schedule -----------------------------------------------------------------------------
    tc = cfg.train
    lr = tc.learning_rate or built.method.default_learning_rate
    accum = tc.gradient_accumulation_steps
    batches_per_epoch = math.ceil(len(train_set) / tc.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = make_optimizer(model, lr, tc.weight_decay, device)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total_steps), total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]

    step, start_epoch, best, best_epoch, stale = 0, 0, -math.inf, 0, 0
    train_seconds, samples_seen, tokens_seen = 0.0, 0, 0
    if state is not None:
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, start_epoch = state["step"], state["epoch"] + 1
        best, best_epoch, stale = state["best"], state["best_epoch"], state["stale"]
        train_seconds, samples_seen, tokens_seen = state["train_seconds"], state["samples"], state["tokens"]
        torch.set_rng_state(state["torch_rng"])
        run.truncate_history(step)
        print(f"resuming {run.path} after epoch {state['epoch'] + 1} (step {step})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # --- train --------------------------------------------------------------------------------
    metric_name = cfg.eval.metric
    validation = None
    model.train()
    for epoch in range(start_epoch, n_epochs):
        batches = batch_order(train_set.lengths, tc.batch_size, tc.seed, epoch, tc.sampler)
        remaining = (total_steps - step) * accum
        batches = batches[:remaining]
        bar = tqdm(total=math.ceil(len(batches) / accum), desc=f"epoch {epoch + 1}/{n_epochs}",
                   disable=not progress, leave=False)
        loss_sum = torch.zeros((), device=device)  # summed on device; read only at logging steps
        loss_count, epoch_loss_sum, epoch_loss_count = 0, 0.0, 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i, index in enumerate(batches):
            batch = to_device(collate(train_set, index, pad_id, multiple), device)
            labels = batch.pop("labels")
            with autocast(device, dtype):
                logits = forward(**batch).logits
            if teacher is not None:
                loss = distill_loss(logits, labels, teacher[index].to(device), cfg.distill.alpha, cfg.distill.temperature)
            else:
                loss = F.cross_entropy(logits.float(), labels)
            (loss / accum).backward()
            loss_sum += loss.detach()
            loss_count += 1
            samples_seen += len(index)
            tokens_seen += int(train_set.lengths[index].sum())
            if (i + 1) % accum and i + 1 < len(batches):
                continue
            if tc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or i + 1 == len(batches):
                mean_loss = loss_sum.item() / loss_count  # the one host sync, every log_every steps
                epoch_loss_sum += mean_loss * loss_count
                epoch_loss_count += loss_count
                loss_sum.zero_()
                loss_count = 0
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                run.append_history({"kind": "step", "step": step, "epoch": round(epoch + (i + 1) / len(batches), 4),
                                    "loss": mean_loss, "lr": scheduler.get_last_lr()[0]})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        bar.close()

        val_logits = predict_logits(model, enc["validation"], pad_id, device, dtype, eval_bs)
        validation = _scores(val_logits, enc["validation"].labels, data.label_names)
        current = validation[metric_name]
        improved = current > best
        if improved:
            best, best_epoch, stale = current, epoch + 1, 0
            run.save_checkpoint("best", {"trainable": trainable_state(model), "epoch": epoch + 1,
                                         "validation": {k: validation[k] for k in ("accuracy", "macro_f1", "loss")}})
        else:
            stale += 1
        train_loss = epoch_loss_sum / max(epoch_loss_count, 1)
        run.append_history({"kind": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss,
                            "validation": {k: validation[k] for k in ("accuracy", "macro_f1", "loss")},
                            "seconds": epoch_seconds})
        print(f"epoch {epoch + 1}/{n_epochs}  train loss {train_loss:.4f}  val loss {validation['loss']:.4f}  "
              f"val acc {validation['accuracy']:.4f}  val macro-F1 {validation['macro_f1']:.4f}  "
              f"{epoch_seconds:.1f}s{'  *best' if improved else ''}", flush=True)
        if tc.checkpoint_every_epoch:
            run.save_checkpoint("last", {
                "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "best": best,
                "best_epoch": best_epoch, "stale": stale, "train_seconds": train_seconds,
                "samples": samples_seen, "tokens": tokens_seen, "baseline": baseline,
                "torch_rng": torch.get_rng_state()})
        if on_epoch is not None:
            on_epoch(epoch + 1, current)
        if tc.early_stopping_patience and stale >= tc.early_stopping_patience:
            print(f"early stopping: no better validation {metric_name} for {stale} epochs")
            break

    # --- final evaluation with the best epoch's weights ---------------------------------------
    best_state = run.load_checkpoint("best")
    model.load_state_dict(best_state["trainable"], strict=False)
    validation = best_state["validation"]  # measured on these weights when they were saved
    test_logits = predict_logits(model, enc["test"], pad_id, device, dtype, eval_bs)
    test_probs = softmax(test_logits)
    test = classification_metrics(enc["test"].labels, test_probs, data.label_names)
    _write_predictions(run.predictions_file, data.test.texts, enc["test"].labels, test_probs, data.label_names)

    weights = run.weights_dir(built.method.saves_adapter)
    model.save_pretrained(weights)
    tokenizer.save_pretrained(weights)
    adapter_bytes = sum(f.stat().st_size for f in weights.iterdir() if f.suffix in (".safetensors", ".bin"))
    memory, memory_kind = peak_memory(device)

    metrics = {
        "status": "completed",
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": data.name,
        "run_dir": str(run.path),
        "config": cfg.model_dump(mode="json"),
        "label_names": data.label_names,
        "split_sizes": {s: len(enc[s]) for s in enc},
        "split_sources": data.split_sources,
        "params": {**params, "adapter_bytes": adapter_bytes},
        "best_epoch": best_epoch,
        "validation": {"accuracy": validation["accuracy"], "macro_f1": validation["macro_f1"], "loss": validation["loss"]},
        "test": test,
        "baseline": baseline,
        "efficiency": {
            "train_seconds": round(train_seconds, 3),
            "train_samples_per_second": round(samples_seen / max(train_seconds, 1e-9), 2),
            "train_tokens_per_second": round(tokens_seen / max(train_seconds, 1e-9), 1),
            "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": str(dtype).replace("torch.", ""), "optimizer_steps": step,
            "wall_seconds": round(time.time() - started, 3),
        },
        "quantization": built.quantization,
        "distill": {"teacher": cfg.distill.teacher, "alpha": cfg.distill.alpha,
                    "temperature": cfg.distill.temperature} if cfg.distill.teacher else None,
    }
    if cfg.output.plots:
        from peftlab.runs.plots import write_plots

        run.write_metrics({**metrics, "status": "finishing"})  # plots read it; not yet "completed"
        write_plots(run.path)
    run.write_metrics(metrics)
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    return metrics
