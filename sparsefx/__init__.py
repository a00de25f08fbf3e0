"""sparsefx: compiler-pass sparsity optimizer for PyTorch."""

from .errors import PruneError, SparsefxError, TraceError
from .prune import Analysis, analyze, count_macs, count_params, prune
from .trace import trace

__all__ = [
    "Analysis", "PruneError", "SparsefxError", "TraceError", "analyze", "count_macs", "count_params", "prune",
    "trace",
]
__version__ = "0.1.0"
