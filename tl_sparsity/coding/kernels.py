"""Fast paths for CUDA: a fused Triton kernel for the greedy pursuit, a fused Adam step, half-precision products.

Imported lazily (by :func:`tl_sparsity.greedy_pursuit` on CUDA float32 tensors); ``triton`` is imported only when a
kernel is launched. Nothing here runs on the CPU except under ``TRITON_INTERPRET=1`` (used by the tests).

The pursuit kernel (:func:`greedy_pursuit_triton`, source in :mod:`tl_sparsity.coding._triton_src`): one program per row
keeps that row's m correlations in registers (m ≤ 32 768, as [RA, T] + [RB, T] chunks, :func:`kernel_shape`, so
m = 6144 needs no padding) and loops argmax → a = c_i* − λ/2 → stop test → α_i* += a → c ← c − a·G[i*] on the chip;
each step reads one row of G = ΦΦᵀ (m values) from L2/HBM. Rows finish independently (longest-norm rows are started
first), there is one launch per call and no host synchronisation, and the row's correlation buffer is reused for its
codes. At d = 768, m = 6144 a step reads 12 KB of float16 G, and that is what bounds the kernel: with float32 G
(twice the bytes, same arithmetic) it runs at half the speed. So the argmax is cut to the bone (reduced within each
thread first, one cross-thread exchange per step) mostly to free registers: 96 per thread, and 72 under the default
cap (:func:`default_maxnreg`), seven rows resident per SM instead of four, more G rows in flight
(``benchmarks/bench_pursuit.py``; against the previous two-chunk kernel, ``benchmarks/bench_kernel_ab.py``: same
codes bit for bit, 1.28× its speed on an H100, 1.18× uncapped).

Precision (defaults): G in float16 (formed from Φ/max|Φ| with float32 accumulation), xΦᵀ from float16 operands with
float32 accumulation — each row of x scaled by its own largest entry before rounding, so one outlier row costs the
other rows no precision — all pursuit arithmetic in float32. Against the float64 reference on trained dictionaries this
keeps the support of ~86–99 % of rows at a ≤ 16 (and ‖Δα‖₁ ≤ 1 % on all of them), and the objective within 4·10⁻³
relative; ``gram_dtype=corr_dtype=torch.float32`` reproduces the reference (≥ 99 % identical supports) at ~half the
speed. Long noise-fitting pursuits (a = 32: ~200 steps) diverge more: identical support on 24–37 % of rows.
"""

from __future__ import annotations

import functools

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .pursuit import STOP_TOL, default_max_steps

__all__ = [
    "MAX_ATOMS",
    "adam_sphere_step",
    "available",
    "correlations",
    "gram_matrix",
    "greedy_pursuit_triton",
    "grouped_codes",
    "phi_products",
]

#: Largest dictionary the register-resident kernel takes (the row of correlations lives in registers).
MAX_ATOMS = 32768
GRAM_DTYPE = torch.float16
CORR_DTYPE = torch.float16


@functools.cache
def available() -> bool:
    """True when Triton imports and a CUDA device is present (the kernel's requirements)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _kernel():
    from ._triton_src import greedy_kernel

    return greedy_kernel


@functools.cache
def _adam_kernel():
    from ._triton_src import adam_sphere_kernel

    return adam_sphere_kernel


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def default_warps(m: int) -> int:
    """Warps per program (one row each): about 48 correlations per thread (measured best at m = 6144: 4 warps, one
    row per program; see ``bench_pursuit.py --variants all``)."""
    return int(min(32, max(4, _next_pow2(-(-int(m) // 1536)))))


def kernel_shape(m: int, num_warps: int | None = None) -> dict:
    """How the kernel holds a row of ``m`` correlations: ``num_warps``, T = 256 × warps columns per chunk row,
    RA (+ RB) chunk rows, powers of two, with masks where RA·T or (RA + RB)·T overshoots m."""
    nw = default_warps(m) if num_warps is None else int(num_warps)
    top = 1 << (int(m).bit_length() - 1)  # the largest power of two ≤ m
    nw = max(1, min(nw, top // 256))  # a chunk row no wider than the row itself (m ≥ 256)
    t = 256 * nw
    r = -(-int(m) // t)
    ra = 1 << (r.bit_length() - 1)
    rb = _next_pow2(r - ra) if r > ra else 1
    return {"num_warps": nw, "T": t, "RA": ra, "RB": rb, "HAS_B": r > ra, "MASK_A": ra * t > m,
            "MASK_B": r > ra and (ra + rb) * t != m}


def default_maxnreg(shape: dict, gram_dtype: torch.dtype = GRAM_DTYPE) -> int | None:
    """Register cap per thread for a :func:`kernel_shape` and G's dtype: 72 when a thread holds 48 correlations
    (m = 6144 at 4 warps) and G is 16-bit, else none (float32 G needs more registers: capped, it spills). The
    kernel is bound by how many G rows are in flight, so more resident rows help as long as nothing spills: at
    m = 6144 (H100, ``bench_pursuit.py --maxnreg``) 96 registers (uncapped, 5 rows per SM) gave
    7.7 M rows/s, 80 → 8.1, 72 (7 rows per SM) → 8.3, 64 spilled → 6.0. At m = 4608 (40 per thread) caps measured
    no steady gain (9.4 uncapped; 8.4–10.3 capped), at m = 24 576 none at all, so they run uncapped."""
    per_thread = 8 * (shape["RA"] + (shape["RB"] if shape["HAS_B"] else 0))
    return 72 if per_thread == 48 and gram_dtype.itemsize == 2 else None


def _half_rows(t: Tensor, dtype: torch.dtype, each_row: bool = False) -> tuple[Tensor, Tensor]:
    """(t / s in ``dtype``, s) with s = max |t_ij| of each matrix (t [n, d] → s [1, 1]; t [k, n, d] → s [k, 1, 1]),
    or with ``each_row`` of each row (s [..., n, 1]): every entry in [−1, 1]; scaled and rounded in one pass. Rows
    of x are scaled each on its own: a batch-wide scale would push the rows next to a 10⁵× outlier into float16's
    subnormal range."""
    dims = -1 if each_row else (-2, -1)
    s = torch.linalg.vector_norm(t, float("inf"), dim=dims, keepdim=True).clamp_min(1e-30)
    return torch.div(t, s, out=torch.empty(t.shape, dtype=dtype, device=t.device)), s


def gram_matrix(dictionary: Float[Tensor, "m d"], dtype: torch.dtype = GRAM_DTYPE,
                half_rows: tuple[Tensor, Tensor] | None = None, with_diag: bool = True
                ) -> tuple[Tensor, Tensor | None, Tensor]:
    """G = ΦΦᵀ for the kernel: ``(G_stored [m, m] in dtype, diag [m] float32, scale [1] float32)``, G = scale·G_stored.

    In half precision G is formed from Φ/s (s = max |Φ_ij|; |G_stored| ≤ d) with float32 accumulation. The float32
    diagonal (read only by ``exact_diag`` launches) is ``None`` unless ``with_diag``.
    """
    diag = (dictionary * dictionary).sum(1) if with_diag else None
    if dtype == torch.float32:
        return dictionary @ dictionary.T, diag, torch.ones(1, device=dictionary.device)
    p, s = half_rows if half_rows is not None and half_rows[0].dtype == dtype else _half_rows(dictionary, dtype)
    return p @ p.T, diag, (s * s).reshape(1)


def correlations(x: Float[Tensor, "n d"], dictionary: Float[Tensor, "m d"], dtype: torch.dtype = CORR_DTYPE,
                 scaled: bool = True, half_rows: tuple[Tensor, Tensor] | None = None
                 ) -> Float[Tensor, "n m"] | tuple[Tensor, Tensor]:
    """c = xΦᵀ in float32 ``[n, m]``; with a half ``dtype`` on CUDA, from half operands (each row of x over its own
    max |x_ij|, Φ/max|Φ|) with float32 accumulation and output. ``scaled=False`` returns ``(c / s, s [1])`` and skips a pass over c."""
    if dtype == torch.float32 or not x.is_cuda:
        c = x @ dictionary.T
        return c if scaled else (c, torch.ones(1, device=x.device))
    p, sp = half_rows if half_rows is not None and half_rows[0].dtype == dtype else _half_rows(dictionary, dtype)
    xs, sx = _half_rows(x, dtype, each_row=True)
    c = torch.mm(xs, p.T, out_dtype=torch.float32).mul_(sx)  # rows back to their own scale
    return c.mul_(sp) if scaled else (c, sp.reshape(1))


def launch(c: Tensor, G: Tensor, gdiag: Tensor, gscale: Tensor, lam: float, cap: int, tol: float = STOP_TOL,
           order: Tensor | None = None, num_warps: int | None = None, cscale: Tensor | None = None,
           exact_diag: bool = False, maxnreg: int | None = None, group: tuple[int, Tensor] | None = None):
    """Run the kernel on correlations ``c`` [n, m] float32 (true correlations = ``cscale``·c; overwritten by α).

    ``exact_diag`` applies the selected atom's own update with ``gdiag`` (float32) instead of G's stored
    diagonal (equal for unit rows: the float16 diagonal is then exactly 1 after scaling). ``maxnreg`` caps the
    registers per thread (default :func:`default_maxnreg`; 0: no cap). ``group=(nper, hf)``: k dictionaries at once —
    row r of ``c`` belongs to dictionary r // nper, whose G is ``G[h]`` (``G`` [k, m, m]), scales ``cscale[h]``,
    ``gscale[h]`` and λ/2 and stop floor ``hf[h]`` ([k, 2] float32; ``lam`` and ``tol`` are then unused).
    Returns (steps int32 [n], capped int8 [n], the compiled kernel — its ``n_regs`` / ``n_spills`` help when tuning).
    """
    n, m = c.shape
    steps = torch.empty(n, dtype=torch.int32, device=c.device)
    capped = torch.empty(n, dtype=torch.int8, device=c.device)
    if n == 0:
        return steps, capped, None
    shape = kernel_shape(m, num_warps)
    maxnreg = default_maxnreg(shape, G.dtype) if maxnreg is None else (int(maxnreg) or None)
    if order is None:
        order = torch.arange(n, device=c.device)
    if cscale is None:
        cscale = torch.ones(1, device=c.device)
    compiled = _kernel()[(n,)](
        c, cscale, G, gdiag, gscale, steps, capped, order, float(lam) / 2.0, float(tol) * float(lam) / 2.0,
        int(cap), 1 if group is None else int(group[0]), gscale if group is None else group[1], M=m,
        EXACT_DIAG=bool(exact_diag), GROUPED=group is not None, **shape,
        **({} if maxnreg is None else {"maxnreg": maxnreg}))
    return steps, capped, compiled


@torch.no_grad()
def greedy_pursuit_triton(
    x: Float[Tensor, "n d"],
    dictionary: Float[Tensor, "m d"],
    lam: float,
    max_steps: int | None = None,
    gram: Float[Tensor, "m m"] | None = None,
    tol: float = STOP_TOL,
    gram_dtype: torch.dtype = GRAM_DTYPE,
    corr_dtype: torch.dtype = CORR_DTYPE,
    sort_rows: bool = True,
    num_warps: int | None = None,
) -> tuple[Float[Tensor, "n m"], Int[Tensor, " n"], Tensor]:
    """The greedy pursuit of :func:`tl_sparsity.greedy_pursuit` in one fused kernel launch (no host sync).

    Args: as :func:`tl_sparsity.greedy_pursuit`; ``gram`` may be float32 or already ``gram_dtype``.
    ``sort_rows`` starts the rows with the largest norm (most steps, usually) first, which shortens the tail.

    Returns ``(alpha [n, m] float32, steps [n] int32, capped [n] bool)`` on the device of ``x``.
    """
    m = dictionary.shape[0]
    if m > MAX_ATOMS:
        raise ValueError(f"the Triton pursuit holds at most {MAX_ATOMS} atoms per row; got m={m}. "
                         "Use backend='torch'.")
    cap = default_max_steps(x.shape[1]) if max_steps is None else int(max_steps)
    x = x.contiguous().float()
    dictionary = dictionary.contiguous().float()
    half = _half_rows(dictionary, corr_dtype) if x.is_cuda and corr_dtype != torch.float32 else None
    if gram is None:
        G, _, gscale = gram_matrix(dictionary, gram_dtype, half, with_diag=False)
        gdiag = gscale  # not read: the default launch takes G's own diagonal
    else:
        gdiag = gram.diagonal().float().contiguous()
        if gram.dtype == gram_dtype:
            G, gscale = gram.contiguous(), torch.ones(1, device=x.device)
        else:  # |G_ij| ≤ max_i G_ii for a Gram matrix: scale into [−1, 1]
            s = gdiag.amax().clamp_min(1e-30)
            G, gscale = (gram / s).to(gram_dtype).contiguous(), s.reshape(1)
    c, cscale = correlations(x, dictionary, corr_dtype, scaled=False, half_rows=half)  # c becomes α in place
    order = torch.argsort(x.norm(dim=1), descending=True) if sort_rows else None
    steps, capped, _ = launch(c.contiguous(), G, gdiag, gscale.float(), lam, cap, tol, order, num_warps, cscale)
    return c, steps, capped.view(torch.bool)


@torch.no_grad()
def grouped_codes(x: Float[Tensor, "k n d"], dictionaries: Float[Tensor, "k m d"], hf: Float[Tensor, "k 2"],
                  cap: int) -> tuple[Float[Tensor, "k n m"], Tensor]:
    """The pursuit of k row sets against k dictionaries of one shape in one launch of each kind (two batched GEMMs,
    one sort, one kernel), as :func:`greedy_pursuit_triton` with its defaults does for each set alone.

    ``x`` [k, n, d] float32 CUDA (rows past a set's own count are zero: they take no step and get α = 0),
    ``dictionaries`` [k, m, d], ``hf`` [k, 2] = (λ_h/2, STOP_TOL·λ_h/2) on the device. Returns
    ``(alpha [k, n, m] float32, capped [k, n] bool)``.
    """
    k, n, d = x.shape
    m = dictionaries.shape[1]
    if m > MAX_ATOMS:
        raise ValueError(f"the Triton pursuit holds at most {MAX_ATOMS} atoms per row; got m={m}.")
    p, s = _half_rows(dictionaries, GRAM_DTYPE)  # s [k, 1, 1]
    G = torch.bmm(p, p.transpose(1, 2))  # [k, m, m] float16, float32 accumulation
    xs, sx = _half_rows(x, CORR_DTYPE, each_row=True)  # sx [k, n, 1]
    c = torch.bmm(xs, p.transpose(1, 2), out_dtype=torch.float32).mul_(sx).view(k * n, m)
    # Hook-major order, longest rows first within each set: the programs running at any moment then read the G of
    # one or two sets, which keeps their rows in L2 (all sets' rows sorted together ran slower than one at a time).
    order = (torch.argsort(x.norm(dim=2), dim=1, descending=True) + torch.arange(0, k * n, n, device=x.device)[:, None])
    order = order.view(k * n)
    gscale = (s * s).view(k)
    _, capped, _ = launch(c, G, gscale, gscale, 0.0, cap, order=order, cscale=s.view(k), group=(n, hf))
    return c.view(k, n, m), capped.view(torch.bool).view(k, n)


@torch.no_grad()
def phi_products(x: Float[Tensor, "*k n d"], alpha: Float[Tensor, "*k n m"], dictionary: Float[Tensor, "*k m d"],
                 dtype: torch.dtype = torch.bfloat16, scale: Tensor | None = None
                 ) -> tuple[Float[Tensor, "*k n d"], Float[Tensor, "*k m d"]]:
    """The Φ-step's two products: ``(resid = x − αΦ, grad = scale·αᵀ·resid)``, float32, for one row set ([n, d],
    [n, m], [m, d]) or k sets at once ([k, n, d], [k, n, m], [k, m, d]; ``scale`` then [k]). Default scale −2/n.

    On CUDA both take ``dtype`` operands (bfloat16: no range issue, 2⁻⁹ relative rounding per operand — about 1 % of
    the residual, far below the noise of a stochastic gradient) with float32 accumulation; elsewhere float32.
    """
    batched = x.ndim == 3
    if not x.is_cuda or dtype == torch.float32:
        resid = x - alpha @ dictionary
        grad = alpha.transpose(-1, -2) @ resid
    else:
        a16 = alpha.to(dtype)
        mm = torch.bmm if batched else torch.mm
        resid = x - mm(a16, dictionary.to(dtype), out_dtype=torch.float32)
        grad = mm(a16.transpose(-1, -2), resid.to(dtype), out_dtype=torch.float32)
    if scale is None:
        return resid, grad.mul_(-2.0 / x.shape[-2])
    return resid, grad.mul_(scale.reshape(-1, 1, 1) if batched else scale)


@torch.no_grad()
def adam_sphere_step(phi: Float[Tensor, "m d"], grad: Float[Tensor, "m d"], mom: Float[Tensor, "m d"],
                     var: Float[Tensor, "m d"], lr: float, step: int, grad_scale: float = 1.0,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam step on unit-norm rows, in place and in one kernel launch, the learner's Φ-step arithmetic:
    g ← grad_scale·grad projected tangent to each row; Adam moments (``step`` = t ≥ 1, bias-corrected);
    φ ← φ − lr·m̂/(√v̂ + eps); rows renormalised. All four tensors ``[m, d]`` float32 contiguous, same device."""
    m, d = phi.shape
    b1, b2 = betas
    block_d = _next_pow2(d)
    _adam_kernel()[(m,)](phi, grad, mom, var, m, d, float(grad_scale), float(lr) / (1 - b1**step), b1, b2, eps,
                         1 - b2**step, ROWS=1, BLOCK_D=block_d, num_warps=max(1, min(8, block_d // 256)))
