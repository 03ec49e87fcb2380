"""peftlab: fine-tune transformer text classifiers with parameter-efficient methods, measured.

The Python API (docs/python.md): load_config, train, load_run, sweep, report; a Run holds a run
directory's typed record (RunRecord), history, plots and predictions. Errors are UserError.

The API's names are imported on first use (PEP 562), so that `import peftlab.<anything>` and
`peftlab --help` do not pay for torch, transformers and peft (about 10 s on a 2-core machine) until a
command needs them.
"""

__version__ = "0.1.0"

import logging as _logging  # noqa: E402

# On a CPU with AVX512-BF16, importing bitsandbytes (peft does, for every method) asks the `kernels` package
# for an optional 4-bit kernel from the Hugging Face hub, and both warn on every command when it cannot be
# had; the pure-PyTorch CPU path is the one peftlab's QLoRA uses and records (metrics.json quantization).
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
del _name

from peftlab.errors import UserError  # noqa: E402
from peftlab.models.methods import registry as _methods  # noqa: E402,F401  (registers method.name's choices)

_WHERE = {"Run": "peftlab.api", "load_config": "peftlab.api", "load_run": "peftlab.api", "report": "peftlab.api",
          "sweep": "peftlab.api", "train": "peftlab.api", "Config": "peftlab.config",
          "RunRecord": "peftlab.runs.record"}

__all__ = ["Config", "Run", "RunRecord", "UserError", "load_config", "load_run", "report", "sweep", "train",
           "__version__"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
