"""Why the isotropic-Cauchy control of the paper's Fig. 1b comes out above the Gaussian, at small scale on the CPU.

    python benchmarks/cauchy_study.py                       # d=32, 200k rows, seeds 0,1,2 (≈ 7 min, 1 core)
    python benchmarks/cauchy_study.py --d 64 --tokens 150000 --sources gaussian,cauchy --caps 4,64,inf --seeds 0,1
                                                            # ≈ 7 min; the first-batch/∞ runs dominate
    python benchmarks/cauchy_study.py --sources gaussian,cauchy --centre first-batch,none --caps 4,16,64,inf

For every (data set, normaliser, step cap, seed) an ``OnlineSparseCoder`` (dictionary 8d, default λ rule with
``--warmup-tokens``, default batch size) is trained on ``--tokens`` rows of a ``tl_sparsity.coding.synthetic`` source and
evaluated on its held-out reservoir with ``evaluate()``. Factors:

* ``--caps``: ``max_steps`` as a multiple of d (``inf`` = 10⁶ steps, i.e. run to the paper's stopping rule);
* ``--centre``: ``first-batch`` is the learner's normaliser (subtract the first batch's mean, divide by its average
  norm); ``none`` keeps the mean at 0 — the sources are already exactly centred (their population mean is 0 by
  construction), and a Cauchy sample mean does not converge, so re-centring with it shifts every row by a random
  vector as long as the typical row. ``none`` is the learner's ``center=False``.

Columns: L_norm ± s.e. (held-out, learner's λ), S₁, N₀, FVU, λ, λ / (0.1 × held-out mean max coefficient) (1 when
the frozen λ equals the paper's rule on the evaluation rows), rows capped in training and on the held-out rows,
the share of the held-out loss Σ_j loss_j (and of Σ_j max_i α_ij, the denominator of S₁ and L_norm) carried by the 1 %
largest-norm rows, S₁ within held-out norm quantiles 0–50 / 50–90 / 90–99 / 99–100 % (a row of norm R is coded with
an effective penalty λ/R), the per-row mean of ‖α_j‖₁ / max_i α_ij over coded rows (a reading of S₁ the paper does not
use, for comparison), and L_norm with λ re-fit on the held-out rows (λ ← 0.1·mean max coefficient, 3 rounds, same
dictionary). The last block averages over seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding.metrics import sparsity_metrics
from tl_sparsity.coding.backend import greedy_pursuit
from tl_sparsity.coding.synthetic import Gaussian, IsotropicCauchy, Rademacher, SparseLinear

UNLIMITED = 10**6


def make_source(name: str, d: int, seed: int):
    if name.startswith("sparse"):
        return SparseLinear(d, float(name.split("=")[1]), sigma=0.1, seed=seed)
    return {"gaussian": Gaussian, "cauchy": IsotropicCauchy, "rademacher": Rademacher}[name](d, seed=seed)


def study(name: str, centre: str, cap_mult: float, seed: int, d: int, tokens: int, warmup: int) -> dict:
    cap = UNLIMITED if math.isinf(cap_mult) else int(cap_mult * d)
    coder = OnlineSparseCoder(expansion=8, seed=seed, max_steps=cap, warmup_tokens=warmup,
                              center=centre == "first-batch", massive_ratio=None)
    t0 = time.perf_counter()
    for x in make_source(name, d, seed).batches(tokens, chunk=16384):
        coder.partial_fit(x)
    ev = coder.evaluate()
    h, phi = coder.heldout_, coder.dictionary_
    alpha, info = greedy_pursuit(h, phi, coder.lam_, max_steps=cap, return_info=True)
    resid = (h - alpha @ phi).pow(2).sum(1)
    loss = resid + coder.lam_ * alpha.sum(1)
    order = torch.argsort(h.norm(dim=1))
    top = order[-max(1, h.shape[0] // 100):]
    l1, mx = alpha.sum(1), alpha.max(dim=1).values
    buckets = [order[int(lo * len(order)):int(hi * len(order))] for lo, hi in ((0, .5), (.5, .9), (.9, .99), (.99, 1))]
    s1_by_norm = "/".join(f"{float(l1[b].sum() / mx[b].sum()):.1f}" if float(mx[b].sum()) > 0 else "—"
                          for b in buckets)
    coded = mx > 0
    lam = coder.lam_
    for _ in range(3):  # the paper's adaptive rule, on the evaluation rows with the learned dictionary
        lam = 0.1 * float(greedy_pursuit(h, phi, lam, max_steps=cap).max(dim=1).values.mean())
    refit = sparsity_metrics(h, phi, greedy_pursuit(h, phi, lam, max_steps=cap), lam)
    return dict(
        name=name, centre=centre, cap=cap_mult, seed=seed, lnorm=ev["normalized_loss"], se=ev["normalized_loss_se"],
        s1=ev["coef_norm"], n0=ev["nnz"], fvu=ev["fvu"], lam=coder.lam_, lam_rule=coder.lam_ / (0.1 * ev["max_coef"]),
        capped=coder.capped_, capped_eval=info.capped, top1=float(loss[top].sum() / loss.sum()),
        lnorm_refit=refit["normalized_loss"], s1_by_norm=s1_by_norm, max_top1=float(mx[top].sum() / mx.sum()),
        s1_per_row=float((l1[coded] / mx[coded]).mean()), mean_shift=float(coder.mean_.norm()) / coder.scale_,
        seconds=time.perf_counter() - t0,
    )


def _cap(c: float) -> str:
    return "∞" if math.isinf(c) else f"{c:g}d"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--warmup-tokens", type=int, default=None, help="λ adapts during these rows (default tokens/2)")
    p.add_argument("--sources", default="sparse a=5,gaussian,cauchy")
    p.add_argument("--centre", default="first-batch,none")
    p.add_argument("--caps", default="4,16,64,inf", help="max_steps as multiples of d; inf = run to convergence")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warmup = args.warmup_tokens if args.warmup_tokens is not None else args.tokens // 2
    caps = [float(c) for c in args.caps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# d={args.d}, dictionary 8d, {args.tokens} rows, λ adapts for {warmup} rows, seeds {seeds}, "
          f"{torch.get_num_threads()} thread(s)")
    print("| data | centre | cap | seed | L_norm | S1 | N0 | FVU | λ | λ/rule | capped train | capped eval | "
          "top-1% share loss / Σmax | S1 by norm quantile | per-row S1 | L_norm λ re-fit | mean shift | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.sources.split(","):
        for centre in args.centre.split(","):
            if name != "cauchy" and centre == "none" and len(args.centre.split(",")) > 1:
                continue  # the other sources' sample mean is ≈ 0: centring changes nothing
            for cap in caps:
                for seed in seeds:
                    r = study(name, centre, cap, seed, args.d, args.tokens, warmup)
                    rows.append(r)
                    print(f"| {name} | {centre} | {_cap(cap)} | {seed} | {r['lnorm']:.2f} ± {r['se']:.2f} | "
                          f"{r['s1']:.2f} | {r['n0']:.1f} | {r['fvu']:.4f} | {r['lam']:.4f} | {r['lam_rule']:.2f} | "
                          f"{r['capped']} | {r['capped_eval']} | {r['top1']:.2f} / {r['max_top1']:.2f} | {r['s1_by_norm']} | "
                          f"{r['s1_per_row']:.2f} | {r['lnorm_refit']:.2f} | "
                          f"{r['mean_shift']:.3f} | {r['seconds']:.0f} |", flush=True)
    print("\n## mean over seeds (± spread = s.d. over seeds)\n")
    print("| data | centre | cap | L_norm | S1 | FVU | capped train (sum) | per-row S1 | L_norm λ re-fit |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = list(dict.fromkeys((r["name"], r["centre"], r["cap"]) for r in rows))
    for k in keys:
        g = [r for r in rows if (r["name"], r["centre"], r["cap"]) == k]
        ln = [r["lnorm"] for r in g]
        sd = statistics.stdev(ln) if len(ln) > 1 else float("nan")
        rf = [r["lnorm_refit"] for r in g]
        print(f"| {k[0]} | {k[1]} | {_cap(k[2])} | {statistics.mean(ln):.2f} ± {sd:.2f} | "
              f"{statistics.mean(r['s1'] for r in g):.2f} | {statistics.mean(r['fvu'] for r in g):.4f} | "
              f"{sum(r['capped'] for r in g)} | {statistics.mean(r['s1_per_row'] for r in g):.2f} | {statistics.mean(rf):.2f} |")
    return rows


if __name__ == "__main__":
    main()
