"""NeuronStats throughput and memory on a d_mlp = 1536 hook (SmolLM2-135M's MLP width), synthetic activations.

Streams ``--tokens`` tokens (batches of ``--batch`` × ``--seq``) of Zipf-distributed token ids (vocabulary 49 152)
and Gaussian activations shifted so that ``--rate`` of them fire; prints state bytes, current and peak RSS at 100 k
tokens and at the end, and the update throughput (data generation excluded). With ``--no-tokens`` only the
token-free statistics (dead, frequency, positional) run.

    python benchmarks/bench_neurons.py                       # 1 M tokens, with token/trigram detectors
    python benchmarks/bench_neurons.py --no-tokens --threads 2
    python benchmarks/bench_neurons.py --device cuda
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tl_sparsity.stats.neurons import NeuronStats


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size in MB."""
    with open("/proc/self/statm") as f:
        cur = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    return cur, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rate", type=float, default=0.16, help="share of activations above the threshold")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-tokens", action="store_true")
    ap.add_argument("--trigram-slots", type=int, default=128, help="0: no trigram detectors")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shift = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - args.rate)))
    pool = [(torch.randn(args.batch, args.seq, args.n, generator=g) + 0.0 - shift).to(dev) for _ in range(4)]
    zipf = 1.0 / torch.arange(1, args.vocab + 1, dtype=torch.float64)
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool, device=dev)
    mask[:, 0] = False  # BOS
    stats = NeuronStats(args.n, vocab_size=args.vocab, max_positions=args.seq, trigram_slots=args.trigram_slots,
                        device=dev)
    print(f"device={dev} threads={torch.get_num_threads()} n={args.n} batch={args.batch}x{args.seq} "
          f"rate={args.rate} tokens={'no' if args.no_tokens else 'yes'} trigram_slots={args.trigram_slots}; "
          f"RSS before streaming "
          f"{rss_mb()[0]:.0f} MB (incl. {sum(a.numel() * 4 for a in pool) / 2**20:.0f} MB of activation pool)")
    seen, busy, checkpoints, i = 0, 0.0, sorted({min(100_000, args.tokens), args.tokens}), 0
    while seen < args.tokens:
        toks = None if args.no_tokens else torch.multinomial(zipf, args.batch * args.seq, True, generator=g).view(
            args.batch, args.seq).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats.update(pool[i % len(pool)], toks, mask)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        busy += time.perf_counter() - t0
        i, seen = i + 1, stats.n_tokens
        if checkpoints and seen >= checkpoints[0]:
            cur, peak = rss_mb()
            gpu = (f", GPU peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB (incl. the pool)"
                   if dev.type == "cuda" else "")
            print(f"{seen:>9,d} tokens: state {stats.state_bytes() / 2**20:6.1f} MB, RSS {cur:6.0f} MB "
                  f"(peak {peak:.0f} MB){gpu}, {seen / busy:,.0f} tokens/s")
            while checkpoints and seen >= checkpoints[0]:
                checkpoints.pop(0)
    t0 = time.perf_counter()
    s = stats.summary()
    print(f"summary() {time.perf_counter() - t0:.2f} s: " + ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    if not args.no_tokens:
        df = stats.result()
        f = df["n_active"].clip(lower=1)
        print(f"heavy hitters exact for {df['exact'].mean():.1%} of neurons; "
              + ", ".join(f"{p} floor/F median {(hh.floor.cpu() / torch.tensor(f.values)).median():.4f}"
                          for p, hh in stats._hh.items()))


if __name__ == "__main__":
    main()
