"""peftlab: fine-tune transformer text classifiers with parameter-efficient methods, measured.

The Python API (docs/python.md): load_config, train, load_run, sweep, report; a Run holds a run
directory's typed record (RunRecord), history, plots and predictions. Errors are UserError.
"""

__version__ = "0.1.0"

from peftlab.api import Run, load_config, load_run, report, sweep, train  # noqa: E402
from peftlab.config import Config  # noqa: E402
from peftlab.errors import UserError  # noqa: E402
from peftlab.models.methods import registry as _methods  # noqa: E402,F401  (registers method.name's choices)
from peftlab.runs.record import RunRecord  # noqa: E402

__all__ = ["Config", "Run", "RunRecord", "UserError", "load_config", "load_run", "report", "sweep", "train",
           "__version__"]
