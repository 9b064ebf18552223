"""The pursuit kernel against an earlier version of it, side by side on one GPU: same inputs, alternating timings,
and a check that the codes and step counts are bit for bit equal.

    git show 58e19c6:tl_sparsity/kernels.py > /tmp/kernels_58e19c6.py      # the two-chunk kernel of stop 12
    PYTHONPATH=$PWD python benchmarks/bench_kernel_ab.py --old /tmp/kernels_58e19c6.py --n 4096,16384

A dictionary is trained on synthetic rows first (``bench_pursuit.train_dictionary``: d = 768, a = 16, 2^22 rows by
default); G and xΦᵀ are formed once by this version's functions and handed to both kernels. Rows: the old kernel,
this one with its default register cap, and this one uncapped (``maxnreg=0``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys

import torch

import bench_pursuit as B
from tl_sparsity.coding import kernels as K


def load_old(path: str):
    """The old ``kernels.py`` as a module (its package-relative import of ``.pursuit`` made absolute)."""
    source = open(path).read().replace("from .pursuit import", "from tl_sparsity.coding.pursuit import")
    spec = importlib.util.spec_from_loader("kernels_old", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels_old"] = module  # Triton resolves the kernel's globals through its module
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="path of an earlier tl_sparsity/kernels.py (git show REV:...)")
    p.add_argument("--n", default="4096,16384", help="rows per launch")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--a", type=float, default=16)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-tokens", type=int, default=1 << 22)
    args = p.parse_args()
    old = load_old(args.old)
    dev = torch.device("cuda")
    sizes = [int(v) for v in args.n.split(",")]
    targs = argparse.Namespace(sigma=0.1, train_device=None, n=max(sizes), train_tokens=args.train_tokens)
    _, coder, x, _ = B.train_dictionary(args.d, args.a, dev, targs)
    phi, lam, cap = coder.dictionary_, coder.lam_, coder._cap
    print(f"device {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; d={args.d}, m={phi.shape[0]}, "
          f"a={args.a:g}, λ={lam:.4f}")
    G, gdiag, gscale = K.gram_matrix(phi)
    for n in sizes:
        xs = x[:n]
        c0, cs = K.correlations(xs, phi, scaled=False)
        order = torch.argsort(xs.norm(dim=1), descending=True).to(torch.int32)
        runs = {"old": lambda b: old.launch(b, G, gdiag, gscale, lam, cap, order=order, cscale=cs),
                "new": lambda b: K.launch(b, G, gdiag, gscale, lam, cap, order=order, cscale=cs),
                "new, uncapped": lambda b: K.launch(b, G, gdiag, gscale, lam, cap, order=order, cscale=cs, maxnreg=0)}
        bufs = {k: torch.empty_like(c0) for k in runs}
        out = {}
        for k, run in runs.items():
            bufs[k].copy_(c0)
            out[k] = run(bufs[k])
        same_codes = all(torch.equal(bufs["old"], bufs[k]) for k in runs)
        same_steps = all(torch.equal(out["old"][0], out[k][0]) for k in runs)
        regs = ", ".join(f"{k} {getattr(out[k][2], 'n_regs', -1)}" for k in runs)
        print(f"\nn={n}: codes bit for bit equal: {same_codes}; step counts equal: {same_steps}; mean steps "
              f"{out['new'][0].double().mean():.1f}; registers: {regs}")
        t_copy = B.timeit(lambda: bufs["old"].copy_(c0), dev, reps=args.reps)  # each run first restores c
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):  # alternate
            for k, run in runs.items():
                t = B.timeit(lambda k=k, run=run: (bufs[k].copy_(c0), run(bufs[k])), dev, reps=args.reps)
                times[k].append(t - t_copy)
        for k in runs:
            med = statistics.median(times[k])
            print(f"  {k:14s}: {med * 1e3:.3f} ms = {n / med / 1e6:.2f} M rows/s (rounds: "
                  f"{', '.join(f'{n / t / 1e6:.2f}' for t in times[k])}); "
                  f"{statistics.median(times['old']) / med:.3f}x the old kernel")


if __name__ == "__main__":
    main()
