"""Training step engines: how one optimizer step runs. The Trainer owns the loop (order of batches,
logging, epochs); an engine owns the step (forward, backward, clipping, optimizer, scheduler)."""
from peftlab.training.engines.base import StepEngine, StepParts
from peftlab.training.engines.registry import choose, make

__all__ = ["StepEngine", "StepParts", "choose", "make"]
