"""Data-parallel collection with ``torch.distributed``: :class:`DataParallelCollector`, every hook's learner shared
by all ranks.

Every rank runs its own model replica on its own shard of the tokens (``torchrun``); every hook's learner is a
:class:`~tl_sparsity.scale.shared_coder.DataParallelCoder`, so every rank holds the same dictionaries, learned from
all ranks' rows as one process fed them interleaved forward by forward would learn them. After each forward, every
hook's count of finite rows on every rank travels in one collective, and each learner is told them (``counts=``), so
it exchanges no counts itself. ``report()`` (collective: call it on every rank) describes all ranks' tokens, with the
side statistics (covariances, neuron statistics) merged over the ranks.

``tl_sparsity.SparsityCollector(..., parallel="data")`` builds one (and ``parallel="auto"``, its default, under
``torchrun`` with more than one rank). ``fwd_hooks()``, ``attach()`` and ``start()`` work when every rank runs the
same forwards (each hook's rows are then exchanged per call); ``flush()`` (collective) trains the ranks' pending rows
as one last shared batch; ``fit(until="converged")`` raises.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..report import SparsityReport
from ..tl import rows as _rows
from . import ranks as _ranks
from .ranked import RankedCollector
from .ranks import resolve_parallel
from .shared_coder import DataParallelCoder

__all__ = ["DataParallelCollector", "DataParallelCoder", "resolve_parallel"]


class DataParallelCollector(RankedCollector):
    """A :class:`~tl_sparsity.tl.collector.SparsityCollector` whose every hook's learner is shared by the ranks of
    ``group`` (default: the world); see the module. Build it on every rank with the same arguments, after
    ``torch.distributed.init_process_group``: ``DataParallelCollector(model, hooks, group=None, **options)``."""

    parallel = "data"
    mode = "data-parallel"
    alternative = ("Give fit a token budget (n_tokens=...), or collect in one process "
                   "(tl_sparsity.SparsityCollector(..., parallel=None)) or hook-parallel (HookParallelCollector).")

    def __init__(self, model: Any, hooks: Any = "resid_post", *, group: Any = None, **options: Any) -> None:
        # its learners replay nothing (DataParallelCoder); recorded so, one rank's checkpoint loads in one process
        super().__init__(model, hooks, group=group, **{**options, "replay": 0})

    def _new_learner(self) -> DataParallelCoder:
        return DataParallelCoder(group=self.group, **self.learner_options)

    def _feed(self, sink: dict[str, list[tuple]]) -> None:
        """One completed forward's rows: every hook's finite-row count on every rank in one collective (the one host
        synchronisation the NaN check has anyway), then each learner takes its rows with those counts."""
        joined = [torch.cat([c[0] for c in chunks]) if chunks else None for chunks in sink.values()]
        counts = _ranks.finite_row_counts(joined, self.group)  # per hook, every rank's rows, after dropping NaN/Inf
        for (name, chunks), x, n in zip(sink.items(), joined, counts):
            learner = self.learners[name]
            if x is not None and n[self.rank] < x.shape[0]:  # NaN/Inf rows: dropped and counted by the learner
                x = learner.finite_rows(x)
            learner.partial_fit(torch.zeros(0, 0) if x is None else x, check_finite=False, counts=n)
            for rows, acts, toks, keep in chunks:
                self.extras[name].update(rows, acts, toks, keep)

    def report(self, controls: bool | None = None) -> SparsityReport:
        """The report of all ranks' tokens, the same on every rank (collective: call it on every rank); see
        :meth:`SparsityCollector.report <tl_sparsity.tl.collector.SparsityCollector.report>`."""
        return _rows.build_report(self, controls, merge=self._merged)

    def _merged(self, rows: list[dict[str, Any]]) -> tuple["DataParallelCollector", dict[str, Any]]:
        """Collective: the rows' counters summed over the ranks (in place), and a view of this collector whose side
        statistics are merged over the ranks."""
        for row in rows:
            row.update(self.learners[row["hook"]].global_counts())
            row["n_rows"] = _rows.row_count(row, self.learners[row["hook"]])
        view = copy.copy(self)
        view.extras = _ranks.merged_extras(self)
        return view, {"data_parallel": {"world_size": self.world}}
