"""Micro-batching: one worker thread per model in memory gathers the requests that arrive within a
short window (or until enough texts are waiting) and runs them in as few forward passes as it can.

Mixed (the default): the requests of every LoRA adapter of a shared base go through one pass, each
row through its own adapter and head (peft's per-example adapter_names). Not mixed: one pass per
adapter in the window (the adapter is model state, switched between passes). The worker is the only
user of its group's tokenizers and model, so neither needs more locking than the group's lock.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field


from peftlab.evaluation.predict import logits_together
from peftlab.serve.registry import Group, Served


class Unloaded(Exception):
    """The run was unloaded while its request waited."""


class Overloaded(Exception):
    """The queue holds max_queue_texts already: the request is refused now rather than kept waiting."""

    def __init__(self, queued: int, retry_after_s: int):
        super().__init__(f"{queued} texts are waiting")
        self.queued, self.retry_after_s = queued, retry_after_s


@dataclass
class Job:
    served: Served
    texts: list[str]
    future: Future = field(default_factory=Future)


@dataclass
class BatchSettings:
    window_s: float = 0.005  # how long the first request of a batch waits for company
    max_batch: int = 64      # texts per batch: a batch closes once it holds this many
    mixed: bool = True       # several adapters in one forward pass
    max_queue_texts: int = 1024  # texts waiting (or in the pass) per model; a request beyond is refused (503)


class Batcher:
    def __init__(self, group: Group, settings: BatchSettings, on_batch=None):
        self.group, self.settings, self.on_batch = group, settings, on_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.pending = 0                 # texts submitted and not yet answered
        self.seconds_per_text = 0.01     # a running mean of the passes' time, for Retry-After
        self.thread = threading.Thread(target=self._loop, name=f"batcher-{group.index}", daemon=True)
        self.thread.start()

    def submit(self, served: Served, texts: list[str]) -> Future:
        """A future of the texts' class probabilities (array [len(texts), len(labels)])."""
        with self.lock:
            limit = self.settings.max_queue_texts
            if self.pending and self.pending + len(texts) > limit:  # one request alone is always taken
                wait = self.pending * self.seconds_per_text
                raise Overloaded(self.pending, max(1, min(60, int(wait) + 1)))
            self.pending += len(texts)
        job = Job(served, texts)
        job.future.add_done_callback(lambda _: self._done(len(texts)))
        self.queue.put(job)
        return job.future

    def _done(self, n: int) -> None:
        with self.lock:
            self.pending -= n

    def stop(self) -> None:
        self.queue.put(None)

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        jobs, rows = [first], len(first.texts)
        deadline = time.monotonic() + self.settings.window_s
        while rows < self.settings.max_batch:
            wait = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.texts)
        return jobs, False

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # not those given up on
            started, rows = time.perf_counter(), sum(len(j.texts) for j in jobs)
            try:
                self._run(jobs)
                if rows:
                    self.seconds_per_text = 0.8 * self.seconds_per_text + 0.2 * (time.perf_counter() - started) / rows
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one batch
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
            if stop:
                return

    def _run(self, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            if job.served.loaded:
                live.append(job)
            else:
                job.future.set_exception(Unloaded(job.served.name))
        if not live:
            return
        if self.group.mixable and self.settings.mixed:
            passes = [live]
        else:  # one pass per adapter, requests of the same adapter together
            by_adapter: dict[str, list[Job]] = {}
            for job in live:
                by_adapter.setdefault(job.served.name, []).append(job)
            passes = list(by_adapter.values())
        for batch in passes:
            try:
                parts = [job.served.predictor.encode(job.texts, cache=False) for job in batch]
                logits = logits_together([job.served.predictor for job in batch], parts)
            except Exception as e:  # noqa: BLE001 - delivered to the requests, which answer 500
                for job in batch:  # unless their run was unloaded meanwhile
                    job.future.set_exception(e if job.served.loaded else Unloaded(job.served.name))
                continue
            if self.on_batch:
                self.on_batch(self.group, batch)
            for job, x in zip(batch, logits):
                # each run's own task (softmax, or a sigmoid per label for a multi-label run) and temperature:
                # single- and multi-label adapters of one base share the pass, not the probabilities
                job.future.set_result(job.served.predictor.probabilities_of(x))
