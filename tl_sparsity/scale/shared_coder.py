"""The data-parallel learner (``torch.distributed``): one hook's learner split over ranks that each see other tokens;
:class:`~tl_sparsity.scale.data_parallel.DataParallelCollector` gives one to every hook.

Every rank runs its own model replica on its own shard (``torchrun``); every rank holds the same dictionary. The
ranks' rows form one stream: each ``partial_fit`` call is collective, and the rows of one call are ordered rank 0's,
then rank 1's, …, so the stream is what one process fed the ranks' rows interleaved call by call would see. Each
learner batch of ``batch_size`` rows of that stream is spread over the ranks that hold its rows:

- first batch: it is gathered once, so the normaliser, the initial dictionary and λ's first guess are exactly the
  single process's;
- the held-out split is drawn from the shared seeded generator for the whole batch (the same draw on every rank),
  and the held-out rows are gathered in stream order, so every rank keeps the single process's reservoir;
- each rank codes only its own training rows (the pursuit is per row);
- λ's warm-up rule and the Φ-gradient are sums over rows: all-reduced, then every rank takes the same Adam step.

So the dictionary, λ, counters and reservoir equal those of one process fed the interleaved stream, up to the order
of floating-point sums (and near-ties in the pursuit that this order resolves differently). Communication per
learner batch: one all-reduce of the ``[m, d]`` gradient per Φ-step and the held-out rows (``holdout_frac`` of the
batch); per ``partial_fit`` call, one integer per rank, unless the caller passes every rank's row count (``counts=``;
the collector counts all hooks' rows with one collective per forward). Which rank holds each row of a batch is known
on the host from those counts, so after λ's warm-up a call with ``counts`` and ``check_finite=False`` never waits for
a CUDA device. Every rank must make the same ``partial_fit`` calls (rows may be empty); the collector guarantees that
for ``fit``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..coding.bounds import normalise
from ..coding.learner import OnlineSparseCoder, split_rows, to_device
from .ranks import all_gather_flat, comm_device
from ..coding.safe_io import defer_interrupts

__all__ = ["DataParallelCoder"]


class DataParallelCoder(OnlineSparseCoder):
    """An :class:`OnlineSparseCoder` that learns from the rows of every rank of ``group`` (default: the world).

    Build it on every rank with the same arguments after ``torch.distributed.init_process_group``; then call
    :meth:`partial_fit` on every rank the same number of times (with each rank's rows, possibly none). Counters
    (``n_tokens_``, ``n_heldout_``, ``n_pending_``) count all ranks' rows; ``capped_`` and ``n_dropped_`` count this
    rank's (:meth:`global_counts` sums them). Its state (:meth:`state_dict`, :meth:`save`) is that of this rank: the
    shared dictionary and counters, this rank's pending rows and its place in the ranks' stream.

    It replays no rows (``replay`` is 0 whatever is asked): the ranks together already see ``world`` times the rows
    per forward, and replay draws would differ between ranks, whose shared generator must draw the same.
    """

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any) -> None:
        import torch.distributed as dist

        super().__init__(*args, **kwargs)
        self.replay = 0
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallelCoder needs torch.distributed initialised first (init_process_group).")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._comm = comm_device(group)
        self._segments: deque[list[int]] = deque()  # the stream's pending rows as runs [rank, count], in order
        self._n_global_pending = 0
        self._width = 0  # the rows' width, once any rank has sent rows

    @property
    def n_pending_(self) -> int:
        """Rows received by all ranks but not yet processed (fewer than ``batch_size``)."""
        return self._n_global_pending

    @torch.no_grad()
    def partial_fit(self, x: Float[Tensor, "n d"], check_finite: bool = True,
                    counts: list[int] | None = None) -> "DataParallelCoder":
        """Collective: feed this rank's rows ``x`` [n, d] (n may be 0); every full batch of the ranks' stream is
        processed. Non-finite rows are dropped (counted in this rank's ``n_dropped_``) unless ``check_finite=False``
        (as in :meth:`OnlineSparseCoder.partial_fit`). ``counts``: every rank's number of rows in this call (``world``
        ints, the same list on every rank); given, the ranks exchange no counts, and a call with ``check_finite=False``
        does not synchronise with a CUDA device after λ's warm-up. Rows counted must be finite: drop the others first
        (and add them to ``n_dropped_``); a counted row past the overflow bound (:mod:`tl_sparsity.coding.bounds`) is
        counted in ``n_dropped_`` and kept in its place as the mean row. With ``counts`` each rank checks only its own arguments, so an error raised
        on one rank (wrong counts, a wrong width) leaves the others waiting at their next collective, as any
        exception on one rank does under ``torch.distributed``; the collector checks widths before it calls."""
        # No host sync after λ's warm-up (check on CUDA: torch.cuda.set_sync_debug_mode("warn") around col.fit once
        # λ is frozen; per forward only finite_row_counts' .tolist() may warn, plus the hooks' own mask selections)
        if counts is None:
            if x.shape[0]:  # a rank with no rows only takes part in the counting
                x = self._finite_rows(self._as_rows(x), check_finite)
            got = self._all_gather_ints([x.shape[0], x.shape[1] if x.shape[0] else 0])
            sizes, widths = [n for n, _ in got], {w for n, w in got if n}
        else:
            sizes = self._checked_counts(x, counts, check_finite)
            # fixed counts: a row past the overflow bound keeps its place as the mean row (counted, no sync)
            x = self._finite_rows(self._as_rows(x), check_finite, keep_rows=True) if x.shape[0] else x
            widths = self._widths(x, sizes)
        if len(widths) > 1:
            raise ValueError(f"ranks sent rows of different widths {sorted(widths)} to one data-parallel learner.")
        for r, n in enumerate(sizes):
            if n:
                self._segments.append([r, n])
                self._n_global_pending += n
        if x.shape[0]:
            self._pending.append(x.clone())
            self._n_pending += x.shape[0]
        if widths:
            self._width = widths.pop()
        if self._n_global_pending < self.batch_size:
            return self
        while self._n_global_pending >= self.batch_size:
            with defer_interrupts():
                rows, owner = self._take(self.batch_size)
                self._process_shared(rows, owner, self.batch_size, self._width)
        self._pending = [p.clone() for p in self._pending]  # own the rest: not a view keeping a large x alive
        return self

    def _checked_counts(self, x: Tensor, counts: Any, check_finite: bool) -> list[int]:
        try:
            sizes = [int(c) for c in counts]
        except TypeError:
            raise TypeError(f"counts must be a list of {self.world} ints (every rank's rows), got {counts!r}.") from None
        if len(sizes) != self.world or min(sizes) < 0 or sizes[self.rank] != x.shape[0]:
            raise ValueError(f"counts must hold every rank's number of rows in this call ({self.world} ints ≥ 0, the "
                             f"same on every rank); got {sizes}, but this rank (rank {self.rank}) passes "
                             f"{x.shape[0]} rows. Pass counts=None to have the ranks exchange them.")
        if check_finite and x.shape[0] and not bool(torch.isfinite(x).all()):
            raise ValueError("rows with NaN/Inf cannot be counted in counts=: drop them first (adding them to "
                             "n_dropped_) and pass check_finite=False, or pass counts=None.")
        return sizes

    def _widths(self, x: Tensor, sizes: list[int]) -> set[int]:
        """The width of the rows of a call with ``counts`` (checked here where no exchange is needed)."""
        if not any(sizes):
            return set()
        known = self._width or self.d_in  # the same on every rank (d_in is set with the dictionary)
        if not known:  # the stream's first rows, and no d_in given: every rank asks, once
            got = self._all_gather_ints([x.shape[1] if x.shape[0] else 0])
            return {w for (w,), n in zip(got, sizes) if n}
        if x.shape[0] and x.shape[1] != known:
            raise ValueError(f"this rank sent rows of width {x.shape[1]}, but the ranks' rows have width {known}.")
        return {known}

    @torch.no_grad()
    def flush(self) -> "DataParallelCoder":
        """Collective: the ranks' pending rows (fewer than ``batch_size``), in stream order, as one last, shorter
        shared batch — what :meth:`OnlineSparseCoder.flush` does in one process fed the interleaved stream."""
        size = self._n_global_pending  # the same on every rank, so every rank takes the same collectives
        if size:
            with defer_interrupts():
                rows, owner = self._take(size)
                self._process_shared(rows, owner, size, self._width)
        return self

    def global_counts(self) -> dict[str, int]:
        """Collective: ``capped``, ``n_dropped`` and ``n_massive`` summed over the ranks."""
        return dict(zip(("capped", "n_dropped", "n_massive"),
                        self._all_reduce_ints([self.capped_, self.n_dropped_, self.n_massive_])))

    def parallel_state(self) -> dict[str, Any]:
        """This rank's place in the shared stream (saved with :meth:`state_dict`, beside its own pending rows)."""
        return {"rank": self.rank, "world": self.world, "segments": [list(s) for s in self._segments],
                "n_global_pending": self._n_global_pending, "width": self._width}

    def restore_parallel_state(self, state: dict[str, Any] | None) -> None:
        from ..coding.state_io import CheckpointError

        if state is None:
            raise CheckpointError("this learner state was not saved by a data-parallel learner: load it into an "
                                  "OnlineSparseCoder (or a collector built with parallel=None).")
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise CheckpointError(f"this learner state was saved by rank {state['rank']} of {state['world']}; this "
                                  f"is rank {self.rank} of {self.world}: each rank must load its own.")
        self._segments = deque([list(s) for s in state["segments"]])
        self._n_global_pending, self._width = int(state["n_global_pending"]), int(state["width"])

    # ------------------------------------------------------------------ one batch of the ranks' stream
    def _take(self, size: int) -> tuple[Tensor, Tensor]:
        """Pop the stream's first ``size`` rows: this rank's rows among them ``[k, d]`` and the rank that holds each
        row of the batch, ``[size]`` (on the CPU: every rank knows every rank's runs)."""
        owner, mine, filled = torch.empty(size, dtype=torch.long), 0, 0
        while filled < size:
            seg = self._segments[0]
            t = min(seg[1], size - filled)
            owner[filled : filled + t] = seg[0]
            mine += t if seg[0] == self.rank else 0
            filled += t
            seg[1] -= t
            if seg[1] == 0:
                self._segments.popleft()
        self._n_global_pending -= size
        if mine == 0:
            dev = self._pending[0].device if self._pending else torch.device(self.device or self._comm)
            return torch.zeros(0, self._width, device=dev), owner
        local = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        rest = local[mine:]  # a view: partial_fit copies what is left once, after its last batch
        self._pending, self._n_pending = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
        return local[:mine], owner

    def _process_shared(self, rows: Tensor, owner: Tensor, size: int, width: int) -> None:
        held = self._heldout_mask(size)  # the same draw on every rank, on the CPU, before anything learns
        if self.dictionary_ is None:  # normaliser, seed and λ's guess from the training rows only
            self._init_state(self._set_massive_norm(self._gather_ordered(
                split_rows(rows, held[owner == self.rank])[1], owner[~held], width, rows.device)))
        dev = self.dictionary_.device
        rows = self._without_massive(rows.to(dev), held, keep_rows=True)[0]  # row counts stay: replaced in place
        xn = normalise(rows, self.mean_, self.scale_)
        heldout, train = split_rows(xn, held[owner == self.rank])  # this rank's rows, held out or not
        self._add_heldout(self._gather_ordered(heldout, owner[held], width, dev))
        n_train = size - int(held.sum())
        if n_train:
            self._train(train, n_train)

    # ------------------------------------------------------------------ sums over ranks
    def _code(self, xn: Tensor, warm: bool = False, gram: Tensor | None = None) -> Tensor:
        if xn.shape[0] == 0:  # this rank holds none of the batch's training rows
            self._last_capped = 0
            return torch.zeros(0, self.dictionary_.shape[0], device=xn.device)
        return super()._code(xn, warm, gram)

    def _mean_max(self, alpha: Tensor, n_total: int) -> float:
        local = alpha.max(dim=1).values.double().sum() if alpha.shape[0] else torch.zeros((), dtype=torch.float64)
        return float(self._all_reduce(local.reshape(1))[0]) / n_total

    def _phi_grad(self, x: Tensor, alpha: Tensor, n_total: int) -> Tensor:
        if x.shape[0]:
            grad = super()._phi_grad(x, alpha, n_total).mul_(x.shape[0] / n_total)
        else:
            grad = torch.zeros_like(self.dictionary_)
        return self._all_reduce(grad)

    # ------------------------------------------------------------------ collectives
    def _agree(self, flag: bool) -> bool:
        """True only if every rank's ``flag`` is (their traces are equal up to rounding): one collective, taken at
        trace points only (which sync the host anyway)."""
        return bool(self._all_reduce(torch.tensor([0.0 if flag else 1.0], dtype=torch.float64))[0] == 0)

    def _all_reduce(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        if self.world == 1:
            return t
        c = t.to(self._comm)
        dist.all_reduce(c, group=self.group)
        return c.to(t.device)

    def _all_gather_ints(self, values: list[int]) -> list[list[int]]:
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.long, device=self._comm)
        if self.world == 1:
            return [values]
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return [o.tolist() for o in out]

    def _all_reduce_ints(self, values: list[int]) -> list[int]:
        return [int(v) for v in self._all_reduce(torch.tensor(values, dtype=torch.long, device=self._comm)).tolist()]

    def _gather_ordered(self, rows: Tensor, owner: Tensor, width: int, device: torch.device) -> Tensor:
        """Every rank's ``rows`` on every rank, in stream order, ``[n, width]`` float32 (exact). ``owner`` ``[n]``
        (CPU) names the rank holding each of the n rows in stream order (this rank's ``rows`` are its entries, in
        order), so sizes and order are known on the host: one all-gather of padded rows, no synchronisation."""
        if self.world == 1:
            return rows.to(device)
        n = owner.numel()
        if n == 0:  # no rank holds a row: nothing to send (every rank knows it)
            return torch.zeros(0, width, device=device)
        n_max = int(torch.bincount(owner, minlength=self.world).max())
        buf = torch.zeros(n_max, width, dtype=torch.float32, device=self._comm)
        buf[: rows.shape[0]] = rows
        out = torch.empty(self.world * n_max, width, dtype=torch.float32, device=self._comm)
        all_gather_flat(out, buf, self.group)
        nth = torch.nn.functional.one_hot(owner, self.world).cumsum(0).gather(1, owner[:, None]).squeeze(1) - 1
        index = owner * n_max + nth  # row i of the stream: rank owner[i]'s nth[i]-th row
        return out.index_select(0, to_device(index, out.device)).to(device)
