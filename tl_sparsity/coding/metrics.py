"""The paper's sparsity metrics as pure functions, and a mergeable float64 accumulator with standard errors.

Definitions (``PAPER.md``; matrix norms are averages over samples j):

* ‖α‖∞ := (1/n) Σ_j max_i α_ij                       — ``max_coef``
* N₀   := (1/n) Σ_j ‖α_j‖₀                            — ``nnz``
* S₁   := Σ_j ‖α_j‖₁ / Σ_j max_i α_ij                 — ``coef_norm``
* L    := (1/n) Σ_j (‖x_j − α_jΦ‖² + λ‖α_j‖₁)         — ``loss``
* L_norm := L / (λ‖α‖∞) = S₁ + mean‖x − αΦ‖² / (λ‖α‖∞) — ``normalized_loss``
* FVU  := Σ_j ‖x_j − α_jΦ‖² / Σ_j ‖x_j − x̄‖²           — ``fvu`` (explained variance = 1 − FVU)
* n_active := (1/n) Σ_j c_j, c_j the count of active features of row j after a support refit, merging of split
  atoms and a noise threshold (:mod:`tl_sparsity.coding.active`, docs/active.md) — ``n_active``, with
  ``n_active_se`` = sd(c)/√n, over the first :data:`ACTIVE_ROWS` rows an accumulator sees (its support refit costs
  far more than the pursuit). Not the paper's; an estimate of "how many features fire per token".

The standard error of ``normalized_loss`` is the delta-method error of a ratio of means, Σa/Σb with
a_j = loss_j and b_j = λ·max_i α_ij, which treats samples as independent (tokens of one sequence are not quite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from .active import active_counts

__all__ = ["sparsity_metrics", "per_sample_terms", "MetricAccumulator", "ACTIVE_ROWS"]

#: Rows per accumulator on which ``n_active`` is computed (the first ones; held-out rows arrive in random order).
ACTIVE_ROWS = 1024


@torch.no_grad()
def per_sample_terms(
    x: Float[Tensor, "n d"], dictionary: Float[Tensor, "m d"], alpha: Float[Tensor, "n m"], lam: float
) -> dict[str, Tensor]:
    """Per-sample pieces of every metric: ``sq_err``, ``l1``, ``max``, ``nnz`` (each ``[n]``)."""
    resid = x - alpha @ dictionary
    return {
        "sq_err": resid.pow(2).sum(1),
        "l1": alpha.abs().sum(1),
        "max": alpha.max(dim=1).values if alpha.shape[1] else alpha.new_zeros(alpha.shape[0]),
        "nnz": (alpha != 0).sum(1).to(x.dtype),
    }


@dataclass
class MetricAccumulator:
    """Streaming float64 sums from which every metric (and the standard error of L_norm) follows.

    Two accumulators over disjoint samples with the same λ ``merge`` into the one over their union. ``active``
    False skips ``n_active`` (its support refit), which then reads NaN.
    """

    lam: float
    n: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    x_sum: Tensor | None = None  # Σ_j x_j, float64 [d]
    active: bool = True
    n_act: int = 0  # rows n_active was computed on (the first ACTIVE_ROWS)

    _KEYS = ("sq_err", "l1", "max", "nnz", "x_sq", "loss_sq", "max_sq", "loss_max", "act", "act_sq")

    def update(self, x: Tensor, dictionary: Tensor, alpha: Tensor) -> None:
        t = {k: v.double() for k, v in per_sample_terms(x, dictionary, alpha, self.lam).items()}
        loss = t["sq_err"] + self.lam * t["l1"]
        b = self.lam * t["max"]
        add = {
            "sq_err": t["sq_err"].sum(), "l1": t["l1"].sum(), "max": t["max"].sum(), "nnz": t["nnz"].sum(),
            "x_sq": x.double().pow(2).sum(), "loss_sq": loss.pow(2).sum(), "max_sq": b.pow(2).sum(),
            "loss_max": (loss * b).sum(), "act": 0.0, "act_sq": 0.0,
        }
        take = min(x.shape[0], max(ACTIVE_ROWS - self.n_act, 0)) if self.active else 0
        if take:
            c = active_counts(x[:take], dictionary, alpha[:take], self.lam).double()
            add["act"], add["act_sq"] = c.sum(), c.pow(2).sum()
            self.n_act += take
        for k in self._KEYS:
            self.sums[k] = self.sums.get(k, 0.0) + float(add[k])
        xs = x.double().sum(0).cpu()
        self.x_sum = xs if self.x_sum is None else self.x_sum + xs
        self.n += x.shape[0]

    def merge(self, other: "MetricAccumulator") -> "MetricAccumulator":
        if other.lam != self.lam:
            raise ValueError(f"cannot merge metrics computed with different λ ({self.lam} vs {other.lam}).")
        out = MetricAccumulator(self.lam, self.n + other.n, active=self.active and other.active,
                                n_act=self.n_act + other.n_act)
        out.sums = {k: self.sums.get(k, 0.0) + other.sums.get(k, 0.0) for k in self._KEYS}
        parts = [s for s in (self.x_sum, other.x_sum) if s is not None]
        out.x_sum = sum(parts[1:], parts[0].clone()) if parts else None
        return out

    def result(self) -> dict[str, float]:
        """Metrics over all samples seen; NaN where undefined (no samples, or no active coefficient)."""
        n, s, lam = self.n, self.sums, self.lam
        nan = float("nan")
        if n == 0:
            return {k: nan for k in ("loss", "normalized_loss", "normalized_loss_se", "coef_norm", "nnz", "fvu",
                                     "max_coef", "mse", "n_active", "n_active_se")}
        loss_sum = s["sq_err"] + lam * s["l1"]
        b_sum = lam * s["max"]
        ratio = loss_sum / b_sum if b_sum > 0 else nan
        se = nan
        if n > 1 and b_sum > 0:
            # Var(a − R·b) from raw moments; mean(a − R·b) is 0 by construction of R.
            var = (s["loss_sq"] - 2 * ratio * s["loss_max"] + ratio**2 * s["max_sq"]) / (n - 1)
            se = math.sqrt(max(var, 0.0) / n) / (b_sum / n)
        k = self.n_act
        act = s.get("act", 0.0) / k if self.active and k else nan
        act_se = math.sqrt(max(s.get("act_sq", 0.0) - k * act**2, 0.0) / (k - 1) / k) if self.active and k > 1 else nan
        centred = s["x_sq"] - float(self.x_sum.pow(2).sum()) / n
        return {
            "loss": loss_sum / n,
            "normalized_loss": ratio,
            "normalized_loss_se": se,
            "coef_norm": s["l1"] / s["max"] if s["max"] > 0 else nan,
            "nnz": s["nnz"] / n,
            "fvu": s["sq_err"] / centred if centred > 0 else nan,
            "max_coef": s["max"] / n,
            "mse": s["sq_err"] / n,
            "n_active": act,
            "n_active_se": act_se,
        }


def sparsity_metrics(
    x: Float[Tensor, "n d"], dictionary: Float[Tensor, "m d"], alpha: Float[Tensor, "n m"], lam: float
) -> dict[str, float]:
    """All metrics of ``PAPER.md`` for codes ``alpha`` of rows ``x`` under ``dictionary`` and penalty ``lam``.

    Returns ``loss``, ``normalized_loss`` (with ``normalized_loss_se``), ``coef_norm`` (S₁), ``nnz`` (N₀), ``fvu``,
    ``max_coef`` (‖α‖∞), ``mse`` and ``n_active`` (with ``n_active_se``), as Python floats computed in float64.
    """
    if alpha.shape != (x.shape[0], dictionary.shape[0]):
        raise ValueError(
            f"alpha must be [n, m] = [{x.shape[0]}, {dictionary.shape[0]}], got {tuple(alpha.shape)}."
        )
    acc = MetricAccumulator(float(lam))
    acc.update(x, dictionary, alpha)
    return acc.result()
