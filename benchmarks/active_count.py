"""Validation study of ``n_active`` (docs/active.md): planted sparse-linear data with a known number k of active
features per sample, coded with the true dictionary or a learned one, read by normalized loss, S₁, N₀ and n_active.

    python benchmarks/active_count.py --quick                       # d = 64, one law, two k, a few seconds (the test)
    python benchmarks/active_count.py --dict true                   # d ∈ {64, 256}, every k, σ, law
    python benchmarks/active_count.py --dict learned --d 64 --laws uniform,exponential --ks 4,16

Data: ``SparseLinear(d, a=k, sigma, law)`` (4d features uniform on the sphere, each active with probability k/4d,
coefficient law ``law``; noise at the uniform law's signal-to-noise ratio). True dictionary: the planted features
code the *uncentred* rows (centring would add a dense mean direction); λ = 0.1 · mean max α after three rounds of
the paper's adaptive rule; the greedy pursuit. Learned: ``OnlineSparseCoder(d, seed=0)`` fed ``--tokens`` rows, then
``evaluate()`` on ``--n`` fresh rows (its own centring, λ and pursuit). Relative errors are against k.
"""

from __future__ import annotations

import argparse
import time

import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding.active import active_counts
from tl_sparsity.coding.metrics import sparsity_metrics
from tl_sparsity.coding.pursuit import greedy_pursuit_torch
from tl_sparsity.coding.synthetic import COEF_LAWS, SparseLinear


def true_dictionary_metrics(src: SparseLinear, n: int) -> dict[str, float]:
    x = src.sample(n) + src.shift / src.scale  # uncentred rows: an exact non-negative combination plus noise
    phi, lam = src.features, 0.1
    for _ in range(3):
        alpha = greedy_pursuit_torch(x, phi, lam)
        lam = 0.1 * float(alpha.max(1).values.mean())
    alpha = greedy_pursuit_torch(x, phi, lam)
    m = sparsity_metrics(x, phi, alpha, lam)
    c = active_counts(x, phi, alpha, lam).double()
    m["n_active"], m["n_active_se"] = float(c.mean()), float(c.std() / len(c) ** 0.5)
    return m


def learned_metrics(src: SparseLinear, n: int, tokens: int) -> dict[str, float]:
    coder = OnlineSparseCoder(src.d, seed=0)
    for chunk in src.batches(tokens, 4096):
        coder.partial_fit(chunk)
    m = coder.evaluate(src.sample(n))
    m["converged"] = float(coder.converged_)
    return m


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d = 64, half-normal law, k ∈ {2, 4}, σ = 0, 256 rows, true dictionary")
    p.add_argument("--dict", choices=("true", "learned"), default="true")
    p.add_argument("--d", default="64,256")
    p.add_argument("--ks", default="1,2,4,8,16,32")
    p.add_argument("--sigmas", default="0,0.1")
    p.add_argument("--laws", default=",".join(COEF_LAWS))
    p.add_argument("--n", type=int, default=2048, help="rows measured per cell")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two studies share 2 cores)")
    p.add_argument("--tokens", type=int, default=200_000, help="rows fed to each learned dictionary")
    a = p.parse_args(argv)
    if a.quick:
        a.d, a.ks, a.sigmas, a.laws, a.n, a.dict = "64", "2,4", "0", "half-normal", 256, "true"
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    print(f"# dictionary: {a.dict}; rows per cell {a.n}" + (f"; {a.tokens} training rows" if a.dict == "learned"
                                                             else ""))
    print("| d | law | σ | k | L_norm (err) | S₁ (err) | N₀ (err) | n_active ± se (err) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = []
    for d in map(int, a.d.split(",")):
        for law in a.laws.split(","):
            for sigma in map(float, a.sigmas.split(",")):
                for k in map(int, a.ks.split(",")):
                    t = time.perf_counter()
                    src = SparseLinear(d, k, sigma=sigma, law=law, seed=1, calibration=4096)
                    m = (true_dictionary_metrics(src, a.n) if a.dict == "true"
                         else learned_metrics(src, a.n, a.tokens))
                    row = {"d": d, "law": law, "sigma": sigma, "k": k, **m}
                    out.append(row)
                    e = {c: 100 * (m[c] / k - 1) for c in ("normalized_loss", "coef_norm", "nnz", "n_active")}
                    print(f"| {d} | {law} | {sigma:g} | {k} | {m['normalized_loss']:.2f} ({e['normalized_loss']:+.0f} %)"
                          f" | {m['coef_norm']:.2f} ({e['coef_norm']:+.0f} %) | {m['nnz']:.2f} ({e['nnz']:+.0f} %) | "
                          f"{m['n_active']:.2f} ± {m['n_active_se']:.2f} ({e['n_active']:+.0f} %) | "
                          f"{time.perf_counter() - t:.1f}" + (" (converged)" if m.get("converged") == 1.0 else
                                                                " (NOT converged)" if "converged" in m else "")
                          + " |", flush=True)
    return out


if __name__ == "__main__":
    main()
