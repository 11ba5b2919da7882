"""optimize: reach a file-size target under the user's tolerance (``search.py``), from what
the user asks (``goals.py``) to the files it writes (``files.py``)."""

from onnxcompress.optimize.files import Written, optimize_file, plot_tradeoff
from onnxcompress.optimize.goals import Metric, Target, Tolerance
from onnxcompress.optimize.search import OptimizeResult, Trial, candidates, optimize

__all__ = [
    "Metric",
    "OptimizeResult",
    "Target",
    "Tolerance",
    "Trial",
    "Written",
    "candidates",
    "optimize",
    "optimize_file",
    "plot_tradeoff",
]
