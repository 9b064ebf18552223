"""The package's :class:`SparsityCollector` (``tl_sparsity.SparsityCollector``): the one-process collector of
:mod:`tl_sparsity.tl.collector` with a choice of mode, ``parallel=``.

``parallel="auto"`` (default) gives a :class:`~tl_sparsity.scale.data_parallel.DataParallelCollector` when
``torch.distributed`` is initialised with more than one rank (in ``process_group``), else a one-process collector;
``"data"`` requires data-parallel; None (or ``"none"``) keeps every rank on its own. Hook-parallel collection is
asked for by its class, :class:`~tl_sparsity.scale.hook_parallel.HookParallelCollector`. Every collector of any mode
is an instance of this class (``isinstance(col, tl_sparsity.SparsityCollector)``), and of the one-process class its
modes are built on.

The choice lives here, above the collector, so that the collector itself knows nothing of ``torch.distributed``.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch

from ..tl import collector as _collector
from ..tl import resume as _resume
from .data_parallel import DataParallelCollector
from .ranks import resolve_parallel

__all__ = ["SparsityCollector"]


class _AnyCollector(abc.ABCMeta):
    """Makes ``isinstance(col, SparsityCollector)`` true for every collector, whatever its mode."""

    def __subclasscheck__(cls, sub: Any) -> bool:
        return issubclass(sub, _collector.SparsityCollector) if cls is SparsityCollector else super(
            ).__subclasscheck__(sub)

    def __instancecheck__(cls, obj: Any) -> bool:
        return cls.__subclasscheck__(type(obj))


class SparsityCollector(_collector.SparsityCollector, metaclass=_AnyCollector):
    __doc__ = (_collector.SparsityCollector.__doc__ or "").replace(
        "        **learner_options:",
        "        parallel: ``\"auto\"`` (default): data-parallel when ``torch.distributed`` is initialised with more than"
        " one\n            rank — every rank runs its replica on its own tokens, every hook's learner is shared by all "
        "ranks\n            (:class:`~tl_sparsity.scale.data_parallel.DataParallelCollector`, which is then what is "
        "built), and\n            ``report()`` (called on every rank) describes all ranks' tokens; ``\"data\"``: the "
        "same, required; None:\n            this process on its own. Every rank must run the same forwards.\n"
        "        process_group: the ``torch.distributed`` group of the data-parallel ranks (default: the world).\n"
        "        **learner_options:", 1).replace(
        "    One process. The ``torch.distributed`` modes are subclasses in :mod:`tl_sparsity.scale`; the package's\n"
        "    ``SparsityCollector`` (:mod:`tl_sparsity.scale.modes`) adds ``parallel=``, the choice of data-parallel.\n",
        "    Built in one process, or data-parallel (``parallel=``); hook-parallel collection is\n"
        "    :class:`~tl_sparsity.scale.hook_parallel.HookParallelCollector`.\n", 1)

    def __new__(cls, *args: Any, parallel: str | None = "auto", process_group: Any = None, **options: Any) -> Any:
        if cls is SparsityCollector and resolve_parallel(parallel, process_group) == "data":
            return DataParallelCollector(*args, group=process_group, **options)  # built here: not re-initialised
        return super().__new__(cls)

    def __init__(self, model: Any, hooks: Any = "resid_post", *, parallel: str | None = "auto",
                 process_group: Any = None, **options: Any) -> None:
        super().__init__(model, hooks, **options)  # one process: __new__ chose it

    def __getnewargs_ex__(self) -> tuple[tuple[()], dict[str, Any]]:
        return (), {"parallel": None}  # copy / pickle: the copy is what this is, one process

    @classmethod
    def load(cls, path: str | Path, model: Any, device: str | torch.device | None = None) -> Any:
        """A one-process collector on ``model`` restored from :meth:`save` (also one rank's folder of a parallel
        run); see :meth:`tl_sparsity.tl.collector.SparsityCollector.load`."""
        return _resume.load_collector(cls, path, model, device, parallel=None)
