"""What the metric gives with the *true* dictionary: greedy pursuit on the paper's synthetic data, no learning.

    python examples/true_dictionary.py            # d=256, a=8,16,32, σ=0.1 and σ=0

λ follows the paper's adaptive rule (three rounds of λ ← 0.1 × mean max coefficient). The gap between the printed
normalized loss and a/2 is what the greedy pursuit itself adds (it codes the noise too), before any learning error.
"""

from __future__ import annotations

import argparse

from tl_sparsity import greedy_pursuit, sparsity_metrics
from tl_sparsity.coding.synthetic import SparseLinear


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--a", default="8,16,32")
    p.add_argument("--n", type=int, default=2048, help="samples")
    args = p.parse_args(argv)
    print(f"# true dictionary (4d features), d={args.d}, {args.n} samples")
    print("| a | sigma | truth a/2 | normalized loss | S1 | N0 | FVU | mean steps |")
    print("|---|---|---|---|---|---|---|---|")
    out = []
    for a in [float(v) for v in args.a.split(",")]:
        for sigma in (0.1, 0.0):
            src = SparseLinear(args.d, a, sigma=sigma, seed=1)
            x = src.sample(args.n)
            lam = 0.05
            for _ in range(3):
                lam = 0.1 * float(greedy_pursuit(x, src.features, lam, max_steps=4096).max(1).values.mean())
            alpha, info = greedy_pursuit(x, src.features, lam, max_steps=4096, return_info=True)
            m = sparsity_metrics(x, src.features, alpha, lam)
            print(f"| {a:g} | {sigma:g} | {a / 2:g} | {m['normalized_loss']:.2f} ± {m['normalized_loss_se']:.2f} | "
                  f"{m['coef_norm']:.2f} | {m['nnz']:.1f} | {m['fvu']:.3f} | {float(info.steps.float().mean()):.0f} |")
            out.append(dict(m, a=a, sigma=sigma))
    return out


if __name__ == "__main__":
    main()
