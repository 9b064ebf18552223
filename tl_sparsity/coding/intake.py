"""A learner's intake: rows received, held as pending rows until they fill a learner batch, and handed out as full
batches in stream order (:class:`RowIntake`, a mixin of :class:`~tl_sparsity.coding.learner.OnlineSparseCoder`).

Pending rows are fewer than ``batch_size``, unless a collector deferred full batches (:meth:`RowIntake.defer`: a
per-forward learning budget, :mod:`tl_sparsity.tl.budget`); those come out first, in their order, at the next
:meth:`RowIntake.batches` call, ``partial_fit`` or ``flush``. Checkpoints save the pending rows, backlog included.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["RowIntake"]


class RowIntake:
    """Pending rows and full batches; needs ``batch_size``, ``d_in``, ``device``, ``dictionary_`` and the row rule's
    ``_finite_rows`` (:class:`~tl_sparsity.coding.bounds.RowRule`)."""

    @property
    def n_pending_(self) -> int:
        """Rows received but not yet processed (fewer than ``batch_size``, unless batches were deferred)."""
        return self._n_pending

    def batches(self, x: Float[Tensor, "n d"], check_finite: bool = True) -> Iterator[Tensor]:
        """The full learner batches that rows ``x`` complete after the pending rows (the rest stays pending), for a
        caller that trains several learners at once (:func:`tl_sparsity.coding.grouped.train_together`, after
        :meth:`prepare`). ``partial_fit`` is this, batch by batch, in one learner."""
        return self._batches(x, check_finite)

    def defer(self, batches: list[Tensor]) -> None:
        """Put full batches that :meth:`batches` handed out back, untrained and in order, in front of the pending
        rows (a collector's per-forward learning budget, :mod:`tl_sparsity.tl.budget`): they come out first again."""
        if batches:
            rows = torch.cat([*batches, *self._pending])
            self._pending, self._n_pending = [rows], rows.shape[0]

    def backlog(self) -> list[Tensor]:
        """The full batches of the pending rows (batches deferred by :meth:`defer`), taken out in order; the rows
        short of a batch stay pending. Empty when fewer than ``batch_size`` rows are pending."""
        return list(self._batches(self._pending[0][:0], False)) if self._n_pending >= self.batch_size else []

    def _batches(self, x: Tensor, check_finite: bool) -> Iterator[Tensor]:
        """The full batches of the pending rows (a deferred backlog included, :meth:`defer`) and then ``x``, in
        stream order; what is left becomes the pending rows (copied) once the last batch has been taken. The pending
        rows are released as the first batch is handed out, so a consumer that stops early (Ctrl-C after a batch)
        never processes a row twice."""
        x = self._finite_rows(self._as_rows(x), check_finite)
        n, size = x.shape[0], self.batch_size
        if self._n_pending + n < size:
            if n:
                self._pending.append(x.clone())
                self._n_pending += n
            return
        x = torch.cat([*self._pending, x]) if self._pending else x
        self._pending, self._n_pending = [], 0
        done = 0
        while x.shape[0] - done >= size:
            yield x[done : done + size]
            done += size
        rest = x[done:]  # copied below, so a view of its tail does not keep a large x alive
        self._pending, self._n_pending = ([rest.clone()], rest.shape[0]) if rest.shape[0] else ([], 0)

    def _as_rows(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 2:
            raise ValueError(f"expected rows [n, d], got shape {tuple(x.shape)}; flatten with x.reshape(-1, d).")
        d = self.d_in if self.dictionary_ is None else self.dictionary_.shape[1]
        d = self._pending[0].shape[1] if d is None and self._pending else d
        if d is not None and x.shape[1] != d:
            raise ValueError(f"this learner has d_in={d} but got rows of width {x.shape[1]}.")
        first = self._pending[0].device if self._pending else x.device  # before init: where the first rows are
        dev = self.dictionary_.device if self.dictionary_ is not None else (self.device or first)
        return x.to(device=dev, dtype=torch.float32)
