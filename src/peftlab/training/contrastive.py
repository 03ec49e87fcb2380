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


def in_batch_rows(labels: np.ndarray, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """pair_objective=in_batch: the labelled rows of each step, class-balanced (the same share of every
    class, at least 2 rows of each where it has them, so that every row has a partner of its class); all
    rows where there are no more than `batch`."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if len(labels) <= batch:
        return [np.arange(len(labels))] * steps
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    per = max(2, batch // len(by_class))
    return [np.sort(np.concatenate([rng.choice(rows, min(per, len(rows)), replace=False) for rows in by_class]))
            for _ in range(steps)]


def supervised_contrastive(emb: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Every pair of the batch at once (Khosla et al. 2020; FastFit's batch objective on sentence
    embeddings): per row, the mean log-probability of its own class's rows under a softmax over the cosine
    similarities to every other row of the batch."""
    z = torch.nn.functional.normalize(emb, dim=-1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    has = positive.any(dim=1)
    mean_pos = log_prob.masked_fill(~positive, 0).sum(dim=1) / positive.sum(dim=1).clamp(min=1)
    return -mean_pos[has].mean()


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
        if mc.pair_objective == "in_batch":
            # as many steps as give the pair budget (2 x pair_iterations x rows pairs), every pair of a batch at once
            rows = min(tc.batch_size, len(labels))
            steps = max(1, math.ceil(len(self.pairs) / (rows * (rows - 1) // 2 or 1)))
        else:
            steps = max(1, math.ceil(len(self.pairs) / tc.batch_size))
        total = (tc.max_steps or math.ceil(mc.body_epochs * steps)) if tunes_body else 0
        self.batches = in_batch_rows(labels, tc.batch_size, total, tc.seed) if mc.pair_objective == "in_batch" else None
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
        tuned = bool(self.schedule.total_steps)
        # the probe trains no body: no loss
        loss = (self._tune_body_in_batch() if self.batches is not None else self._tune_body()) if tuned else None
        body_seconds = time.perf_counter() - t0
        head = self._fit_head()
        mc = self.cfg.method
        if tuned and mc.end_to_end_epochs:
            head["end_to_end"] = self._end_to_end()
        self.epoch_seconds = time.perf_counter() - t0
        self.state.train_seconds += self.epoch_seconds
        in_batch = self.batches is not None and tuned
        self.few_shot = {"objective": mc.pair_objective if tuned else None,
                         "pairs": (sum(len(b) * (len(b) - 1) // 2 for b in self.batches) if in_batch else len(self.pairs)),
                         "pair_iterations": mc.pair_iterations if tuned else 0,
                         "body_epochs": mc.body_epochs if tuned else 0,
                         "body_steps": self.body_steps if tuned else 0, "body_seconds": round(body_seconds, 3),
                         "body_learning_rate": self.schedule.learning_rate if tuned else None, **head}
        self.end_epoch(0, loss)

    def _embed(self, batch: dict) -> torch.Tensor:
        """Pooled embeddings of a collated batch: the backbone's output with the pooled head installed."""
        with self.runtime.autocast():
            return _hf_model(self.model).base_model(**batch)["pooler_output"].float()

    def _tune_body(self) -> float | None:
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
        self.body_steps = st.step
        return float(torch.stack(losses).mean()) if losses else None

    def _tune_body_in_batch(self) -> float | None:
        """pair_objective=in_batch: per step, one class-balanced batch of labelled rows, every pair at once."""
        tc, st, device, data = self.cfg.train, self.state, self.runtime.device, self.encoded["train"]
        total, temperature = self.schedule.total_steps, self.cfg.method.pair_temperature
        self.model.train()
        losses = []
        for step, rows in enumerate(self.batches):
            batch = to_device(collate(data, rows, self.pad_id, self.pad_multiple), device)
            labels = batch.pop("labels")
            st.samples += len(rows)
            st.tokens += int(batch["attention_mask"].sum())
            loss = supervised_contrastive(self._embed(batch), labels, temperature)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            self._step()
            losses.append(loss.detach())
            if st.step % tc.log_every == 0 or step + 1 == total:
                self._log_step((step + 1) / total, float(losses[-1]))
        self.body_steps = st.step
        return float(torch.stack(losses).mean()) if losses else None

    def _end_to_end(self) -> dict:
        """SetFit's end-to-end phase: body and the fitted head trained together on the classification loss,
        over the labelled rows (method.end_to_end_epochs passes, batches of train.batch_size rows); the body at
        its learning rate, the head at HEAD_LEARNING_RATE / 10 (it starts from the fitted head)."""
        tc, st, device, data = self.cfg.train, self.state, self.runtime.device, self.encoded["train"]
        t0 = time.perf_counter()
        head = _trained_copy(_hf_model(self.model).classifier)
        head_params = [p for p in head.parameters()]
        for p in head_params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW([{"params": self.trainable, "lr": self.schedule.learning_rate},
                                       {"params": head_params, "lr": HEAD_LEARNING_RATE / 10}],
                                      weight_decay=tc.weight_decay)
        batch_size = max(1, min(tc.batch_size, len(data)))
        per_epoch = math.ceil(len(data) / batch_size)
        total = max(1, math.ceil(self.cfg.method.end_to_end_epochs * per_epoch))
        from transformers import get_linear_schedule_with_warmup

        scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total), total)
        self.model.train()
        loss, order = None, None
        for step in range(total):
            epoch, i = divmod(step, per_epoch)
            if i == 0:
                order = np.random.default_rng(tc.seed + 1000 + epoch).permutation(len(data))
            rows = order[i * batch_size:(i + 1) * batch_size]
            batch = to_device(collate(data, rows, self.pad_id, self.pad_multiple), device)
            labels = batch.pop("labels")
            with self.runtime.autocast():
                logits = self.model(**batch).logits.float()
            loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            if tc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.trainable + head_params, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            st.samples += len(rows)
            st.tokens += int(batch["attention_mask"].sum())
        self.model.eval()
        return {"epochs": self.cfg.method.end_to_end_epochs, "steps": total,
                "head_learning_rate": HEAD_LEARNING_RATE / 10, "last_loss": round(float(loss.detach()), 6),
                "seconds": round(time.perf_counter() - t0, 3)}

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
