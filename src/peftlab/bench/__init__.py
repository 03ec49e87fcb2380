"""`peftlab bench`: our training path against the reference Trainer + PEFT baseline, same run."""
from peftlab.bench.runner import run_scenario
from peftlab.bench.scenarios import Scenario, load

__all__ = ["Scenario", "load", "run_scenario"]
