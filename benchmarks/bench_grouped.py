"""k learners of one shape trained together (``tl_sparsity.coding.grouped.train_together``) vs each alone, on one GPU.

    PYTHONPATH=$PWD python benchmarks/bench_grouped.py --n 4096          # 12 learners, d = 768, a = 16
    PYTHONPATH=$PWD python benchmarks/bench_grouped.py --n 16384 --rounds 3
    PYTHONPATH=$PWD python benchmarks/bench_grouped.py --n 1024 --k 30 --d 576 --profile   # where the host's time goes

One dictionary is trained on synthetic rows (``bench_pursuit.train_dictionary``) and copied k times; each copy then
takes ``--rounds`` batches of 0.9·n fresh training rows (a batch of n minus the held-out tenth), either all k at once
or one learner after another. Prints the time per round (k batches) after a CUDA synchronisation, the host's time
to queue the round, rows/s per learner, and the largest difference between the two ways' dictionaries.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import time

import torch

import bench_pursuit as B
from tl_sparsity.coding.grouped import train_together


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="learner batch size")
    p.add_argument("--k", type=int, default=12, help="learners")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--a", type=float, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--train-tokens", type=int, default=1 << 22)
    p.add_argument("--profile", action="store_true", help="then cProfile the grouped rounds: the host's top functions")
    args = p.parse_args()
    dev = torch.device("cuda")
    targs = argparse.Namespace(sigma=0.1, train_device=None, n=args.n, train_tokens=args.train_tokens)
    src, coder, _, _ = B.train_dictionary(args.d, args.a, dev, targs)
    sampler = B.DeviceSampler(src, dev, seed=5)
    n_train = int(args.n * 0.9)
    data = [[coder.normalize(sampler(n_train)) for _ in range(args.k)] for _ in range(args.rounds + 1)]
    print(f"device {torch.cuda.get_device_name(dev)}; {args.k} learners, d={args.d}, m={coder.dictionary_.shape[0]}, "
          f"a={args.a:g}, {n_train} training rows per batch, {coder._replay_n} replay steps per batch "
          f"(λ adapting: {coder.lam_adapting}; converged: {coder.converged_})")

    def run(together: bool):
        learners = [copy.deepcopy(coder) for _ in range(args.k)]

        def one_round(r: int) -> None:
            if together:
                train_together(list(zip(learners, data[r])))
            else:
                for lr, x in zip(learners, data[r]):
                    lr._train(x, x.shape[0])

        one_round(0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for r in range(1, args.rounds + 1):
            one_round(r)
        queued = time.perf_counter() - t
        torch.cuda.synchronize()
        return learners, (time.perf_counter() - t) / args.rounds, queued / args.rounds

    times: dict[str, list[float]] = {"alone": [], "together": []}
    final = {}
    for _ in range(2):  # alternate, twice
        for mode in ("alone", "together"):
            final[mode], wall, queued = run(mode == "together")
            times[mode].append(wall)
            print(f"{mode:9s}: {wall * 1e3:7.2f} ms per round of {args.k} batches (host queued it in "
                  f"{queued * 1e3:.2f} ms) = {n_train / (wall / args.k) / 1e6:.2f} M rows/s per learner")
    diff = max(float((a.dictionary_ - b.dictionary_).abs().max()) for a, b in zip(final["alone"], final["together"]))
    if args.profile:
        learners = [copy.deepcopy(coder) for _ in range(args.k)]
        train_together(list(zip(learners, data[0])))
        torch.cuda.synchronize()
        prof, t = cProfile.Profile(), time.perf_counter()
        prof.enable()
        for r in range(1, args.rounds + 1):
            train_together(list(zip(learners, data[r])))
        torch.cuda.synchronize()
        prof.disable()
        steps = sum(lr.n_steps_ for lr in learners) - sum(coder.n_steps_ + 1 + coder._replay_n for _ in learners)
        print(f"profiled: {(time.perf_counter() - t) * 1e3 / max(steps, 1):.3f} ms per learner step ({steps} steps)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    print(f"together / alone speed: {statistics.median(times['alone']) / statistics.median(times['together']):.2f}x; "
          f"largest |ΔΦ| after {args.rounds + 1} rounds: {diff:.2e}")


if __name__ == "__main__":
    main()
