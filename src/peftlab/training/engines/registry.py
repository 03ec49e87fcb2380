"""Which step engine runs: train.step_engine, and the rules under which cuda_graphs cannot (then eager
runs and the reason goes into metrics.json)."""
from __future__ import annotations

from dataclasses import dataclass

from peftlab.tasks import SINGLE_LABEL, Task
from peftlab.training.engines.base import StepEngine, StepParts
from peftlab.training.engines.cuda_graphs import GraphEngine
from peftlab.training.engines.eager import EagerEngine

ENGINES = ("eager", "cuda_graphs")


@dataclass(frozen=True)
class RunFacts:
    """What decides whether a whole step can be captured."""
    device: str  # "cuda" or "cpu"
    world_size: int = 1
    fp16_scaler: bool = False
    accumulation: int = 1
    distill: bool = False
    task: Task = SINGLE_LABEL  # its loss may not skip the padded rows of a partial batch
    loss: str = "cross_entropy"
    compile: bool = False
    gradient_checkpointing: bool = False
    quantized: bool = False


def graph_blockers(f: RunFacts) -> list[str]:
    """Why cuda_graphs cannot run this run (empty: it can)."""
    rules = [
        (f.device != "cuda", f"CUDA graphs need a CUDA device (this run is on {f.device})"),
        (f.world_size > 1, f"{f.world_size} processes (DDP): its gradient all-reduce is not captured"),
        (f.fp16_scaler, "fp16 gradient scaling (GradScaler) reads the overflow flag on the host each step: use bf16"),
        (f.accumulation > 1, "gradient accumulation (train.gradient_accumulation_steps > 1)"),
        (f.distill, "distillation: teacher logits are gathered per batch on the host"),
        (not f.task.loss_skips_ignore_index,
         f"{f.task.title}: the padded partial batch needs a loss that skips ignore-index rows"),
        (f.loss != "cross_entropy", f"train.loss={f.loss}: the padded partial batch needs a loss that skips ignore-index rows"),
        (f.compile, "train.compile: torch.compile manages its own graphs"),
        (f.gradient_checkpointing, "gradient checkpointing: recomputation is not captured"),
        (f.quantized, "bitsandbytes 4-bit/8-bit kernels: not verified to capture"),
    ]
    return [why for blocked, why in rules if blocked]


def choose(requested: str, facts: RunFacts) -> tuple[str, str | None]:
    """(engine, reason it is not what was asked for, or None)."""
    if requested == "eager":
        return "eager", None
    blockers = graph_blockers(facts)
    if not blockers:
        return "cuda_graphs", None
    return "eager", f"{requested} fell back to eager: " + "; ".join(blockers)


def make(name: str, parts: StepParts, batch_size: int, max_length: int, capture: bool = True) -> StepEngine:
    if name == "cuda_graphs":
        return GraphEngine(parts, batch_size, max_length, capture=capture)
    if name == "eager":
        return EagerEngine(parts)
    raise ValueError(f"unknown step engine {name!r} (known: {', '.join(ENGINES)})")
