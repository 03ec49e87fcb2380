"""Fabricate run directories that follow the trainer's run-directory contract, without training:
metrics.json is a real RunRecord, so a renamed or retyped field breaks these fixtures too.

Test metrics come from `classification_metrics` (multi-label: `multilabel_metrics`) on made-up
predictions (so they are internally consistent); validation figures are given directly so tests can steer
the best-by-validation choice.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import yaml

from peftlab.config.schema import Config
from peftlab.runs.record import AtThreshold, Baseline, Efficiency, FullScores, Params, Quantization, RunRecord, Scores
from peftlab.tasks import MULTI_LABEL
from peftlab.tasks.metrics import classification_metrics

LABELS = ["business", "sport", "tech"]
N_TEST = 100


def fake_predictions(errors: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N_TEST examples, classes in turn; the first `errors` are predicted as the next class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N_TEST) % len(LABELS)
    predicted = labels.copy()
    predicted[:errors] = (labels[:errors] + 1) % len(LABELS)
    probs = rng.uniform(0.0, 0.2, size=(N_TEST, len(LABELS)))
    probs[np.arange(N_TEST), predicted] = rng.uniform(0.5, 1.0, size=N_TEST)
    return labels, probs / probs.sum(axis=1, keepdims=True)


def make_run(root: Path, name: str, *, method: str = "lora", r: int = 8, seed: int = 42,
             val_acc: float = 0.9, val_f1: float = 0.9, test_errors: int = 10, trainable: int = 150_000,
             total: int = 22_863_363, seconds: float = 12.5, peak: int = 512 * 2**20,
             status: str = "completed", steps: int = 30) -> Path:
    run = Path(root) / name
    run.mkdir(parents=True)
    cfg = Config().model_dump()
    cfg["method"].update(name=method, r=r, target_modules=["query", "value"] if method != "full" else None)
    cfg["train"]["seed"] = seed
    cfg["output"]["dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")

    with open(run / "history.jsonl", "w", encoding="utf-8") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"kind": "step", "step": step, "epoch": step / 10,
                                "loss": 1.1 * 0.93 ** step + 0.01 * (seed % 7), "lr": 1e-3}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"kind": "epoch", "epoch": step // 10, "step": step, "train_loss": 0.5,
                                    "validation": {"accuracy": val_acc - 0.01 * (3 - step // 10),
                                                   "macro_f1": val_f1 - 0.01 * (3 - step // 10), "loss": 0.4},
                                    "seconds": seconds / 3}) + "\n")

    labels, probs = fake_predictions(test_errors, seed)
    test = classification_metrics(labels, probs, LABELS)
    with open(run / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "predicted", "confidence"] + [f"prob_{c}" for c in LABELS])
        for i, (y, p) in enumerate(zip(labels, probs)):
            w.writerow([f"text, number {i}", LABELS[y], LABELS[int(p.argmax())], float(p.max())] + list(map(float, p)))

    if status == "completed":  # a completed run has its weights on disk (their content is not read here)
        weights = run / ("model" if method == "full" else "adapter")
        weights.mkdir()
        (weights / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).write_bytes(b"{}")
        record = RunRecord(
            status=status, method=method, model=cfg["model"]["name"], dataset="bbc_news", run_dir=str(run),
            config=cfg, label_names=LABELS,
            params=Params(trainable=trainable, total=total, trainable_pct=100 * trainable / total,
                          adapter_bytes=trainable * 4),
            validation=Scores(accuracy=val_acc, macro_f1=val_f1), best_epoch=3, test=FullScores(**test),
            baseline=Baseline(test=Scores(accuracy=0.3333, macro_f1=0.1667)),
            efficiency=Efficiency(train_seconds=seconds, train_samples_per_second=80.0, train_tokens_per_second=9000.0,
                                  peak_memory_bytes=peak, peak_memory_kind="cpu_peak_rss", device="cpu"),
            quantization=Quantization())
    else:  # a failed run stops before evaluation
        record = RunRecord(status=status, method=method, model=cfg["model"]["name"], run_dir=str(run), config=cfg,
                           error="RuntimeError: made up")
    record.write(run / "metrics.json")
    return run


def make_study(root: Path) -> dict[str, Path]:
    """Four configurations (one with 3 seeds), one failed and one unfinished run.

    Best by validation macro-F1 is lora-r16 (0.95), though full fine-tuning is best on test.
    Pareto (test accuracy vs trainable parameters): ia3, the lora-r8 group and full; not lora-r16.
    """
    sweep, single = Path(root) / "sweep", Path(root) / "single"
    runs = {}
    for i, (seed, vf1, err) in enumerate([(1, 0.90, 10), (2, 0.92, 12), (3, 0.94, 8)]):
        runs[f"lora-r8-s{seed}"] = make_run(sweep, f"lora-r8-s{seed}", seed=seed, val_acc=vf1, val_f1=vf1,
                                            test_errors=err, seconds=10.0 + i)
    runs["lora-r16"] = make_run(sweep, "lora-r16", r=16, val_acc=0.95, val_f1=0.95, test_errors=15,
                                trainable=300_000, seconds=13.0)
    runs["full"] = make_run(single, "full", method="full", val_acc=0.93, val_f1=0.93, test_errors=5,
                            trainable=22_713_216, seconds=40.0, peak=2048 * 2**20)
    runs["ia3"] = make_run(single, "ia3", method="ia3", val_acc=0.85, val_f1=0.85, test_errors=20,
                           trainable=20_000, seconds=9.0)
    runs["broken"] = make_run(sweep, "broken", r=64, status="failed")
    unfinished = sweep / "unfinished"
    unfinished.mkdir()
    (unfinished / "history.jsonl").write_text('{"kind": "step", "step": 1, "epoch": 0.1, "loss": 1.0, "lr": 0.001}\n')
    runs["unfinished"] = unfinished
    return runs


def fake_label_sets(errors: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N_TEST multi-label examples over LABELS (every subset in turn, the empty one included) and label
    probabilities that decide them right at 0.5 except `errors` decisions (text i, label i mod K)."""
    rng = np.random.default_rng(seed)
    k = len(LABELS)
    labels = np.array([[(i >> j) & 1 for j in range(k)] for i in range(N_TEST)])
    probs = np.where(labels == 1, rng.uniform(0.55, 0.95, labels.shape), rng.uniform(0.05, 0.45, labels.shape))
    for i in range(errors):
        probs[i, i % k] = 1 - probs[i, i % k]
    return labels, probs


def make_multilabel_run(root: Path, name: str, *, method: str = "lora", r: int = 8, seed: int = 42,
                        validation: dict | None = None, test_errors: int = 10, metric: str = "macro_f1",
                        threshold: float | None = None, dataset: str = "bbc_news", trainable: int = 150_000,
                        total: int = 22_863_363, seconds: float = 12.5, peak: int = 512 * 2**20) -> Path:
    """A completed multi-label run on `dataset` with LABELS (the same names as make_run's): multi-label
    predictions.csv (label sets joined by "|", no confidence column), eval.metric `metric`, and with
    `threshold` the test figures at that fixed threshold (test_at_threshold)."""
    run = Path(root) / name
    run.mkdir(parents=True)
    cfg = Config().model_dump()
    cfg["method"].update(name=method, r=r, target_modules=["query", "value"] if method != "full" else None)
    cfg["data"].update(multi_label=True)
    cfg["eval"].update(metric=metric, threshold=threshold if threshold is not None else "argmax")
    cfg["train"]["seed"] = seed
    cfg["output"]["dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    validation = {"accuracy": 0.5, "macro_f1": 0.8, "micro_f1": 0.8, "samples_f1": 0.7, "hamming_loss": 0.1,
                  **(validation or {})}
    with open(run / "history.jsonl", "w", encoding="utf-8") as f:
        for step in range(1, 31):
            f.write(json.dumps({"kind": "step", "step": step, "epoch": step / 10, "loss": 0.7 * 0.95 ** step,
                                "lr": 1e-3}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"kind": "epoch", "epoch": step // 10, "step": step, "train_loss": 0.5,
                                    "validation": {k: validation[k] for k in ("accuracy", "macro_f1")} | {"loss": 0.4},
                                    "seconds": seconds / 3}) + "\n")

    labels, probs = fake_label_sets(test_errors, seed)
    test = MULTI_LABEL.metrics(labels, probs, LABELS)
    decided = MULTI_LABEL.decide(probs, None if threshold is None else [threshold] * len(LABELS))
    join = lambda row: "|".join(n for n, on in zip(LABELS, row) if on)  # noqa: E731
    with open(run / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "predicted"] + [f"prob_{c}" for c in LABELS])
        for i, (y, d, p) in enumerate(zip(labels, decided, probs)):
            w.writerow([f"text, number {i}", join(y), join(d)] + list(map(float, p)))
    weights = run / ("model" if method == "full" else "adapter")
    weights.mkdir()
    (weights / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).write_bytes(b"{}")
    at = None
    if threshold is not None:
        at = AtThreshold(**MULTI_LABEL.at_threshold(probs, labels, LABELS, [threshold] * len(LABELS), "fixed"))
    record = RunRecord(
        status="completed", method=method, model=cfg["model"]["name"], dataset=dataset, run_dir=str(run),
        config=cfg, label_names=LABELS, multi_label=True,
        params=Params(trainable=trainable, total=total, trainable_pct=100 * trainable / total,
                      adapter_bytes=trainable * 4),
        validation=Scores(**validation), best_epoch=3, test=FullScores(**test),
        baseline=Baseline(test=Scores(accuracy=0.125, macro_f1=0.4, micro_f1=0.4, samples_f1=0.3, hamming_loss=0.5)),
        efficiency=Efficiency(train_seconds=seconds, train_samples_per_second=80.0, train_tokens_per_second=9000.0,
                              peak_memory_bytes=peak, peak_memory_kind="cpu_peak_rss", device="cpu"),
        quantization=Quantization(), test_at_threshold=at)
    record.write(run / "metrics.json")
    return run
