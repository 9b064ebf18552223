"""Soak test: stream many synthetic tokens through four hooks' learners on CPU and watch memory stay flat.

Four :class:`tl_sparsity.OnlineSparseCoder` (one per "hook") each take ``--tokens`` rows from their own synthetic
source (the paper's sparse-linear data at several sparsities, and a Gaussian control), in chunks that are not a
multiple of the batch, so rows also wait in the pending buffer. At every million tokens each learner is evaluated on
its held-out reservoir and saved (atomically) to a temporary folder, so evaluation and checkpoint I/O soak too.
Defaults (d = 64, expansion 2, at most 32 greedy steps per row) keep 10 M rows × 4 hooks to about a quarter of an
hour on one CPU thread; memory, not quality, is under test here.

Prints peak RSS (``getrusage``'s high-water mark) and current RSS at every million tokens, then the peak at 1 M and
at the end and their ratio; exits non-zero when they differ by 5 % or more. The learner state is bounded by
:func:`tl_sparsity.coding.learner.state_bytes`, which is printed for comparison.

    python benchmarks/soak.py                      # 10 M tokens per hook, d = 64
    python benchmarks/soak.py --tokens 2000000     # a quicker run
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding.learner import state_bytes
from tl_sparsity.coding.synthetic import Gaussian, SparseLinear

MIB = 2**20


def peak_rss() -> int:
    """The process' peak resident set size so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000_000, help="rows per hook (default 10 M)")
    ap.add_argument("--d", type=int, default=64, help="row width")
    ap.add_argument("--expansion", type=float, default=2)
    ap.add_argument("--max-steps", type=int, default=32, help="greedy step cap per row (the learner's default: 4·d)")
    ap.add_argument("--chunk", type=int, default=5_000, help="rows per partial_fit call (not a batch multiple)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids contention on shared cores)")
    args = ap.parse_args(argv)
    if args.tokens < 1_000_000:
        ap.error("--tokens must be at least 1 000 000 (the first RSS mark).")
    torch.set_num_threads(args.threads)
    d = args.d
    sources = [SparseLinear(d, a=4, seed=1), SparseLinear(d, a=16, seed=2), SparseLinear(d, a=64, seed=3),
               Gaussian(d, seed=4)]
    learners = [OnlineSparseCoder(d_in=d, expansion=args.expansion, max_steps=args.max_steps, seed=i)
                for i in range(len(sources))]
    lr0 = learners[0]
    bound = state_bytes(d, int(round(args.expansion * d)), lr0.reservoir_size, lr0.batch_size - 1)
    print(f"soak: {len(learners)} hooks × {args.tokens:,} tokens, d={d}, m={int(round(args.expansion * d))}, "
          f"batch={lr0.batch_size}, reservoir={lr0.reservoir_size}, chunk={args.chunk}, threads={args.threads}")
    print(f"learner state bound (state_bytes): {bound / MIB:.2f} MiB per hook, {4 * bound / MIB:.2f} MiB in all")
    print(f"{'tokens':>12} {'peak RSS MiB':>13} {'RSS MiB':>9} {'state MiB':>10} {'tok/s/hook':>11} "
          f"{'norm. loss (hook 0..3)':>30}")
    marks: dict[int, int] = {}
    done, next_mark, t0 = 0, 1_000_000, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tl_sparsity_soak_") as tmp:
        while done < args.tokens:
            k = min(args.chunk, args.tokens - done)
            for src, lr in zip(sources, learners):
                lr.partial_fit(src.sample(k))
            done += k
            if done >= next_mark or done == args.tokens:
                losses = [lr.evaluate()["normalized_loss"] for lr in learners]
                for i, lr in enumerate(learners):
                    lr.save(Path(tmp) / f"hook_{i}.safetensors")
                held = sum(lr.memory_bytes() for lr in learners)
                rate = done / (time.perf_counter() - t0)
                loss_txt = " ".join(f"{v:.3f}" for v in losses)
                print(f"{done:>12,} {peak_rss() / MIB:>13.1f} {current_rss() / MIB:>9.1f} {held / MIB:>10.2f} "
                      f"{rate:>11,.0f} {loss_txt:>30}", flush=True)
                marks[done] = peak_rss()
                next_mark += 1_000_000
    first, last = marks[min(marks)], marks[max(marks)]
    ratio = last / first
    print(f"peak RSS at {min(marks):,} tokens: {first / MIB:.1f} MiB; at {max(marks):,} tokens: {last / MIB:.1f} MiB; "
          f"ratio {ratio:.4f} ({(ratio - 1) * 100:+.2f} %); wall {time.perf_counter() - t0:.0f} s")
    ok = abs(ratio - 1) < 0.05
    print("PASS: peak RSS flat within 5 %" if ok else "FAIL: peak RSS grew by 5 % or more")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
