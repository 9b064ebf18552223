"""Sparse codes α(Φ) for a fixed dictionary: the paper's greedy pursuit and the exact non-negative lasso.

Conventions (``PAPER.md``): rows ``x`` are ``[n, d]``, the dictionary is stored as rows ``[m, d]`` of unit norm,
codes are ``[n, m]`` and non-negative, and the objective has no ½:  ‖x − αΦ‖² + λ‖α‖₁.

* :func:`greedy_pursuit_reference` — the paper's Appendix C, one sample at a time, in residual space. Plain and slow;
  it is the definition the fast path is tested against.
* :func:`greedy_pursuit_torch` — the same procedure for a batch, in correlation space (c = Φr, G = ΦΦᵀ): each step
  reads one row of G per sample, and finished samples are compacted out of the working set so a batch does not run
  as long as its slowest sample. :func:`tl_sparsity.coding.backend.greedy_pursuit` (exported as
  ``tl_sparsity.greedy_pursuit``) runs it, or on CUDA float32 inputs the fused Triton kernel.
* :func:`lasso_pursuit` — the exact minimiser over α ≥ 0 by FISTA (projected, step 1/‖G‖₂), to a stated tolerance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["PursuitInfo", "STOP_TOL", "default_max_steps", "greedy_pursuit_torch", "greedy_pursuit_reference",
           "lasso_pursuit", "check_inputs"]


class PursuitInfo(NamedTuple):
    """Diagnostics of one greedy pursuit call."""

    steps: Tensor
    """``[n]`` int64: pursuit steps taken by each sample (atom updates, re-selections included)."""
    capped: int
    """How many samples stopped because they reached ``max_steps`` rather than by the paper's rule."""


#: A step is taken only if its coefficient a exceeds ``STOP_TOL``·λ/2. The paper stops at a ≤ 0; in exact arithmetic
#: re-selecting the atom just updated gives a = 0, but rounding leaves a ≈ 1e-8·λ > 0 and the loop would re-select it
#: until the step cap. Coefficients this small change neither the L1 term nor the residual measurably.
STOP_TOL = 1e-4


def default_max_steps(d: int) -> int:
    """Step cap used when none is given: ``4·d``. The paper states none; a sample that reaches it is counted."""
    return 4 * d


def check_inputs(x: Tensor, dictionary: Tensor, lam: float) -> None:
    if x.ndim != 2 or dictionary.ndim != 2:
        raise ValueError(
            f"expected x [n, d] and dictionary [m, d]; got x {tuple(x.shape)} and dictionary {tuple(dictionary.shape)}."
            " Flatten leading axes first, e.g. x.reshape(-1, x.shape[-1])."
        )
    if x.shape[1] != dictionary.shape[1]:
        raise ValueError(
            f"x has d={x.shape[1]} but the dictionary rows have d={dictionary.shape[1]}; they must match."
        )
    if not (float(lam) >= 0.0):
        raise ValueError(f"lam must be a non-negative number, got {lam!r}.")


@torch.no_grad()
def greedy_pursuit_reference(
    x: Float[Tensor, "n d"],
    dictionary: Float[Tensor, "m d"],
    lam: float,
    max_steps: int | None = None,
    tol: float = STOP_TOL,
) -> tuple[Float[Tensor, "n m"], PursuitInfo]:
    """The paper's greedy non-negative pursuit, literally, one sample at a time (the reference).

    Per sample: r ← x, α ← 0; repeat { i* = argmax_i ⟨r, f_i⟩ (signed); a = ⟨r, f_i*⟩ − λ/2; stop if a ≤ 0
    (in practice a ≤ ``tol``·λ/2, see :data:`STOP_TOL`);
    α_i* += a; r ← r − a·f_i* }, at most ``max_steps`` times (default :func:`default_max_steps`).
    """
    check_inputs(x, dictionary, lam)
    n, d = x.shape
    cap = default_max_steps(d) if max_steps is None else int(max_steps)
    alpha = torch.zeros(n, dictionary.shape[0], dtype=x.dtype, device=x.device)
    steps = torch.zeros(n, dtype=torch.int64)
    capped = 0
    half = lam / 2.0
    floor = tol * half
    for j in range(n):
        r = x[j].clone()
        k = 0
        while True:
            corr = dictionary @ r
            i = int(torch.argmax(corr))
            a = float(corr[i]) - half
            if a <= floor:
                break
            if k >= cap:
                capped += 1
                break
            alpha[j, i] += a
            r -= a * dictionary[i]
            k += 1
        steps[j] = k
    return alpha, PursuitInfo(steps, capped)


@torch.no_grad()
def greedy_pursuit_torch(
    x: Float[Tensor, "n d"],
    dictionary: Float[Tensor, "m d"],
    lam: float,
    max_steps: int | None = None,
    gram: Float[Tensor, "m m"] | None = None,
    return_info: bool = False,
    tol: float = STOP_TOL,
    compact_every: int = 8,
) -> Float[Tensor, "n m"] | tuple[Float[Tensor, "n m"], PursuitInfo]:
    """:func:`tl_sparsity.coding.backend.greedy_pursuit` in torch (any device, any float dtype): arguments and
    result as there."""
    check_inputs(x, dictionary, lam)
    if int(compact_every) < 1:
        raise ValueError(f"compact_every must be a positive integer, got {compact_every!r}.")
    n, d = x.shape
    m = dictionary.shape[0]
    cap = default_max_steps(d) if max_steps is None else int(max_steps)
    half = lam / 2.0
    floor = tol * half
    G = dictionary @ dictionary.T if gram is None else gram
    c = x @ dictionary.T  # [n, m] correlations of the current residuals
    alpha = torch.zeros(n, m, dtype=x.dtype, device=x.device)
    steps = torch.zeros(n, dtype=torch.int64, device=x.device)
    live = torch.arange(n, device=x.device)  # rows of the original batch still running
    k = 0
    while live.numel() > 0 and k < cap:
        # Between compactions rows that have stopped get a = 0: their correlations do not change, so they stay
        # stopped, exactly as in the reference. Compacting only every few steps avoids a host sync per step.
        for _ in range(min(compact_every, cap - k)):
            val, idx = c.max(dim=1)
            a = val - half
            a = torch.where(a > floor, a, torch.zeros_like(a))
            alpha.index_put_((live, idx), a, accumulate=True)
            c.addcmul_(G.index_select(0, idx), a.unsqueeze(1), value=-1.0)
            steps.index_add_(0, live, (a > 0).to(torch.int64))
            k += 1
        val = c.max(dim=1).values
        keep = (val - half > floor).nonzero().squeeze(1)  # one host sync per compaction
        if keep.numel() < live.numel():
            live, c = live[keep], c[keep]
    capped = int(live.numel()) if k >= cap else 0
    return (alpha, PursuitInfo(steps.cpu(), capped)) if return_info else alpha


@torch.no_grad()
def lasso_pursuit(
    x: Float[Tensor, "n d"],
    dictionary: Float[Tensor, "m d"],
    lam: float,
    tol: float = 1e-6,
    max_iter: int = 5000,
    init: Float[Tensor, "n m"] | None = None,
) -> Float[Tensor, "n m"]:
    """Exact minimiser of ‖x − αΦ‖² + λ‖α‖₁ over α ≥ 0 (no ½), by projected FISTA with restarts.

    Stops when the KKT violation, max over samples and atoms of |min(α, ∇)| with ∇ = 2(αΦ − x)Φᵀ + λ, is ≤
    ``tol``·max(1, λ) — i.e. every active coefficient has ∇ = 0 and every inactive one ∇ ≥ 0, to that tolerance —
    or after ``max_iter`` iterations. ``init`` (e.g. the greedy codes) warm-starts the solver.
    """
    check_inputs(x, dictionary, lam)
    G = dictionary @ dictionary.T
    b = x @ dictionary.T
    L = 2.0 * float(torch.linalg.matrix_norm(G.double(), ord=2))  # Lipschitz constant of ∇ of the smooth part
    step = 1.0 / max(L, 1e-12)
    alpha = torch.zeros_like(b) if init is None else init.clone().clamp_min_(0)
    y = alpha.clone()
    t = 1.0
    thresh = tol * max(1.0, lam)
    for it in range(max_iter):
        grad_y = 2.0 * (y @ G - b) + lam
        new = (y - step * grad_y).clamp_min_(0)
        if float(((y - new) * (new - alpha)).sum()) > 0:  # gradient restart (O'Donoghue & Candès)
            t = 1.0
        t_new = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = new + ((t - 1.0) / t_new) * (new - alpha)
        alpha, t = new, t_new
        if it % 10 == 9:
            grad = 2.0 * (alpha @ G - b) + lam
            if float(torch.minimum(alpha, grad).abs().max()) <= thresh:
                break
    return alpha
