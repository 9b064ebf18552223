"""The rows a learner accepts, and the checks that keep its float32 state finite.

The row rule: a row is kept only if all its entries are finite and its squared L2 norm, computed in float64, is at
most :data:`ROW_SQNORM_MAX` = 1e30 (norm ≤ 1e15). Everything else is dropped before any arithmetic and counted in
``n_dropped_``. The bound leaves float32 (largest value 3.4e38) a margin of 1e8 on the first batch's statistics (the
mean, the centred rows' squared norms), so the normaliser is finite.

Past the normaliser, a row may still be far larger than the rows the scale was learned on (a 1e14 row after rows of
norm 1): the squared residual and Adam's second moment grow as ‖x‖² and ‖x‖⁴ and would overflow float32. So a
normalised row longer than :data:`NORMALISED_NORM_MAX` = 1e6 (a million times the average training row) is shrunk to
that length, keeping its direction: its Adam second moment stays below ~4·1e24, and a reservoir of such rows sums
squared residuals below 1e20. Rows within the bound — all rows of ordinary data — are untouched, bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .counts import Counted, DeviceCount

__all__ = ["ROW_SQNORM_MAX", "NORMALISED_NORM_MAX", "RowRule", "bounded_rows", "normalise", "replace_rows",
           "state_problems"]

#: Largest squared L2 norm (float64) of a row a learner keeps; larger rows, and rows with NaN/±Inf, are dropped.
ROW_SQNORM_MAX = 1e30
#: Longest normalised row trained on or held out; longer ones are shrunk to this length (see the module's text).
NORMALISED_NORM_MAX = 1e6


def bounded_rows(x: Tensor) -> Tensor:
    """Boolean mask [n]: the rows of ``x`` [n, d] that the row rule keeps (finite, Σx² ≤ :data:`ROW_SQNORM_MAX`).
    NaN and ±Inf entries make the float64 sum NaN or inf, which fails the comparison; no host synchronisation."""
    return x.double().square().sum(dim=1) <= ROW_SQNORM_MAX


def normalise(x: Tensor, mean: Tensor, scale: float) -> Tensor:
    """(x − mean) / scale, with rows longer than :data:`NORMALISED_NORM_MAX` shrunk to that length (the test is
    computed in float64, so it cannot overflow itself); the other rows are exactly ``(x - mean) / scale``, rows
    with NaN/±Inf included (the learner's own rows never hold any: the row rule removed them). No host
    synchronisation."""
    xn = (x - mean) / scale
    centred = x.double() - mean.double()
    norm = centred.norm(dim=1, keepdim=True) / scale
    keep = (norm <= NORMALISED_NORM_MAX) | ~torch.isfinite(norm)
    shrunk = centred / (scale * norm.clamp_min(1e-300)) * NORMALISED_NORM_MAX
    return torch.where(keep, xn, shrunk.to(xn.dtype))


def replace_rows(x: Tensor, bad: Tensor, fill: Tensor, count: DeviceCount) -> Tensor:
    """``x`` with the rows of the mask ``bad`` replaced by ``fill``, added to ``count`` — on the device for device
    rows (no host synchronisation), at once on the CPU (nothing to avoid there)."""
    n = bad.sum()
    count.add(int(n) if x.device.type == "cpu" else n)
    return torch.where(bad[:, None], fill.to(x.dtype), x)


def state_problems(learner) -> list[str]:
    """Names of an initialised learner's state entries holding NaN/±Inf (dictionary, mean, scale, λ, Adam
    moments); empty when all are finite. One host synchronisation."""
    checks = {"dictionary": learner.dictionary_, "mean": learner.mean_, "Adam first moment": learner._adam_m,
              "Adam second moment": learner._adam_v}
    flags = torch.stack([torch.isfinite(t).all() for t in checks.values()]).tolist()
    bad = [name for name, ok in zip(checks, flags) if not ok]
    for name, value in (("scale", learner.scale_), ("λ", learner.lam_)):
        if not math.isfinite(float(value)):
            bad.append(name)
    return bad


class RowRule:
    """The row rule applied to a learner's incoming rows, and ``n_dropped_``; mixed into
    :class:`~tl_sparsity.coding.learner.OnlineSparseCoder`."""

    n_dropped_ = Counted("_dropped", "Rows the row rule rejected (on CUDA, after λ's warm-up, counted on the device; "
                                     "reading this syncs once).")

    def _finite_rows(self, x: Tensor, check_finite: bool, keep_rows: bool = False) -> Tensor:
        """``x`` without the rows the row rule rejects (NaN/±Inf, or Σx² > :data:`ROW_SQNORM_MAX`), counted in
        ``n_dropped_``.

        ``check_finite=False`` (the caller has checked for NaN/Inf, e.g. with one synchronisation for many
        learners) still applies the rule, since such a check does not see the overflow bound: where a host
        synchronisation costs nothing or happens anyway (CPU rows, or before λ is frozen) the rows are dropped as
        above; otherwise, to stay free of synchronisation, a rejected row is kept in its place but replaced by the
        mean row (normalised: zero, so its codes are zero and its gradient is zero; it only counts in its step's
        number of rows), and counted (on a GPU, on the device). So
        does ``keep_rows`` (a data-parallel call whose row counts are fixed); before the first batch, that
        replacement row is zero."""
        ok = bounded_rows(x)
        sync_free = keep_rows or (not check_finite and x.device.type != "cpu" and self.dictionary_ is not None
                                  and not self.lam_adapting)
        if sync_free:
            fill = self.mean_ if self.dictionary_ is not None else torch.zeros((), dtype=x.dtype, device=x.device)
            return replace_rows(x, ~ok, fill, self._dropped)
        if bool(ok.all()):
            return x
        self._dropped.add(int((~ok).sum()))
        return x[ok]
