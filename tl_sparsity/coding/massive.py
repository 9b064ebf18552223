"""Massive-activation rows: the few rows far longer than all others, kept out of learning and measurement, counted.

Language models write a handful of tokens with activations tens of times longer than every other token's ("massive
activations", Sun et al. 2024, arXiv 2402.17762): the BOS token (which collectors drop), and in many models a second
attention sink, e.g. the first token of a sequence. In SmolLM2-135M's residual stream, layers 11–27, about one window
in 20 has such a token with a norm 20–95 times the median row's (``docs/convergence.md``). At about 0.04 % of the
rows they carry a third of the squared norm: the dictionary's held-out loss is then decided by a few rows whose one direction
is learned and forgotten, and it never settles. They behave like a bias, not like features.

The rule: on the first batch, ``massive_norm_`` = ``massive_ratio`` × the 99th percentile of the L2 norms of its
training rows (raw rows, before the normaliser, which is then computed without them). From then on, a row longer
than ``massive_norm_`` — training or held-out — is *massive*: nothing learns from it, no metric includes it, and it
is counted in ``n_massive_``. Ordinary data does not trip it: 30 000 rows of a Gaussian and of sparse sources
(a = 4, 32) set none aside (``tests/coding/test_massive.py``), and heavy but continuous tails — SmolLM2's layers 2–8, whose
longest rows are 7–12 × the median — stay within 1.5 × that percentile (``benchmarks/massive_rows.py``). ``massive_ratio=None`` keeps every row (use it for the heavy-tailed controls,
e.g. the isotropic-Cauchy source, whose tail *is* the point).

Where a host synchronisation costs nothing (rows on the CPU, or on a GPU while λ adapts) massive rows are removed;
otherwise, to stay free of synchronisation, a massive row is replaced in place by the mean row (normalised: zero, so
it codes to zero, adds nothing to any sum of the normalized loss and no gradient) and counted on the device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .bounds import replace_rows
from .counts import Counted

__all__ = ["MassiveRows", "massive_threshold"]

#: The percentile of the first batch's training rows' norms that ``massive_ratio`` multiplies.
MASSIVE_QUANTILE = 0.99


def massive_threshold(rows: Tensor, ratio: float | None) -> float:
    """``ratio`` × the :data:`MASSIVE_QUANTILE` quantile of the L2 norms of ``rows`` [n, d] (computed in float64);
    ``inf`` when ``ratio`` is None or there are no rows."""
    if ratio is None or rows.shape[0] == 0:
        return math.inf
    norms = rows.double().norm(dim=1)
    return float(ratio * torch.quantile(norms, MASSIVE_QUANTILE))


class MassiveRows:
    """``massive_norm_``, ``n_massive_`` and the removal of massive rows; mixed into
    :class:`~tl_sparsity.coding.learner.OnlineSparseCoder`, whose attributes it uses."""

    massive_norm_: float = math.inf

    n_massive_ = Counted("_massive", "Rows longer than ``massive_norm_`` (training and held-out), kept out (on a GPU "
                                     "after λ's warm-up counted on the device; reading this syncs once).")

    def _set_massive_norm(self, train: Tensor) -> Tensor:
        """On the first batch: set ``massive_norm_`` from its raw training rows ``train`` and return those rows
        without the massive ones (the normaliser and the dictionary's seed are computed from them)."""
        self.massive_norm_ = massive_threshold(train, self.massive_ratio)
        if math.isinf(self.massive_norm_):
            return train
        return train[train.double().norm(dim=1) <= self.massive_norm_]

    def _without_massive(self, batch: Tensor, held: Tensor, keep_rows: bool = False) -> tuple[Tensor, Tensor]:
        """``(batch, held)`` without ``batch``'s massive rows, counted in ``n_massive_``: removed from both (``held``
        is the CPU held-out mask of ``batch``'s rows), or — on a GPU after λ's warm-up, or with ``keep_rows`` (a
        data-parallel batch, whose row counts are fixed) — replaced in place by the mean row, with no host
        synchronisation."""
        if math.isinf(self.massive_norm_):
            return batch, held
        massive = batch.double().square().sum(dim=1) > self.massive_norm_ ** 2
        if keep_rows or (batch.device.type != "cpu" and not self.lam_adapting):
            return replace_rows(batch, massive, self.mean_, self._massive), held
        keep = ~massive.cpu()
        n = int(keep.numel() - keep.sum())
        if n == 0:
            return batch, held
        self._massive.add(n)
        return batch[keep.to(batch.device)], held[keep]
