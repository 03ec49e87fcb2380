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

import torch
from pydantic import BaseModel, Field

from peftlab.errors import UserError
from peftlab.evaluation.predict import Predictor
from peftlab.models.loading import load_classifier
from peftlab.runs.trained import completed_run, load_trained
from peftlab.runtime import Runtime


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
    group: Group
    predictor: Predictor

    @property
    def label_names(self) -> list[str]:
        return self.predictor.label_names


def load_runs(run_dirs: list[str], device: torch.device) -> dict[str, Served]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    runtime = Runtime(device, torch.float32)
    served: dict[str, Served] = {}
    groups: dict[tuple, Group] = {}
    for path in run_dirs:
        run, record, cfg = completed_run(path)
        name = run.path.resolve().name
        if name in served:
            raise UserError(f"two runs are named {name!r}: serve runs whose directory names differ")
        # peft adapter names must be valid module attribute names; served names are free text
        adapter = f"adapter{len(served)}"
        weights = run.saved_weights()
        if weights.name == "adapter":
            peft_type = json.loads((weights / "adapter_config.json").read_text())["peft_type"]
            key = (cfg.model.name, len(record.label_names), peft_type)
            if key not in groups:
                base = load_classifier(cfg.model.name, record.label_names)
                model = PeftModel.from_pretrained(base, weights, adapter_name=adapter)
                groups[key] = Group(model.to(device).eval(), len(groups))
            else:
                groups[key].model.load_adapter(weights, adapter_name=adapter)
                groups[key].model.to(device)
            group = groups[key]
            predictor = Predictor(group.model, AutoTokenizer.from_pretrained(weights), record.label_names,
                                  cfg.data.max_length, runtime, adapter=adapter, lock=group.lock, merge_lora=False)
        else:  # full fine-tuning: a model of its own
            trained = load_trained(run.path, device)
            group = groups[(name,)] = Group(trained.model, len(groups))
            predictor = trained.predictor(runtime)
        served[name] = Served(name, run.path, cfg.method.name, cfg.model.name, group, predictor)
    return served


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
        return {"adapter": name, "predictions": served[name].predictor.predict(req.texts, cache=False)}

    return app
