"""SetFit's recipe (Tunstall et al. 2022) as a peftlab run: the methods of models/methods/few_shot.py.

1. Sentence pairs from the labelled rows: per iteration, each row with one row of its own class (target
   similarity 1) and one of another class (target 0); method.pair_iterations iterations.
2. The body, through its body method (LoRA, IA3, full), tuned so that the cosine similarity of the two
   pooled embeddings approaches the target (mean squared error: sentence-transformers'
   CosineSimilarityLoss, SetFit's default), for method.body_epochs passes.
3. The head fitted on the labelled rows' embeddings, body frozen: logistic regression (SetFit's default)
   written into the linear head, or the head trained by gradient descent.

Everything else is the standard run's (Trainer): data, model, validation, test, weights, record. There
are no epochs to choose between: the run is validated once, after the head is fitted. The probe method
skips steps 1 and 2."""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from peftlab import runtime as rt
from peftlab.data.batching import collate, to_device
from peftlab.errors import UserError
from peftlab.models.architectures import head_module_names
from peftlab.training.trainer import Schedule, Trainer

HEAD_STEPS = 300  # full-batch Adam steps of head_fit=linear
HEAD_LEARNING_RATE = 1e-2  # SetFit's head learning rate


def make_pairs(labels: np.ndarray, iterations: int, seed: int) -> np.ndarray:
    """[n_pairs, 3] rows (i, j, target): per iteration and row, one partner of its class (target 1) and
    one of another class (target 0), drawn at random; a class of one row pairs with itself."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    others = {c: np.flatnonzero(labels != c) for c in by_class}
    pairs = []
    for _ in range(iterations):
        for i, c in enumerate(labels):
            same = by_class[c][by_class[c] != i]
            pairs.append((i, rng.choice(same) if len(same) else i, 1))
            if len(others[c]):
                pairs.append((i, rng.choice(others[c]), 0))
    return np.array(pairs, dtype=np.int64).reshape(-1, 3)


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trained_copy(module: torch.nn.Module) -> torch.nn.Module:
    """peft keeps the head in a ModulesToSaveWrapper: the copy that trains and is saved."""
    return module.modules_to_save["default"] if hasattr(module, "modules_to_save") else module


class ContrastiveTrainer(Trainer):
    """The standard run with its training replaced by pairs-then-head (see the module's doc)."""

    # --- setup ---------------------------------------------------------------------------------
    def _plan_selection(self) -> None:
        super()._plan_selection()
        if not self.task.exclusive_classes:  # pairs need texts that are of one class or not
            raise UserError(f"method {self.cfg.method.name} is for single-label data (one class per text); "
                            f"use lora, ia3 or full for multi-label data")
        if self.dist.active:
            raise UserError(f"method {self.cfg.method.name} trains in one process: run it without torchrun")
        self.selection["rule"] = "none: one fixed recipe (pairs, then the head), validated once"

    def _setup_optimizer(self) -> None:
        tc, mc = self.cfg.train, self.cfg.method
        tunes_body = "pair_iterations" in self.built.method.hyperparameters
        labels = self.encoded["train"].labels
        self.pairs = make_pairs(labels, mc.pair_iterations, tc.seed) if tunes_body else np.zeros((0, 3), np.int64)
        steps = max(1, math.ceil(len(self.pairs) / tc.batch_size))
        total = (tc.max_steps or math.ceil(mc.body_epochs * steps)) if tunes_body else 0
        lr = tc.learning_rate or self.built.method.default_learning_rate
        self.schedule = Schedule(steps, steps, total, 1, lr)
        heads = set(head_module_names(_hf_model(self.model)))
        # the body's trainable parameters: the head is fitted afterwards, on its own
        self.trainable = [p for n, p in self.model.named_parameters()
                          if p.requires_grad and not heads & set(n.split("."))]
        from transformers import get_linear_schedule_with_warmup

        self.optimizer = torch.optim.AdamW(self.trainable or [torch.nn.Parameter(torch.zeros(1))], lr=lr,
                                           weight_decay=tc.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(tc.warmup_ratio * total), max(total, 1))
        self.scaler = rt.grad_scaler(self.runtime.device, self.runtime.dtype)
        self.engine, self.engine_name = None, "eager"
        self.engine_reason = "the few-shot methods' own loop (training/contrastive.py)"

    # --- training ------------------------------------------------------------------------------
    def _epochs(self) -> None:
        if self.state.epoch:  # resumed after the one validation: nothing left but finish()
            return
        t0 = time.perf_counter()
        loss = self._tune_body() if self.schedule.total_steps else float("nan")
        body_seconds = time.perf_counter() - t0
        head = self._fit_head()
        self.epoch_seconds = time.perf_counter() - t0
        self.state.train_seconds += self.epoch_seconds
        mc = self.cfg.method
        self.few_shot = {"pairs": len(self.pairs), "pair_iterations": mc.pair_iterations if len(self.pairs) else 0,
                         "body_epochs": mc.body_epochs if len(self.pairs) else 0,
                         "body_steps": self.state.step, "body_seconds": round(body_seconds, 3),
                         "body_learning_rate": self.schedule.learning_rate if len(self.pairs) else None, **head}
        self.end_epoch(0, loss)

    def _embed(self, batch: dict) -> torch.Tensor:
        """Pooled embeddings of a collated batch: the backbone's output with the pooled head installed."""
        with self.runtime.autocast():
            return _hf_model(self.model).base_model(**batch)["pooler_output"].float()

    def _tune_body(self) -> float:
        """The pairs, in a fresh random order per pass; returns the mean loss of the last pass."""
        tc, st, device, data = self.cfg.train, self.state, self.runtime.device, self.encoded["train"]
        per_epoch, total = self.schedule.steps_per_epoch, self.schedule.total_steps
        self.model.train()
        losses, order = [], None
        for step in range(total):
            epoch, i = divmod(step, per_epoch)
            if i == 0:
                order = np.random.default_rng(tc.seed + epoch).permutation(len(self.pairs))
                losses = []
            chunk = self.pairs[order[i * tc.batch_size:(i + 1) * tc.batch_size]]
            batch = to_device(collate(data, np.concatenate([chunk[:, 0], chunk[:, 1]]), self.pad_id,
                                      self.pad_multiple), device)
            batch.pop("labels")
            st.samples += 2 * len(chunk)
            st.tokens += int(batch["attention_mask"].sum())
            emb = self._embed(batch)
            a, b = emb[:len(chunk)], emb[len(chunk):]
            target = torch.as_tensor(chunk[:, 2], dtype=torch.float32, device=device)
            loss = torch.nn.functional.mse_loss(torch.nn.functional.cosine_similarity(a, b), target)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            self._step()
            losses.append(loss.detach())
            if st.step % tc.log_every == 0 or step + 1 == total:
                self._log_step(epoch + (i + 1) / per_epoch, float(losses[-1]))
        return float(torch.stack(losses).mean()) if losses else float("nan")

    def _step(self) -> None:
        """One optimizer step of the body: unscale (fp16), clip, step, schedule."""
        clip = self.cfg.train.max_grad_norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip and self.trainable:
            torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    @torch.inference_mode()
    def embeddings(self, split: str) -> np.ndarray:
        data, was = self.encoded[split], self.model.training
        self.model.eval()
        order = np.argsort(-data.lengths, kind="stable")
        out = np.zeros((len(data), 0), np.float32)
        parts = []
        for start in range(0, len(order), self.cfg.eval.batch_size):
            index = order[start:start + self.cfg.eval.batch_size]
            batch = to_device(collate(data, index, self.pad_id, self.pad_multiple), self.runtime.device)
            batch.pop("labels")
            parts.append(self._embed(batch).cpu().numpy())
        self.model.train(was)
        if parts:
            out = np.zeros((len(data), parts[0].shape[1]), np.float32)
            out[order] = np.concatenate(parts)
        return out

    def _fit_head(self) -> dict:
        """The head on the labelled rows' embeddings (body frozen); what was done, for metrics.json few_shot."""
        t0 = time.perf_counter()
        x, y = self.embeddings("train"), self.encoded["train"].labels
        hf = _hf_model(self.model)
        head = _trained_copy(hf.classifier if hasattr(hf, "classifier") else hf.score)  # decoders: score
        k = len(self.data.label_names)
        if self.cfg.method.head_fit == "logistic" and isinstance(head, torch.nn.Linear) and len(np.unique(y)) > 1:
            from sklearn.linear_model import LogisticRegression

            # C on the unit-length embedding, as SetFit fits it: the head's scale s (models/heads.py) divides
            # it by s^2, which gives exactly the same classifier
            scale = (self.built.head.get("scale") or 1.0) ** 2
            # a decoder's score layer has no bias: fitted without an intercept
            lr = LogisticRegression(C=self.cfg.method.head_c / scale, max_iter=1000,
                                    fit_intercept=head.bias is not None).fit(x, y)
            weight, bias = np.zeros((k, x.shape[1]), np.float32), np.zeros(k, np.float32)
            if len(lr.classes_) == 2:  # one coefficient vector: logits -w/2, +w/2 give the same softmax
                weight[lr.classes_] = np.stack([-lr.coef_[0] / 2, lr.coef_[0] / 2])
                bias[lr.classes_] = [-lr.intercept_[0] / 2, lr.intercept_[0] / 2]
            else:
                weight[lr.classes_], bias[lr.classes_] = lr.coef_, lr.intercept_
            with torch.no_grad():
                head.weight.copy_(torch.from_numpy(weight))
                if head.bias is not None:
                    head.bias.copy_(torch.from_numpy(bias))
            fit = "logistic regression (scikit-learn)"
        else:
            self._train_head(head, x, y)
            fit = f"linear head, {HEAD_STEPS} full-batch Adam steps at {HEAD_LEARNING_RATE:g}"
        return {"head_fit": fit, "head_rows": len(y), "head_seconds": round(time.perf_counter() - t0, 3)}

    def _train_head(self, head: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> None:
        device = self.runtime.device
        inputs = torch.from_numpy(x).to(device)
        if not isinstance(head, torch.nn.Linear):  # first-token heads (RoBERTa, MPNet) read [batch, 1, hidden]
            inputs = inputs[:, None, :]
        target = torch.from_numpy(np.asarray(y)).to(device)
        params = [p for p in head.parameters()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=HEAD_LEARNING_RATE)
        head.train()
        for _ in range(HEAD_STEPS):
            loss = torch.nn.functional.cross_entropy(head(inputs), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        head.eval()

    def _record(self, *args, **kwargs):
        record = super()._record(*args, **kwargs)
        return record.model_copy(update={"few_shot": getattr(self, "few_shot", None)})
