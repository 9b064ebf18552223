"""The Triton source of :mod:`tl_sparsity.coding.kernels` (imports ``triton``: imported only when a kernel is launched).

At module level so that the kernels' helper functions resolve as globals, in compiled and interpreted
(``TRITON_INTERPRET=1``) runs alike.
"""

import triton
import triton.language as tl


@triton.jit
def _lex_max(v1, i1, v2, i2):
    # The larger value, on a tie the smaller index (as torch.argmax). Commutative, so every thread of a program
    # agrees on the result whatever order Triton combines in; within a thread the index test is constant-folded.
    keep = (v1 > v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(keep, v1, v2), tl.where(keep, i1, i2)

@triton.jit
def _argmax(ca, cb, HAS_B: tl.constexpr, RA: tl.constexpr, RB: tl.constexpr, T: tl.constexpr):
    """(max, index of its first occurrence) over the row held as ``ca`` [RA, T] and ``cb`` [RB, T] (see
    ``greedy_kernel``). Axis 0 is reduced first, within each thread, carrying the chunk row as a small constant (no
    per-thread index registers: 96 instead of 134 registers, 5 programs per SM instead of 3); the shuffles and the
    cross-warp exchange then run once per step, on T candidates, for both chunks together."""
    v, r = tl.reduce((ca, tl.broadcast_to(tl.arange(0, RA)[:, None], (RA, T))), 0, _lex_max)
    col = tl.arange(0, T)
    i = r * T + col
    if HAS_B:
        vb, rb = tl.reduce((cb, tl.broadcast_to(tl.arange(0, RB)[:, None], (RB, T))), 0, _lex_max)
        v, i = _lex_max(v, i, vb, (RA + rb) * T + col)
    return tl.reduce((v, i), 0, _lex_max)


@triton.jit
def _load(ptr, mask, other, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=other)
    return tl.load(ptr)

@triton.jit
def greedy_kernel(C, CSCALE, G, GDIAG, GSCALE, STEPS, CAPPED, ORDER, half, floor, cap, NPER, HF, M: tl.constexpr,
                  T: tl.constexpr, RA: tl.constexpr, RB: tl.constexpr, HAS_B: tl.constexpr,
                  MASK_A: tl.constexpr, MASK_B: tl.constexpr, EXACT_DIAG: tl.constexpr, GROUPED: tl.constexpr):
    # One row per program. Its M correlations live in registers as [RA, T] (columns 0 .. RA·T) and, with
    # HAS_B, [RB, T] (the rest, masked past M when MASK_B; RA, RB powers of two). T = 256 × warps, so each
    # thread holds 8 consecutive columns of every chunk row (one 16-byte load of float16 G) and axis 0 never
    # crosses threads. The codes α overwrite the row of C. GROUPED: rows [h·NPER, (h+1)·NPER) belong to dictionary h,
    # whose G is G[h] ([M, M]), scales CSCALE[h], GSCALE[h], and λ/2 and the stop floor HF[h, 0:2].
    row = tl.load(ORDER + tl.program_id(0)).to(tl.int64)
    if GROUPED:
        h = row // NPER
        G = G + h * M * M
        GDIAG = GDIAG + h * M
        CSCALE = CSCALE + h
        GSCALE = GSCALE + h
        half = tl.load(HF + 2 * h)
        floor = tl.load(HF + 2 * h + 1)
    oa = tl.arange(0, RA)[:, None] * T + tl.arange(0, T)[None, :]
    ob = RA * T + tl.arange(0, RB)[:, None] * T + tl.arange(0, T)[None, :]
    ma = oa < M
    mb = ob < M
    base = C + row * M
    cscale = tl.load(CSCALE)  # c is stored divided by this (half-precision products are scaled into range)
    gscale = tl.load(GSCALE)
    ca = _load(base + oa, ma, float("-inf"), MASK_A) * cscale
    cb = _load(base + ob, mb, float("-inf"), MASK_B) * cscale if HAS_B else ca
    val, idx = _argmax(ca, cb, HAS_B, RA, RB, T)
    # Every thread has its values (the reductions above consumed them): the row can now hold α.
    tl.debug_barrier()
    tl.store(base + oa, tl.zeros([RA, T], dtype=tl.float32), mask=ma)
    if HAS_B:
        tl.store(base + ob, tl.zeros([RB, T], dtype=tl.float32), mask=mb)
    tl.debug_barrier()  # the zeros are written before the first atomic add
    a = val - half
    k = 0
    act = (a > floor) & (k < cap)
    while act:
        tl.atomic_add(base + idx, a, sem="relaxed")  # a reduction the thread does not wait for
        grow = G + idx.to(tl.int64) * M
        s = a * gscale
        ga = _load(grow + oa, ma, 0.0, MASK_A).to(tl.float32)
        if EXACT_DIAG:  # the selected atom's own update with its float32 squared norm
            new = val - a * tl.load(GDIAG + idx)
            ca = tl.where(oa == idx, new, ca - s * ga)
        else:
            ca = ca - s * ga
        if HAS_B:
            gb = _load(grow + ob, mb, 0.0, MASK_B).to(tl.float32)
            if EXACT_DIAG:
                cb = tl.where(ob == idx, val - a * tl.load(GDIAG + idx), cb - s * gb)
            else:
                cb = cb - s * gb
        k += 1
        val, idx = _argmax(ca, cb, HAS_B, RA, RB, T)
        a = val - half
        act = (a > floor) & (k < cap)
    tl.store(STEPS + row, k)
    tl.store(CAPPED + row, (a > floor).to(tl.int8))


@triton.jit
def adam_sphere_kernel(PHI, GRAD, MOM, VAR, m, d, gscale, lr_t, b1, b2, eps, bc2,
                       ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    o = tl.arange(0, BLOCK_D)
    msk = (r < m)[:, None] & (o < d)[None, :]
    off = r[:, None] * d + o[None, :]
    phi = tl.load(PHI + off, mask=msk, other=0.0)
    g = tl.load(GRAD + off, mask=msk, other=0.0) * gscale
    g = g - tl.sum(g * phi, axis=1)[:, None] * phi  # tangent to the unit sphere
    mo = b1 * tl.load(MOM + off, mask=msk, other=0.0) + (1 - b1) * g
    va = b2 * tl.load(VAR + off, mask=msk, other=0.0) + (1 - b2) * g * g
    phi = phi - lr_t * mo / (tl.sqrt(va / bc2) + eps)
    nrm = tl.sqrt(tl.sum(phi * phi, axis=1))[:, None]
    phi = phi / tl.where(nrm > 0, nrm, 1.0)
    tl.store(PHI + off, phi, mask=msk)
    tl.store(MOM + off, mo, mask=msk)
    tl.store(VAR + off, va, mask=msk)
