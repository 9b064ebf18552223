"""Reproduce the paper's synthetic validation (Fig. 1a): normalized loss of sparse-linear data vs the truth a/2.

    python examples/reproduce_paper.py                 # main setting: d=256, σ=0.1, dictionary 8d
    python examples/reproduce_paper.py --quick         # small and fast (the test suite runs this)
    python examples/reproduce_paper.py --device cuda --a 2,4,8,16,32,64,128,512

Prints one row per a: the measured normalized loss (± standard error on held-out rows), S₁, N₀, FVU, the truth a/2,
the relative error, and the paper's value (digitised from its Fig. 1a, ±2–3 %).
"""

from __future__ import annotations

import argparse
import time

import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.synthetic import SparseLinear

PAPER_FIG1A = {2: 2.17, 4: 2.94, 8: 4.73, 16: 8.21, 32: 16.1, 64: 26.3, 128: 31.8, 512: 37.4}


def run(d: int, a: float, tokens: int, expansion: float, device: str, seed: int, **opts) -> dict:
    src = SparseLinear(d, a, sigma=opts.pop("sigma"), seed=seed)
    coder = OnlineSparseCoder(expansion=expansion, seed=seed, device=device, **opts)
    t0 = time.perf_counter()
    for x in src.batches(tokens, chunk=16384):
        coder.partial_fit(x.to(device))
    ev = coder.evaluate()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ev.update(seconds=time.perf_counter() - t0, lam=coder.lam_, capped=coder.capped_, n_tokens=coder.n_tokens_)
    return ev


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--a", default="8,16,32", help="comma-separated expected numbers of active features")
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--tokens", type=int, default=1_000_000, help="training rows streamed per data set")
    p.add_argument("--expansion", type=float, default=8)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-tokens", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="d=64, a=4,8, 60k rows: a smoke run for the tests")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.a, args.tokens = 64, "4,8", 60_000
    opts = {k: v for k, v in dict(batch_size=args.batch_size, lr=args.lr, warmup_tokens=args.warmup_tokens).items()
            if v is not None}
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# synthetic sparse-linear data: d={args.d}, sigma={args.sigma}, dictionary {args.expansion:g}d, "
          f"{args.tokens} rows per data set, device {name}, options {opts or 'defaults'}")
    print("| a | truth a/2 | normalized loss | rel. error | paper | S1 | N0 | FVU | lambda | capped | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for a in [float(v) for v in args.a.split(",")]:
        ev = run(args.d, a, args.tokens, args.expansion, args.device, args.seed, sigma=args.sigma, **opts)
        truth = a / 2
        rel = ev["normalized_loss"] / truth - 1
        paper = PAPER_FIG1A.get(int(a)) if args.d == 256 and args.sigma == 0.1 else None
        print(f"| {a:g} | {truth:g} | {ev['normalized_loss']:.3f} ± {ev['normalized_loss_se']:.3f} | {rel:+.1%} | "
              f"{paper if paper is not None else '—'} | {ev['coef_norm']:.3f} | {ev['nnz']:.1f} | {ev['fvu']:.4f} | "
              f"{ev['lam']:.4f} | {ev['capped']} | {ev['seconds']:.1f} |", flush=True)
        out.append(dict(ev, a=a, truth=truth, rel_error=rel))
    return out


if __name__ == "__main__":
    main()
