"""The dictionary (Φ) step's optimisers besides constant-rate Adam: their arithmetic, as plain functions.

``phi_optimizer`` (:class:`~tl_sparsity.coding.options.LearnerOptions`) picks one:

* ``"adam"``: Adam on the unit sphere with a constant rate ``lr`` (``0.05/√d`` by default); the learner's
  :meth:`~tl_sparsity.coding.training.TrainingStep._phi_step`.
* ``"adam-decay"``: the same Adam step with the rate :func:`decayed_lr`: constant until λ first froze (step t₀, at
  least :data:`DECAY_START`), then ``lr·√(t₀/t)`` at dictionary step t. A re-estimate of λ after that does not
  restart it. Both Adam rates are divided by 10 at each rate check of the convergence verdict
  (:mod:`~tl_sparsity.coding.convergence`).
* ``"bcd"``: Mairal et al.'s online dictionary learning (JMLR 2010): the sufficient statistics
  A ← β·A + αᵀα/n ``[m, m]`` and B ← β·B + αᵀx/n ``[m, d]`` of each step's rows (:func:`accumulate`; β =
  :func:`forgetting`: a short memory while λ adapts, then restarted at λ's freeze and growing with the steps since),
  then one pass of block-coordinate descent over the atoms in order (:func:`bcd_sweep`):
  u_j = (B_j − A_j·Φ)/A_jj + φ_j, φ_j ← u_j/‖u_j‖ (unit norm, as every atom of the library; Mairal projects onto
  the unit ball instead, where the optimum of a non-negative code with an ℓ₁ penalty sits on the sphere anyway).
  An atom with A_jj ≤ :data:`DEAD` × max A_ii (unused in the statistics' memory), or whose u_j vanishes, keeps its
  φ_j. Memory: A and B add 4·m·(m + d) bytes per learner — at d = 576, m = 4 608: 85 MB + 10.6 MB, more than the
  rest of the state (51 MB). Time: the sweep is sequential over atoms (about eight small tensor operations per
  atom, in blocks of :data:`BLOCK` whose residuals come from one product), O(m²·d) arithmetic per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["PHI_OPTIMIZERS", "DECAY_START", "RHO", "WARM_BETA", "DEAD", "BLOCK", "decayed_lr", "forgetting", "accumulate",
           "bcd_sweep"]

PHI_OPTIMIZERS = ("adam", "adam-decay", "bcd")
#: The fewest dictionary steps before ``"adam-decay"`` starts to decay (for a learner with a fixed λ, which never
#: adapts, or a warm-up shorter than this).
DECAY_START = 100
#: Mairal's forgetting exponent: β_t = (1 − 1/t)^ρ, t counted from λ's freeze (:func:`forgetting`); the
#: statistics' memory is about t/(ρ + 1) steps.
RHO = 16.0
#: β while λ adapts: a memory of about two steps (the codes of a young dictionary and λ go stale fast).
WARM_BETA = 0.5
#: An atom whose A_jj is at most this fraction of the largest is left as it is (unused lately).
DEAD = 1e-7
#: Atoms per block of :func:`bcd_sweep` (one product for the block's residuals, then a sequential pass).
BLOCK = 64


def decayed_lr(lr: float, step: int, start: int | None) -> float:
    """``"adam-decay"``'s rate at dictionary step ``step``: ``lr`` until ``start`` (``None``: λ still adapts), then
    ``lr·√(start/step)``."""
    if start is None or step <= start:
        return lr
    return lr * math.sqrt(start / step)


def forgetting(step: int, start: int | None, rho: float = RHO) -> float:
    """β at dictionary step ``step``: :data:`WARM_BETA` while λ adapts (``start`` None; at step 1, 0), then, from
    the step ``start`` at which λ first froze, (1 − 1/(step − start))^ρ — 0 at the first step after it, so the
    statistics restart with λ frozen and weight step s's rows by ((s − start)/(step − start))^ρ."""
    if start is None:
        return WARM_BETA if step > 1 else 0.0
    k = step - start
    return (1.0 - 1.0 / k) ** rho if k > 1 else 0.0


@torch.no_grad()
def accumulate(A: Tensor, B: Tensor, x: Tensor, alpha: Tensor, n: int, beta: float) -> None:
    """A ← β·A + αᵀα/n, B ← β·B + αᵀx/n in place (``x`` [k, d] rows, ``alpha`` [k, m] codes; ``n`` the step's rows,
    over all processes that share the learner)."""
    A.mul_(beta).addmm_(alpha.T, alpha, alpha=1.0 / n)
    B.mul_(beta).addmm_(alpha.T, x, alpha=1.0 / n)


@torch.no_grad()
def bcd_sweep(phi: Tensor, A: Tensor, B: Tensor, block: int = BLOCK) -> None:
    """One block-coordinate pass over the atoms (rows of ``phi`` [m, d]) in order, in place: for j = 0 … m−1,
    u_j = (B_j − A_j·Φ)/A_jj + φ_j with Φ as updated so far, φ_j ← u_j/‖u_j‖; dead atoms (module docstring) keep
    theirs. Exactly the plain loop; the block's residuals B_J − A_J·Φ come from one product at the block's start and
    are corrected for the atoms updated since. No host synchronisation."""
    m = phi.shape[0]
    diag = A.diagonal()
    live = diag > DEAD * diag.max().clamp_min(torch.finfo(A.dtype).tiny)
    inv = torch.where(live, 1.0 / torch.where(live, diag, torch.ones_like(diag)), torch.zeros_like(diag))
    for s in range(0, m, block):
        e = min(s + block, m)
        resid = B[s:e] - A[s:e] @ phi  # [k, d]: B_j − A_j·Φ at the block's start
        old = phi[s:e].clone()
        delta = torch.zeros_like(old)  # φ_new − φ_old of the block's atoms updated so far
        for j in range(s, e):
            i = j - s
            r = resid[i] - A[j, s:j] @ delta[:i] if i else resid[i]
            u = torch.addcmul(old[i], r, inv[j])
            norm = u.norm()
            ok = live[j] & (norm > 1e-12)
            new = torch.where(ok, u / norm.clamp_min(1e-12), old[i])
            phi[j] = new
            delta[i] = new - old[i]
