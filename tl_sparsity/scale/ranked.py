"""What the two ``torch.distributed`` modes share: :class:`RankedCollector`, the base of
:class:`~tl_sparsity.scale.data_parallel.DataParallelCollector` and
:class:`~tl_sparsity.scale.hook_parallel.HookParallelCollector`.

Both are :class:`~tl_sparsity.tl.collector.SparsityCollector` subclasses built the same way —
``Mode(model, hooks, *, group=None, **options)`` on every rank after ``torch.distributed.init_process_group`` — with
the same public surface. What this class adds: the rank (``group``, ``rank``, ``world``), ``fit``'s prelude (every
rank must pass the same number of batches; one checkpoint folder per rank, ``<dir>/rank<r>-of-<world>``, resumed
from the newest checkpoint that every rank has; the progress bar on rank 0), per-rank ``save`` and ``load``, and a
clear error for what a mode cannot do (``fit(until="converged")``: each rank would stop at another batch).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..tl import resume as _resume
from ..tl.collector import SparsityCollector
from . import ranks as _ranks

__all__ = ["RankedCollector"]


class RankedCollector(SparsityCollector):
    """A collector run together by the ranks of ``group`` (default: the world); see the module. Every rank must
    build it with the same arguments and make the same calls (``fit``, ``report`` are collective)."""

    parallel: str  # "data" or "hooks"
    mode = ""  # its name in messages: "data-parallel" or "hook-parallel"
    alternative = ""  # what to use instead for the methods a mode cannot run (set by each mode)

    def __init__(self, model: Any, hooks: Any = "resid_post", *, group: Any = None, **options: Any) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{type(self).__name__} needs torch.distributed initialised first: launch with torchrun "
                               "and call torch.distributed.init_process_group(backend='gloo' or 'nccl').")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        super().__init__(model, hooks, **options)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.hook_points)} hooks, rank {self.rank} of {self.world}, "
                f"tokens={self.n_tokens})")

    def _cannot(self, what: str, why: str) -> Exception:
        """The error for a method this mode cannot run: names the mode, the reason and the alternative."""
        return NotImplementedError(f"{what} in {self.mode} mode ({type(self).__name__}): {why}. "
                                   f"{self.alternative}")

    # ------------------------------------------------------------------ fit
    def fit(self, token_batches: Iterable[Any] | Tensor, n_tokens: int | None = None, progress: bool = True,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None, *,
            until: str | None = None, **kwargs: Any) -> "RankedCollector":
        """:meth:`SparsityCollector.fit <tl_sparsity.tl.collector.SparsityCollector.fit>` on every rank, each with
        its own batches (the same number on every rank); collective. ``until="converged"`` is for one process: give a
        token budget (``n_tokens=``) and read each hook's ``converged`` column in the report."""
        if until is not None:
            raise ValueError(f"fit(until='converged') runs in one process; in {self.mode} mode give a "
                             "token budget (n_tokens=) and read each hook's `converged` column in the report.")
        return super().fit(token_batches, n_tokens, progress, checkpoint_dir, checkpoint_every, **kwargs)

    def _fit_setup(self, token_batches: Iterable[Any], checkpoint_dir: str | Path | None, progress: bool
                   ) -> tuple[list[Any], Path | None, Path | None, bool]:
        batches = list(token_batches)  # every rank runs the same number of forwards
        folder = resume_from = None
        if checkpoint_dir is not None:  # one folder per rank; resume from the newest checkpoint all ranks have
            folder = _ranks.rank_dir(checkpoint_dir, self.rank, self.world)
            resume_from = _ranks.common_checkpoint(folder, self.group)
        _ranks.same_batch_count(batches, self.group)
        return batches, folder, resume_from, progress and self.rank == 0

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Every rank writes its own checkpoint, under ``path/rank<r>-of-<world>`` (see
        :meth:`SparsityCollector.save <tl_sparsity.tl.collector.SparsityCollector.save>`); returns this rank's."""
        return super().save(_ranks.rank_dir(path, self.rank, self.world))

    @classmethod
    def load(cls, path: str | Path, model: Any, device: str | torch.device | None = None, *,
             group: Any = None) -> "RankedCollector":
        """On every rank (same ranks as the run that saved): the collector saved under ``path`` by :meth:`save` or
        ``fit(checkpoint_dir=path)``, this rank's folder ``path/rank<r>-of-<world>``. One rank's folder loads into
        a one-process collector too: ``tl_sparsity.SparsityCollector.load(folder, model)``."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{cls.__name__}.load needs torch.distributed initialised first (init_process_group); "
                               "one rank's folder loads with tl_sparsity.SparsityCollector.load(folder, model).")
        folder = _ranks.rank_dir(path, dist.get_rank(group), dist.get_world_size(group))
        return _resume.load_collector(cls, folder, model, device, group=group)
