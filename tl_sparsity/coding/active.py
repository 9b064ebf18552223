"""``n_active``: an estimate of the number of active features per token, read from the pursuit's own codes.

Normalized loss counts coefficient *mass* in units of each row's largest coefficient; N₀ counts every non-zero,
including the small atoms a greedy pursuit without refit adds to mop up cross-talk between non-orthogonal atoms and
the near-duplicate atoms that share one feature. ``n_active`` (docs/active.md) is, per row j:

1. **support refit** — non-negative least squares of x_j on the atoms the pursuit chose (S_j = {i : α_ij > 0}),
   started from α_j, by projected coordinate descent (``sweeps`` passes). No second pass over data: the refit sees
   only the row and its support.
2. **merge split atoms** — among the support atoms whose refit coefficient survives, an atom is not counted when a
   support atom with a larger refit coefficient has cosine > ``merge_cos`` with it (one feature split over near
   atoms counts once).
3. **noise threshold** — a refit coefficient counts when it exceeds the larger of ``threshold`` × λ/2, the pursuit's
   own floor (a correlation below λ/2 never selects an atom), and ``noise_k`` × ‖r_j‖·√(2 ln m / d), a universal
   (Donoho–Johnstone) threshold whose noise level is read from the row's refit residual r_j (per-coordinate noise
   ‖r_j‖/√d; the largest of m pure-noise correlations is about √(2 ln m) of it). The second term is what stops a
   noisy row from counting the atoms the pursuit used to fit its noise.

The per-row counts c_j are averaged: n_active = (1/n) Σ_j c_j, with standard error sd(c)/√n (rows taken as
independent, like ``normalized_loss_se``).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["active_counts", "refit_coefficients", "support_refit", "MERGE_COS", "NOISE_K", "THRESHOLD", "SWEEPS"]

MERGE_COS = 0.7  # cosine above which two support atoms are taken as one split feature
THRESHOLD = 1.0  # in units of λ/2
NOISE_K = 1.5  # times the universal threshold ‖r‖·√(2 ln m / d) of the refit residual r
SWEEPS = 10  # coordinate-descent passes of the support refit
_CHUNK_ELEMS = 1 << 24  # rows per chunk × support² × d bounded to this many elements


@torch.no_grad()
def support_refit(x: Float[Tensor, "n d"], dictionary: Float[Tensor, "m d"], alpha: Float[Tensor, "n m"],
                  sweeps: int = SWEEPS) -> tuple[Tensor, Tensor, Tensor]:
    """Non-negative least squares of each row on its support, padded: ``(beta [n, s], idx [n, s], gram [n, s, s])``
    with s = the largest support size; padded slots have ``beta`` 0 and a zero Gram row."""
    n = x.shape[0]
    s = int((alpha > 0).sum(1).max()) if n and alpha.numel() else 0
    if s == 0:
        z = x.new_zeros(n, 0)
        return z, z.long(), x.new_zeros(n, 0, 0)
    val, idx = alpha.topk(s, dim=1)
    live = val > 0
    atoms = dictionary[idx] * live.unsqueeze(2)  # [n, s, d]
    gram = atoms @ atoms.transpose(1, 2)  # [n, s, s]
    b = (atoms @ x.unsqueeze(2)).squeeze(2)  # [n, s]
    beta = val * live
    diag = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-12)
    for _ in range(int(sweeps)):
        for i in range(s):  # Gauss–Seidel: β_i ← max(0, β_i + (b_i − G_i·β) / G_ii)
            step = (b[:, i] - (gram[:, i, :] * beta).sum(1)) / diag[:, i]
            beta[:, i] = (beta[:, i] + step).clamp_min(0) * live[:, i]
    return beta, idx, gram


@torch.no_grad()
def active_counts(x: Float[Tensor, "n d"], dictionary: Float[Tensor, "m d"], alpha: Float[Tensor, "n m"],
                  lam: float, merge_cos: float = MERGE_COS, threshold: float = THRESHOLD,
                  sweeps: int = SWEEPS, noise_k: float = NOISE_K) -> Float[Tensor, " n"]:
    """Per-row count of active features (module docstring), ``[n]`` in ``x``'s dtype. ``merge_cos`` ≥ 1 turns
    merging off; ``sweeps`` = 0 skips the refit (α itself is thresholded)."""
    out = x.new_zeros(x.shape[0])
    floor = float(threshold) * float(lam) / 2.0
    for sl, beta, _, noise in _refit_chunks(x, dictionary, alpha, merge_cos, sweeps):
        cut = (noise * noise_k).clamp_min(floor) if noise_k > 0 else torch.full_like(noise, floor)
        out[sl] = (beta > cut.unsqueeze(1)).sum(1).to(x.dtype)
    return out


@torch.no_grad()
def refit_coefficients(x: Float[Tensor, "n d"], dictionary: Float[Tensor, "m d"], alpha: Float[Tensor, "n m"],
                       merge_cos: float = MERGE_COS, sweeps: int = SWEEPS) -> tuple[Tensor, Tensor]:
    """Steps 1–2 of the module docstring, for other thresholds than step 3's: ``(beta [n, m], noise [n])``, the
    refit coefficients with merged (dominated) atoms set to 0, and each row's noise level ‖r_j‖·√(2 ln m / (d − s_j))
    (step 3 counts β_ij > max(threshold·λ/2, noise_k·noise_j))."""
    beta_full = x.new_zeros(alpha.shape)
    noise_full = x.new_zeros(x.shape[0])
    for sl, beta, idx, noise in _refit_chunks(x, dictionary, alpha, merge_cos, sweeps):
        beta_full[sl] = beta_full[sl].scatter(1, idx, beta)
        noise_full[sl] = noise
    return beta_full, noise_full


def _refit_chunks(x: Tensor, dictionary: Tensor, alpha: Tensor, merge_cos: float, sweeps: int):
    """Yield ``(rows, beta [r, s], idx [r, s], noise [r])`` per chunk of rows: the support refit, dominated atoms'
    β set to 0 (a dominated atom is not counted whatever the cut: the atom that dominates it is larger), and the
    row's noise level (from the residual of the refit before merging)."""
    n = x.shape[0]
    if n == 0 or alpha.shape[1] == 0:
        return
    # rows sorted by support size, so that a few long supports do not shrink every chunk (each is padded to its
    # largest support)
    order = (alpha > 0).sum(1).argsort()
    s_sorted = (alpha > 0).sum(1)[order].tolist()
    m, d = dictionary.shape
    start = 0
    while start < n:
        end = start + _rows_for(s_sorted[start], d)
        end = min(n, start + _rows_for(s_sorted[min(end, n) - 1], d))
        sl = order[start:end]
        start = end
        beta, idx, gram = support_refit(x[sl], dictionary, alpha[sl], sweeps)
        if beta.shape[1] == 0:
            continue
        resid = x[sl] - (beta.unsqueeze(1) @ dictionary[idx]).squeeze(1)
        dof = (d - (beta > 0).sum(1)).clamp_min(1).to(x.dtype)  # the refit fits s of the d noise directions
        noise = resid.norm(dim=1) * (2 * math.log(max(m, 2)) / dof).sqrt()
        if merge_cos < 1.0:
            norms = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-12).sqrt()
            cos = gram / (norms.unsqueeze(2) * norms.unsqueeze(1))
            pos = torch.arange(beta.shape[1], device=beta.device)
            # j dominates i: near atom (cos > merge_cos), alive, and larger (ties broken by position)
            larger = (beta.unsqueeze(1) > beta.unsqueeze(2)) | (
                (beta.unsqueeze(1) == beta.unsqueeze(2)) & (pos.view(1, 1, -1) < pos.view(1, -1, 1)))
            dominated = ((cos > merge_cos) & (beta > 0).unsqueeze(1) & larger).any(2)
            beta = beta.masked_fill(dominated, 0.0)
        yield sl, beta, idx, noise


def _rows_for(support: int, d: int) -> int:
    """Rows per chunk so that a chunk's padded ``[rows, s, max(s, d)]`` tensors stay under ``_CHUNK_ELEMS``."""
    s = max(int(support), 1)
    return max(1, _CHUNK_ELEMS // (s * max(s, d)))
