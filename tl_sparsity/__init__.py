"""tl_sparsity — how sparse are the features at this hook? (Deng, Tao, Benton 2023, for TransformerLens models).

Importing this package does not import TransformerLens; the names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SparsityCollector": "collector",
    "OnlineSparseCoder": "learner",
    "greedy_pursuit": "pursuit",
    "greedy_pursuit_reference": "pursuit",
    "lasso_pursuit": "pursuit",
    "sparsity_metrics": "metrics",
    "SparsityReport": "report",
    "ALIASES": "hooks",
    "NeuronStats": "neurons",
    "parameter_activation": "parameters",
    "plot_parameter_activation": "parameters",
    "StreamingCovariance": "controls",
    "HookParallelCollector": "distributed",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tl_sparsity' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
