"""Serve many trained runs over HTTP, sharing one frozen base model per (base model, number of labels,
adapter type): peft can hold several LoRA (or several IA3) adapters on one model, not a mix.

Runs that share a base are loaded as named adapters of one PeftModel; a request activates its adapter
under a lock (peft's active adapter is model state). Full fine-tuning runs are their own model.

    GET  /health                  {"status": "ok"}
    GET  /adapters                the served runs: name, method, base model, labels
    POST /predict                 {"adapter": NAME, "texts": [...]} -> {"predictions": [{label, confidence, probabilities}]}
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from peftlab.errors import UserError
from peftlab.models.loading import load_classifier
from peftlab.runs.trained import load_trained


class PredictRequest(BaseModel):
    adapter: str | None = Field(None, description="served run name; optional when only one is served")
    texts: list[str] = Field(..., min_length=1, max_length=10_000)


@dataclass
class Group:
    """One model in memory: a base with one or more named adapters (or a fully fine-tuned model)."""
    model: torch.nn.Module
    index: int
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Served:
    name: str
    run_dir: Path
    method: str
    base: str
    label_names: list[str]
    tokenizer: object
    max_length: int
    group: Group


def load_runs(run_dirs: list[str], device: torch.device) -> dict[str, Served]:
    from peft import PeftModel

    from peftlab.config.load import build_config
    from peftlab.runs.rundir import RunDir

    served: dict[str, Served] = {}
    groups: dict[tuple, Group] = {}
    for path in run_dirs:
        run = RunDir(path)
        name = run.path.resolve().name
        if name in served:
            raise UserError(f"two runs are named {name!r}: serve runs whose directory names differ")
        if (run.path / "adapter").is_dir() and run.status() == "completed":
            metrics = run.metrics()
            cfg = build_config(run.config_tree(), str(run.config_file))
            labels = metrics["label_names"]
            peft_type = json.loads((run.path / "adapter" / "adapter_config.json").read_text())["peft_type"]
            key = (cfg.model.name, len(labels), peft_type)
            if key not in groups:
                base = load_classifier(cfg.model.name, labels)
                model = PeftModel.from_pretrained(base, run.path / "adapter", adapter_name=name)
                groups[key] = Group(model.to(device).eval(), len(groups))
            else:
                groups[key].model.load_adapter(run.path / "adapter", adapter_name=name)
                groups[key].model.to(device)
            from transformers import AutoTokenizer

            served[name] = Served(name, run.path, cfg.method.name, cfg.model.name, labels,
                                  AutoTokenizer.from_pretrained(run.path / "adapter"), cfg.data.max_length, groups[key])
        else:  # full fine-tuning, or an incomplete run (load_trained says which)
            t = load_trained(run.path, device, merge=False)
            served[name] = Served(name, run.path, t.config.method.name, t.config.model.name, t.label_names,
                                  t.tokenizer, t.config.data.max_length, Group(t.model, len(groups)))
            groups[(name,)] = served[name].group
    return served


@torch.inference_mode()
def predict(entry: Served, texts: list[str], device: torch.device, batch_size: int = 64) -> np.ndarray:
    from peft import PeftModel

    probs = []
    with entry.group.lock:
        if isinstance(entry.group.model, PeftModel):
            entry.group.model.set_adapter(entry.name)
        for start in range(0, len(texts), batch_size):
            enc = entry.tokenizer(texts[start:start + batch_size], truncation=True, max_length=entry.max_length,
                                  padding=True, return_tensors="pt").to(device)
            enc.pop("token_type_ids", None)
            probs.append(entry.group.model(**enc).logits.float().softmax(-1).cpu().numpy())
    return np.concatenate(probs) if probs else np.zeros((0, len(entry.label_names)))


def create_app(run_dirs: list[str], device: torch.device | None = None):
    from fastapi import FastAPI, HTTPException

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    served = load_runs(run_dirs, device)
    app = FastAPI(title="peftlab", description="Text classifiers trained with peftlab")

    @app.get("/health")
    def health():
        return {"status": "ok", "adapters": len(served)}

    @app.get("/adapters")
    def adapters():
        return [{"name": s.name, "method": s.method, "base_model": s.base, "labels": s.label_names,
                 "model_in_memory": s.group.index} for s in served.values()]

    @app.post("/predict")
    def predict_route(req: PredictRequest):
        name = req.adapter or (next(iter(served)) if len(served) == 1 else None)
        if name not in served:
            raise HTTPException(404, f"unknown adapter {req.adapter!r}; served: {', '.join(served)}")
        entry = served[name]
        probs = predict(entry, req.texts, device)
        return {"adapter": name, "predictions": [
            {"label": entry.label_names[int(p.argmax())], "confidence": float(p.max()),
             "probabilities": dict(zip(entry.label_names, map(float, p)))} for p in probs]}

    return app
