"""Former home of :class:`HookParallelCollector`, now :mod:`tl_sparsity.scale.hook_parallel` (also
``tl_sparsity.HookParallelCollector``). Its names still load from here, with a :class:`DeprecationWarning`; this
module goes in a later release."""

from __future__ import annotations

import warnings
from typing import Any

from .scale import hook_parallel as _hook_parallel

_MOVED = ("HookParallelCollector", "_pack", "_unpack", "_gather_rows", "_gather_bytes", "_comm_device")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"tl_sparsity.distributed.{name} moved to tl_sparsity.scale.hook_parallel.{name} (import "
                      "HookParallelCollector from tl_sparsity); tl_sparsity.distributed goes in a later release.",
                      DeprecationWarning, stacklevel=2)
        return getattr(_hook_parallel, name)
    raise AttributeError(f"module 'tl_sparsity.distributed' has no attribute {name!r}")
