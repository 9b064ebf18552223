"""tl_sparsity — how sparse are the features at this hook? (Deng, Tao, Benton 2023, for TransformerLens models).

Importing this package does not import TransformerLens; the names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SparsityCollector": "scale.modes",
    "OnlineSparseCoder": "coding.learner",
    "LearnerOptions": "coding.options",
    "greedy_pursuit": "coding.backend",
    "greedy_pursuit_reference": "coding.pursuit",
    "lasso_pursuit": "coding.pursuit",
    "sparsity_metrics": "coding.metrics",
    "SparsityReport": "report",
    "ALIASES": "tl.hooks",
    "NeuronStats": "stats.neurons",
    "parameter_activation": "tl.parameters",
    "plot_parameter_activation": "tl.parameters",
    "StreamingCovariance": "stats.controls",
    "DataParallelCollector": "scale.data_parallel",
    "HookParallelCollector": "scale.hook_parallel",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tl_sparsity' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
