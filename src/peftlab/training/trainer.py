"""One training run, start to finish, as a recipe in torchtune's style: `setup` (data, model, optimizer,
state), `train_epoch`, `evaluate`, `save_checkpoint`, `finish` (test, weights, record), and `fit`
which strings them together. A plain PyTorch loop rather than transformers' Trainer: it is where the
speed comes from (length-grouped dynamic padding, no host sync per step, autocast, fused AdamW).

Callbacks see the run without changing it: `on_step(trainer, row)` at every loss reading (every
`train.log_every` steps) and `on_epoch_end(trainer, epoch, scores)` after each validation; the
latter may return a reason to stop, and the run then ends with status "pruned" (sweeps prune so).
`on_finish(trainer, record)` comes last, once metrics.json is written (completed or pruned).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from peftlab import runtime as rt
from peftlab.config import Config, save_config
from peftlab.data import load_data
from peftlab.data.sources import read_texts
from peftlab.data.batching import batch_order, pad_multiple
from peftlab.data.splits import capped_batch_size, check_not_empty, selection_plan
from peftlab.data.tokenize import Encoded, encode
from peftlab.errors import UserError, out_of_memory
from peftlab.evaluation.predict import predict_logits
from peftlab.models.build import build_model
from peftlab.models.architectures import check_max_length
from peftlab.models.loading import load_tokenizer, max_length_for, model_config, model_source
from peftlab.models.methods.registry import get as method_named
from peftlab.models.params import count_parameters
from peftlab.models.speed import first_token_only
from peftlab.runs.model_card import model_card
from peftlab.runs.record import RunRecord
from peftlab.runs.rundir import RunDir, RunView
from peftlab.runs.select import RULE, better
from peftlab.tasks.losses import UNLABELED
from peftlab.training import distributed
from peftlab.training import engines
from peftlab.training.distill import teacher_logits
from peftlab.training.engines.cuda_graphs import CaptureFailed
from peftlab.training.engines.registry import RunFacts

SPLITS = ("train", "validation", "test")
SCORE_KEYS = ("accuracy", "macro_f1", "loss")
# the best epoch's, in metrics.json (those the task has)
RECORD_KEYS = SCORE_KEYS + ("mcc", "roc_auc", "log_loss", "brier", "ece", "micro_f1", "samples_f1", "hamming_loss")


RETRY_REASON = "auto: fp32 after a non-finite 16-bit loss (precision_retry)"


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite (read at a logging step)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def calibration_figures(task, labels: np.ndarray, logits: np.ndarray, temperature: float) -> tuple[dict, dict]:
    """(before, after): ECE, log loss and Brier score without and with the temperature."""
    keys = ("ece", "log_loss", "brier")
    before = task.probability_metrics(labels, task.probabilities(logits))
    after = task.probability_metrics(labels, task.probabilities(logits, temperature))
    return {k: before[k] for k in keys}, {k: after[k] for k in keys}


class Callback(Protocol):
    def on_step(self, trainer: "Trainer", row: dict) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: int, scores: dict) -> str | None: ...

    def on_finish(self, trainer: "Trainer", record: RunRecord) -> None: ...


@dataclass
class TrainState:
    """Everything that changes while training, besides weights and optimizer: what `--resume` restores."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best: float = -math.inf  # best validation metric so far
    best_epoch: int = 0
    best_loss: float | None = None  # validation loss of the best epoch: breaks ties of the metric
    stale: int = 0  # epochs since the best
    train_seconds: float = 0.0
    samples: int = 0
    tokens: int = 0  # real (non-padding) tokens trained on
    baseline: dict | None = None  # the model before fine-tuning, on test
    stopped: str | None = None  # why training ended early (callback or early stopping)
    precision_retry: dict | None = None  # a 16-bit auto run whose loss became non-finite, restarted in fp32

    def state_dict(self) -> dict:
        return {**asdict(self), "rng": rt.rng_state()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k != "rng":
                setattr(self, k, v)
        rt.set_rng_state(state["rng"])


@dataclass
class Schedule:
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    learning_rate: float


class Trainer:
    # False: the cuda_graphs engine runs its code path without capturing (on any device): tests use it
    capture_graphs = True

    def __init__(self, cfg: Config, run: RunDir, progress: bool = True, callbacks: list[Callback] = ()):
        self.dist = distributed.setup()
        self.cfg, self.progress = cfg, progress and self.dist.main
        self.run = run if self.dist.main else RunView(run.path)  # rank 0 alone writes
        self.callbacks = list(callbacks)
        self.state = TrainState()
        self.started = time.time()

    # --- setup ---------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> "Trainer":
        self.runtime = rt.Runtime.pick(self.cfg.train.device, self.cfg.train.precision)
        if self.dist.device is not None and self.runtime.device.type == self.dist.device.type:
            self.runtime = rt.Runtime(self.dist.device, self.runtime.dtype, self.runtime.reason)  # each rank its own GPU
        if slow := rt.emulated_bf16(self.runtime.device, self.runtime.dtype):
            self._say(f"peftlab: warning: train.precision=bf16 on this CPU is slow ({slow}): fp32 is faster here")
        if self.dist.main and not self.run.config_file.exists():  # made with RunDir.create(), not start()
            save_config(self.cfg, self.run.config_file)
        rt.seed_everything(self.cfg.train.seed)
        self._setup_data()
        self.task.check(self.cfg.eval.metric, self.cfg.eval.threshold, self.data.label_names)
        self._setup_loss()
        self._setup_model()
        self._setup_teacher()
        self._setup_optimizer()
        checkpoint = self.run.load_checkpoint("last") if resume else None
        if resume and checkpoint is None and self.dist.main:
            print(f"{self.run.path}: killed before its first checkpoint; starting it again from the beginning")
            self.run.history_file.unlink(missing_ok=True)
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.cfg.eval.baseline:
            test = self.evaluate("test")
            self.state.baseline = {"test": {k: test[k] for k in ("accuracy", "macro_f1")}}
        rt.reset_peak_memory(self.runtime.device)
        return self

    def _setup_data(self) -> None:
        cfg = self.cfg
        # first: a wrong name fails fast
        self.tokenizer = load_tokenizer(cfg.model.name, cfg.model.tokenizer, cfg.model.trust_remote_code)
        # data.seed, when set, picks the splits; rows are spared from a validation split too small to use,
        # unless the run fits something on held-out validation rows (a temperature, a tuned threshold)
        held_out = cfg.eval.calibrate != "none" or cfg.eval.threshold == "tune"
        self.data = load_data(cfg.data, cfg.train.seed, spare_rows=not held_out)
        self.task = self.data.task
        self._plan_selection()
        self.max_length = max_length_for(cfg.data.max_length, cfg.model.name, model_config(
            cfg.model.name, self.data.label_names, trust_remote_code=cfg.model.trust_remote_code))
        if cfg.data.max_length is None:  # the number this run reads, in every later use and in the record's config
            self.cfg = cfg = cfg.model_copy(deep=True)
            cfg.data.max_length = self.max_length["tokens"]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.encoded: dict[str, Encoded] = {
            s: encode(self.tokenizer, getattr(self.data, s).texts, getattr(self.data, s).labels,
                      cfg.data.max_length, cfg.data.cache_dir) for s in SPLITS}
        self.unlabeled = self._unlabeled_texts()
        self.train_texts = self.data.train.texts + self.unlabeled  # what the teacher labels
        if self.unlabeled:  # after the labelled rows, labelled UNLABELED: the hard-label loss skips them
            marks = np.full((len(self.unlabeled), *self.data.train.labels.shape[1:]), UNLABELED, dtype=np.int64)
            self.encoded["train"] = Encoded.join([self.encoded["train"], encode(
                self.tokenizer, self.unlabeled, marks, cfg.data.max_length, cfg.data.cache_dir)])

    def _plan_selection(self) -> None:
        """No empty split; and how the best epoch is chosen: by validation (runs.select.RULE), or the last
        epoch where validation is too small to tell epochs apart (docs/few-shot.md)."""
        data, dc = self.data, self.cfg.data
        check_not_empty({s: getattr(data, s) for s in SPLITS}, data.split_sources)
        self.selection = selection_plan(len(data.validation), dc.min_validation_rows, data.validation_is_train)
        if self.selection["rule"] == "last epoch":
            self._say(f"peftlab: warning: {self.selection['reason']}; the last epoch is kept (set "
                      f"data.min_validation_rows lower to select by validation anyway)")
        else:
            self.selection["rule"] = RULE

    def _cap_batch_size(self) -> None:
        """Few training rows: a smaller batch, so that an epoch is not one optimizer step (metrics.json selection.batch_size)."""
        tc = self.cfg.train
        size = capped_batch_size(len(self.encoded["train"]), tc.batch_size, tc.gradient_accumulation_steps,
                                 tc.min_steps_per_epoch)
        if size != tc.batch_size:
            self.selection["batch_size"] = {"asked": tc.batch_size, "used": size,
                                            "reason": f"at least train.min_steps_per_epoch={tc.min_steps_per_epoch} steps per epoch"}
            self._say(f"peftlab: {len(self.encoded['train'])} training rows: batch size {tc.batch_size} -> {size}, "
                      f"for at least {tc.min_steps_per_epoch} optimizer steps per epoch")
            self.cfg = self.cfg.model_copy(deep=True)  # the caller's config stays as given
            self.cfg.train.batch_size = size

    def _unlabeled_texts(self) -> list[str]:
        """distill.unlabeled: its texts, without blanks, repeats, and texts of the data's own splits."""
        path = self.cfg.distill.unlabeled
        if not path:
            return []
        if not Path(path).is_file():
            raise UserError(f"distill.unlabeled {path!r}: no such file; give a CSV, TSV, JSON Lines or Parquet file of texts")
        texts = read_texts(path, self.cfg.data.text_columns, "distill.unlabeled")
        known = {t for split in SPLITS for t in getattr(self.data, split).texts}
        kept = list(dict.fromkeys(t for t in texts if t.strip() and t not in known))
        dropped = sum(1 for t in texts if t in known)
        self._say(f"distill.unlabeled: {len(kept):,} texts for the teacher to label"
                  + (f" ({dropped:,} also in the data's splits dropped)" if dropped else ""))
        if not kept:
            raise UserError(f"distill.unlabeled {path!r}: no text left (blank, repeated, or in the data's splits); "
                            "give texts the data does not hold")
        return kept

    def _setup_loss(self) -> None:
        self.hard_loss = self.task.training_loss(self.cfg.train, self.data.train.labels, self.data.label_names,
                                                 self.runtime.device, unlabeled=bool(self.unlabeled))

    def _frozen_dtype(self) -> torch.dtype | None:
        """train.frozen_dtype as a dtype (None: keep what was loaded)."""
        choice, method = self.cfg.train.frozen_dtype, self.cfg.method.name
        if choice == "fp32":
            return torch.float32
        if choice == "bf16":
            if self.runtime.dtype != torch.bfloat16:
                raise UserError(f"train.frozen_dtype=bf16 needs train.precision=bf16 (this run computes in "
                                f"{self.runtime.precision}); use frozen_dtype=auto or fp32")
            return torch.bfloat16
        # a bf16 run (GPU or CPU) that freezes the backbone: no re-cast of the frozen weights each step
        bf16 = self.runtime.dtype == torch.bfloat16
        return torch.bfloat16 if bf16 and not method_named(method).trains_backbone else None

    def _setup_model(self) -> None:
        frozen = self._frozen_dtype()
        self.built = build_model(self.cfg, self.data.label_names, self.runtime.device, self.task, frozen, self.tokenizer)
        self.model = self.built.model
        # as built: the dtype of the frozen floating-point weights (None: nothing is frozen)
        held = next((p.dtype for p in self.model.parameters() if not p.requires_grad and p.dtype.is_floating_point), None)
        self.frozen_dtype = str(held).replace("torch.", "") if held is not None else None
        self.params = count_parameters(self.model)
        first_token_only(self.model)  # the last layer only where the head reads it: same loss and gradients
        self.forward = self.dist.wrap(self.model)  # DDP when several processes train
        if self.cfg.train.compile:
            self.forward = torch.compile(self.forward)
        self.pad_multiple = pad_multiple(self.runtime.device, self.cfg.train.compile, self.cfg.data.max_length)

    def _setup_teacher(self) -> None:
        """Distillation: the teacher's logits for the training texts, computed once and kept on disk."""
        self.teacher, cfg = None, self.cfg
        if not cfg.distill.teacher:
            return
        cached = self.run.teacher_logits_file
        if self.dist.main and not cached.exists():
            logits = teacher_logits(cfg.distill, self.train_texts, self.data.label_names, self.runtime,
                                    cfg.data.cache_dir, cfg.eval.batch_size, self.task)
            self.run.checkpoints.mkdir(exist_ok=True)
            np.save(cached, logits)
        self.dist.barrier()  # the other ranks read what rank 0 computed
        self.teacher = torch.from_numpy(np.load(cached))

    def _setup_optimizer(self) -> None:
        self._cap_batch_size()
        tc = self.cfg.train
        batches = math.ceil(len(self.encoded["train"]) / tc.batch_size)
        steps = math.ceil(batches / tc.gradient_accumulation_steps)
        total = tc.max_steps or math.ceil(tc.epochs * steps)
        lr = tc.learning_rate or self.built.method.default_learning_rate
        self.schedule = Schedule(batches, steps, total, math.ceil(total / steps), lr)
        self.scaler = rt.grad_scaler(self.runtime.device, self.runtime.dtype)
        self.engine_name, self.engine_reason = engines.choose(tc.step_engine, self._run_facts())
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]  # biases and norms are not decayed (BERT's recipe)
        graphed = self.engine_name == "cuda_graphs" and self.capture_graphs
        # a captured step reads the learning rate from a device tensor, which the scheduler writes
        group_lr = (lambda: torch.tensor(lr, device=self.runtime.device)) if graphed else (lambda: lr)
        groups = [{"params": decay, "weight_decay": tc.weight_decay, "lr": group_lr()},
                  {"params": no_decay, "weight_decay": 0.0, "lr": group_lr()}]
        cuda = self.runtime.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=lr, fused=cuda, **({"capturable": True} if graphed else {}))
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(tc.warmup_ratio * total), total)
        self.engine = None  # made when training starts (after a resume has loaded the optimizer's state)

    def _run_facts(self) -> RunFacts:
        tc = self.cfg.train
        device = "cuda" if self.runtime.device.type == "cuda" or not self.capture_graphs else self.runtime.device.type
        return RunFacts(device=device, world_size=self.dist.world_size, fp16_scaler=self.scaler is not None,
                        accumulation=tc.gradient_accumulation_steps, distill=bool(self.cfg.distill.teacher),
                        task=self.task, loss=tc.loss, compile=tc.compile,
                        gradient_checkpointing=self.built.gradient_checkpointing,
                        quantized=bool(self.built.quantization.get("modules_4bit") or self.built.quantization.get("modules_8bit")))

    def _make_engine(self, name: str) -> engines.StepEngine:
        tc = self.cfg.train
        parts = engines.StepParts(
            model=self.model, forward=self.forward, loss=self._loss, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, trainable=self.trainable, runtime=self.runtime, data=self.encoded["train"],
            pad_id=self.pad_id, pad_multiple=self.pad_multiple, max_grad_norm=tc.max_grad_norm,
            accumulation=tc.gradient_accumulation_steps, window=tc.log_every * tc.gradient_accumulation_steps)
        return engines.make(name, parts, tc.batch_size, self.cfg.data.max_length, capture=self.capture_graphs)

    def _restore(self, checkpoint: dict) -> None:
        if "state" not in checkpoint:
            from peftlab.errors import UserError

            raise UserError(f"{self.run.checkpoints / 'last.pt'}: written by an older peftlab and cannot be "
                            f"resumed; start the run again in a new directory")
        self.model.load_state_dict(checkpoint["trainable"], strict=False)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.state.load_state_dict(checkpoint["state"])
        if self.state.precision_retry:  # the run had started again in fp32
            self.runtime = rt.Runtime(self.runtime.device, torch.float32, RETRY_REASON)
        self.run.truncate_history(self.state.step)
        self._say(f"resuming {self.run.path} after epoch {self.state.epoch} (step {self.state.step})")

    def _say(self, text: str) -> None:
        if self.dist.main:
            print(text, flush=True)

    # --- training ------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        hard = self.hard_loss(logits, labels)
        if self.teacher is None:
            return hard
        d, teacher = self.cfg.distill, self.teacher[index].to(self.runtime.device)
        return d.alpha * hard + (1 - d.alpha) * self.task.soft_loss(logits, teacher, d.temperature)

    def train_epoch(self, epoch: int) -> float:
        """One pass over the (remaining) batches of `epoch` (0-based); returns the mean training loss. The
        step itself is the engine's (training/engines/); the loop here orders, counts and logs."""
        tc, st, device = self.cfg.train, self.state, self.runtime.device
        accum, lengths = tc.gradient_accumulation_steps, self.encoded["train"].lengths
        batches = batch_order(lengths, tc.batch_size, tc.seed, epoch, tc.sampler)
        batches = batches[:(self.schedule.total_steps - st.step) * accum]
        bar = tqdm(total=math.ceil(len(batches) / accum), desc=f"epoch {epoch + 1}/{self.schedule.epochs}",
                   disable=not self.progress, leave=False)
        if self.engine is None:
            self.engine = self._make_engine(self.engine_name)
        epoch_sum, epoch_count = 0.0, 0
        self.model.train()
        rt.synchronize(device)
        t0 = time.perf_counter()
        for i, index in enumerate(batches):
            boundary = (i + 1) % accum == 0 or i + 1 == len(batches)
            self._micro_step(self.dist.shard(index), st.step + 1, boundary)  # this rank's share of the batch
            st.samples += len(index)
            st.tokens += int(lengths[index].sum())
            if not boundary:
                continue
            st.step += 1
            bar.update(1)
            if st.step % tc.log_every == 0 or i + 1 == len(batches):
                # the one host sync, every log_every steps (the mean over the ranks' shares)
                total, count, first_bad = self.engine.read()
                mean = self.dist.sum([total], device)[0] / (count * self.dist.world_size)
                if not math.isfinite(mean):
                    raise self._non_finite(mean, first_bad, epoch)
                epoch_sum, epoch_count = epoch_sum + mean * count, epoch_count + count
                bar.set_postfix(loss=f"{mean:.4f}")
                self._log_step(epoch + (i + 1) / len(batches), mean)
        rt.synchronize(device)
        self.epoch_seconds = time.perf_counter() - t0
        st.train_seconds += self.epoch_seconds
        bar.close()
        return epoch_sum / max(epoch_count, 1)

    def _micro_step(self, rows: np.ndarray, step: int, boundary: bool) -> None:
        try:
            self.engine.micro_step(rows, step, boundary)
        except CaptureFailed as e:  # the rest of the run in eager, with the reason in metrics.json
            self._say(f"train.step_engine: {e}; going on in eager")
            window = self.engine
            self.engine = self._make_engine("eager")
            self.engine.losses, self.engine.steps = window.losses, window.steps
            self.engine_name, self.engine_reason = "eager", f"cuda_graphs fell back to eager: {e}"
            self.engine.micro_step(rows, step, boundary)

    def _non_finite(self, value: float, step: int, epoch: int) -> NonFiniteLoss:
        step = step if step > 0 else self.state.step  # another rank's loss: this window's last step
        lr, dtype = self.schedule.learning_rate, self.runtime.dtype
        lower = f"a learning rate too high (train.learning_rate={lr:g}: try {lr / 10:g})"
        cause = (f"likely a {self.runtime.precision} overflow (train.precision=fp32 avoids it) or {lower}"
                 if dtype != torch.float32 else f"likely {lower}")
        return NonFiniteLoss(f"training stopped: the loss became {value} at optimizer step {step} (epoch {epoch + 1}): "
                             f"{cause}", step)

    def _log_step(self, epoch: float, loss: float) -> None:
        row = {"kind": "step", "step": self.state.step, "epoch": round(epoch, 4), "loss": loss,
               "lr": float(self.scheduler.get_last_lr()[0])}  # a device tensor under cuda_graphs
        self.run.append_history(row)
        for cb in self.callbacks:
            if hasattr(cb, "on_step"):
                cb.on_step(self, row)

    # --- evaluation and checkpoints ------------------------------------------------------------
    def logits(self, split: str) -> np.ndarray:
        """Logits of every example of the split; with several ranks each scores its share and the
        shares are gathered (every example exactly once)."""
        data = self.encoded[split]
        mine = self.dist.shard(np.arange(len(data)))
        local = predict_logits(self.model, data if not self.dist.active else data.subset(mine), self.pad_id,
                               self.runtime.device, self.runtime.dtype, self.cfg.eval.batch_size)
        return self.dist.gather_rows(local, mine, len(data))

    def evaluate(self, split: str) -> dict:
        """Scores of the current weights on a split: accuracy, macro-F1, per class, confusion, loss."""
        return self.task.score_logits(self.logits(split), self.encoded[split].labels, self.data.label_names)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, kind: str, scores: dict | None = None) -> None:
        """"best": the weights of the best epoch so far and their validation scores; "last": everything
        `--resume` needs."""
        if kind == "best":
            self.run.save_checkpoint("best", {"trainable": self.trainable_state(), "epoch": self.state.best_epoch,
                                              "validation": {k: scores[k] for k in RECORD_KEYS if k in scores}})
        elif kind == "last":
            self.run.save_checkpoint("last", {
                "trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "state": self.state.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None})
        else:
            raise ValueError(f"unknown checkpoint kind {kind!r}")
        self.dist.barrier()  # written before any rank may read it

    def end_epoch(self, epoch: int, train_loss: float | None) -> bool:
        """Validate, keep the best weights, record the epoch; False when training should stop. `train_loss`
        is None where nothing was trained by a loss (the probe fits its head alone)."""
        st, metric = self.state, self.cfg.eval.metric
        scores = self.evaluate("validation")
        # the last epoch, where validation is too small to choose; else runs.select's rule (ties: lower loss)
        improved = self.selection["rule"] == "last epoch" or better(scores[metric], scores.get("loss"), st.best, st.best_loss)
        if improved:
            st.best, st.best_loss, st.best_epoch, st.stale = scores[metric], scores.get("loss"), epoch + 1, 0
            self.save_checkpoint("best", scores)
        else:
            st.stale += 1
        st.epoch = epoch + 1
        self.run.append_history({"kind": "epoch", "epoch": epoch + 1, "step": st.step, "train_loss": train_loss,
                                 "validation": {k: scores[k] for k in SCORE_KEYS + self.task.metrics_names if k in scores},
                                 "seconds": self.epoch_seconds})
        trained = f"train loss {train_loss:.4f}  " if train_loss is not None else ""
        self._say(f"epoch {epoch + 1}/{self.schedule.epochs}  {trained}val loss {scores['loss']:.4f}  "
              f"val acc {scores['accuracy']:.4f}  val macro-F1 {scores['macro_f1']:.4f}  "
              f"{self.epoch_seconds:.1f}s{'  *best' if improved else ''}")
        if self.cfg.train.checkpoint_every_epoch:
            self.save_checkpoint("last")
        for cb in self.callbacks:
            reason = cb.on_epoch_end(self, epoch + 1, scores) if hasattr(cb, "on_epoch_end") else None
            if reason:
                st.stopped = f"pruned: {reason}"
                return False
        patience = self.cfg.train.early_stopping_patience
        if patience and st.stale >= patience:
            st.stopped = f"early stopping: no better validation {metric} for {st.stale} epochs"
            self._say(st.stopped)
            return False
        return True

    # --- the end -------------------------------------------------------------------------------
    def finish(self) -> RunRecord:
        """Test the best epoch's weights once; write predictions, weights, card and metrics.json, then the plots."""
        if self.state.stopped and self.state.stopped.startswith("pruned"):
            return self._finished(self._finish_pruned())
        best = self.run.load_checkpoint("best")
        self.model.load_state_dict(best["trainable"], strict=False)
        test_logits = self.logits("test")
        test = self.task.score_logits(test_logits, self.encoded["test"].labels, self.data.label_names)
        decision, temperature, threshold = self._decision(test_logits)  # every rank: it gathers validation logits
        # the model's own probabilities (as exported), and the labels predict gives (temperature, threshold)
        predicted = self.task.decide(self.task.probabilities(test_logits, temperature), threshold)
        self.run.write_predictions(self.data.test.texts, self.encoded["test"].labels,
                                   self.task.probabilities(test_logits), predicted, self.data.label_names,
                                   self.cfg.data.label_separator, self.task)
        if not self.dist.main:
            return self._finished(self._record(test, best["validation"], None, decision))
        weights = self.run.save_weights(self.built.method, self.model, self.tokenizer)
        adapter_bytes = sum(f.stat().st_size for f in weights.iterdir() if f.suffix in (".safetensors", ".bin"))
        record = self._record(test, best["validation"], adapter_bytes, decision)
        self.run.write_card(model_card(record, self.cfg, weights, self.run.path))
        self.run.write_record(record)  # the run is complete here: nothing optional comes before
        self.run.remove_checkpoints()
        if self.cfg.output.plots:
            self._plots(record)
        return self._finished(record)

    def _plots(self, record: RunRecord) -> None:
        """plots/, after the record: a plot that cannot be drawn is a warning, never a lost run."""
        from peftlab.runs.plots import write_plots

        try:
            write_plots(self.run.path, record)
        except Exception as e:  # noqa: BLE001 - matplotlib, memory, disk: the run itself is complete
            self._say(f"peftlab: warning: the plots of {self.run.path} could not be drawn "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the run is complete "
                      f"(metrics.json); peftlab.runs.plots.write_plots({str(self.run.path)!r}) draws them again")

    def _finished(self, record: RunRecord) -> RunRecord:
        for cb in self.callbacks:
            if hasattr(cb, "on_finish"):
                cb.on_finish(self, record)
        return record

    def _decision(self, test_logits: np.ndarray) -> tuple[dict, float, object]:
        """eval.calibrate and eval.threshold, fitted on the best weights' validation logits: (record fields,
        temperature, threshold). Their test figures go beside the default (argmax / 0.5), uncalibrated ones,
        which they never replace."""
        ec, names, task = self.cfg.eval, self.data.label_names, self.task
        if ec.calibrate == "none" and ec.threshold == "argmax":
            return {}, 1.0, None
        val_logits, val_labels = self.logits("validation"), self.encoded["validation"].labels
        test_labels, out, t = self.encoded["test"].labels, {}, 1.0
        if ec.calibrate == "temperature":
            t = task.fit_temperature(val_logits, val_labels)
            before, after = calibration_figures(task, test_labels, test_logits, t)
            val_before, val_after = calibration_figures(task, val_labels, val_logits, t)
            out["calibration"] = {"temperature": t, "before": before, "after": after,
                                  "validation_before": val_before, "validation_after": val_after}
            self._say(f"temperature {t:.3f}: test ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
                      f"log loss {before['log_loss']:.4f} -> {after['log_loss']:.4f}")
        threshold = None
        if ec.threshold != "argmax":
            val_probs, test_probs = task.probabilities(val_logits, t), task.probabilities(test_logits, t)
            threshold = task.threshold_for(ec.threshold, val_probs, val_labels, ec.metric, ec.threshold_scope)
            tuned_for = ec.metric if ec.threshold == "tune" else "fixed"
            out["validation_at_threshold"] = task.at_threshold(val_probs, val_labels, names, threshold, tuned_for)
            out["test_at_threshold"] = task.at_threshold(test_probs, test_labels, names, threshold, tuned_for)
            shown = f"{threshold:.4f}" if isinstance(threshold, float) else \
                ", ".join(f"{n} {v:.3f}" for n, v in list(zip(names, threshold))[:6]) + (", ..." if len(names) > 6 else "")
            self._say(f"threshold {shown}: test {ec.metric} {out['test_at_threshold'][ec.metric]:.4f} "
                      f"(default decisions: see test)")
        return out, t, threshold

    def _record(self, test: dict, validation: dict, adapter_bytes: int, decision: dict | None = None) -> RunRecord:
        st, cfg, device = self.state, self.cfg, self.runtime.device
        memory, memory_kind = rt.peak_memory(device)
        return RunRecord(
            status="completed", method=cfg.method.name, model=cfg.model.name, dataset=self.data.name,
            run_dir=str(self.run.path), config=cfg.model_dump(mode="json"), label_names=self.data.label_names,
            task=self.task.name,
            split_sizes={s: len(getattr(self.data, s)) for s in SPLITS}, split_sources=self.data.split_sources,
            overlap_with_train=self.data.overlap,
            params={**self.params, "adapter_bytes": adapter_bytes}, best_epoch=st.best_epoch,
            validation=validation, test=test, baseline=st.baseline,
            efficiency={
                "train_seconds": round(st.train_seconds, 6),
                "train_samples_per_second": round(st.samples / max(st.train_seconds, 1e-9), 2),
                "train_tokens_per_second": round(st.tokens / max(st.train_seconds, 1e-9), 1),
                "peak_memory_bytes": memory, "peak_memory_kind": memory_kind, "device": rt.device_name(device),
                "precision": self.runtime.precision, "precision_reason": self.runtime.reason, "optimizer_steps": st.step, "world_size": self.dist.world_size,
                "step_engine": self.engine_name, "step_engine_reason": self.engine_reason,
                "graph_capture_seconds": round(getattr(self.engine, "capture_seconds", 0.0), 3)
                if self.engine_name == "cuda_graphs" else None,
                "frozen_dtype": self.frozen_dtype, "gradient_checkpointing": self.built.gradient_checkpointing,
                "wall_seconds": round(time.time() - self.started, 3)},
            quantization=self.built.quantization,
            distill=({"teacher": cfg.distill.teacher, "alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature,
                      "unlabeled": cfg.distill.unlabeled, "unlabeled_rows": len(self.unlabeled)}
                     if cfg.distill.teacher else None),
            precision_retry=st.precision_retry, selection=self.selection, head=self.built.head,
            max_length=self.max_length, model_source=model_source(cfg.model.name), **(decision or {}))

    def _finish_pruned(self) -> RunRecord:
        record = RunRecord(status="pruned", reason=self.state.stopped.removeprefix("pruned: "),
                           method=self.cfg.method.name, run_dir=str(self.run.path),
                           config=self.cfg.model_dump(mode="json"))
        self.run.write_record(record)
        self.run.remove_checkpoints()
        return record

    def fit(self, resume: bool = False) -> RunRecord:
        """setup, every epoch, finish; a run that raises is recorded as failed, never as complete."""
        try:
            self.setup(resume)
            try:
                self._epochs()
            except NonFiniteLoss as e:
                if not self._may_retry_in_fp32():
                    raise
                self._restart_in_fp32(e)
                self._epochs()
            return self.finish()
        except BaseException as e:
            memory = out_of_memory(e)
            if memory is None:
                self.run.record_failure(e, self.cfg)
                raise
            error = self._out_of_memory(memory)
            self.run.record_failure(error, self.cfg)
            raise error from None
        finally:
            self.run.unlock()

    def _out_of_memory(self, what: str) -> UserError:
        c = self.cfg
        return UserError(f"out of {what} on {self.runtime.device if hasattr(self, 'runtime') else 'this machine'}: "
                         f"lower train.batch_size (now {c.train.batch_size}; train.gradient_accumulation_steps keeps "
                         f"the batch the optimizer sees) or data.max_length (now {c.data.max_length}), and "
                         f"eval.batch_size (now {c.eval.batch_size}) for evaluation; the model with its method "
                         f"(model.name, method.r) must fit as well")

    def _epochs(self) -> None:
        for epoch in range(self.state.epoch, self.schedule.epochs):
            if not self.end_epoch(epoch, self.train_epoch(epoch)):
                break

    def _may_retry_in_fp32(self) -> bool:
        return (self.cfg.train.precision == "auto" and self.runtime.dtype != torch.float32
                and self.state.precision_retry is None)

    def _restart_in_fp32(self, error: NonFiniteLoss) -> None:
        """train.precision=auto picked 16 bits and the loss became non-finite: once, start again in fp32
        (fresh weights, optimizer and state; the baseline is kept), recorded in metrics.json."""
        retry = {"from_precision": self.runtime.precision, "to_precision": "float32", "step": error.step,
                 "reason": str(error)}
        self._say(f"{error}; train.precision=auto: starting again in fp32")
        self.state = TrainState(baseline=self.state.baseline, precision_retry=retry)
        self.runtime = rt.Runtime(self.runtime.device, torch.float32, RETRY_REASON)
        if self.dist.main:
            for name in ("best", "last"):
                (self.run.checkpoints / f"{name}.pt").unlink(missing_ok=True)
        self.run.truncate_history(0)
        rt.seed_everything(self.cfg.train.seed)
        self._setup_model()
        self._setup_optimizer()


def train(cfg: Config, run: RunDir, resume: bool = False, progress: bool = True,
          callbacks: list[Callback] = ()) -> RunRecord:
    """Train, evaluate and record one run in `run` (already started: RunDir.start)."""
    from peftlab.training.tracking import callbacks_for

    try:  # cfg.tracking.backends: a tracker that is not installed fails here, before anything trains
        callbacks = [*callbacks, *callbacks_for(cfg, run.path)]
    except BaseException:
        run.unlock()
        raise
    return trainer_for(cfg)(cfg, run, progress, callbacks).fit(resume)


def trainer_for(cfg: Config) -> type[Trainer]:
    """The method's own training recipe (Method.trainer, e.g. the few-shot methods'), else Trainer."""
    import importlib

    from peftlab.models.methods import registry

    method = registry.find(cfg.method.name)
    if method is None or not method.trainer:
        return Trainer
    module, name = method.trainer.split(":")
    return getattr(importlib.import_module(module), name)
