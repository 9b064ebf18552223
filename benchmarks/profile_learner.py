"""Where one learner step's time goes: ``torch.profiler`` over ``OnlineSparseCoder.partial_fit`` on synthetic rows.

    PYTHONPATH=$PWD python benchmarks/profile_learner.py --d 768 --batch-size 4096 --steps 20

Prints the wall time per learner batch (CUDA-synchronised) and the profiler's table of the operators that take the
most device time, then the most host time (a host-bound step shows up as host time ≫ device time).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding.synthetic import SparseLinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--a", type=float, default=16)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=12, help="table rows to print")
    p.add_argument("--train-batches", type=int, default=0, help="train the dictionary first (CUDA; 256 ≈ steady state)")
    p.add_argument("--shapes", action="store_true", help="also a device-time table per operator and input shapes")
    p.add_argument("--trace", default=None, help="write a Chrome trace (JSON) of the profiled steps to this file")
    args = p.parse_args()
    dev = torch.device(args.device)
    src = SparseLinear(args.d, args.a, sigma=0.1, seed=0)
    coder = OnlineSparseCoder(d_in=args.d, batch_size=args.batch_size, device=dev,
                              warmup_tokens=args.batch_size * max(4, args.train_batches // 2))
    if dev.type == "cuda":  # rows drawn on the GPU (as bench_pursuit.py does)
        from bench_pursuit import DeviceSampler

        sample = DeviceSampler(src, dev, seed=1)
        for _ in range(max(8, args.train_batches)):  # initialise, train, leave warm-up
            coder.partial_fit(sample(args.batch_size))
        data = sample(args.batch_size * args.steps)
    else:
        data = next(src.batches(args.batch_size * (args.steps + 8), chunk=args.batch_size * (args.steps + 8))).to(dev)
        coder.partial_fit(data[: args.batch_size * 8])
        data = data[args.batch_size * 8:]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batches = [data[args.batch_size * i: args.batch_size * (i + 1)] for i in range(args.steps)]
    sync()
    t = time.perf_counter()
    for b in batches:
        coder.partial_fit(b, check_finite=False)  # as SparsityCollector.fit calls it
    queued = (time.perf_counter() - t) / args.steps
    sync()
    wall = (time.perf_counter() - t) / args.steps
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device {name}; d={args.d}, m={coder.dictionary_.shape[0]}, a={args.a:g}, batch {args.batch_size}: "
          f"{wall * 1e3:.2f} ms per learner batch ({args.batch_size / wall / 1e6:.2f} M rows/s); the host had queued "
          f"them after {queued * 1e3:.2f} ms per batch" + (" — host-bound" if queued > 0.8 * wall else ""))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, record_shapes=args.shapes or bool(args.trace), with_stack=bool(args.trace)) as prof:
        for i in range(args.steps):
            coder.partial_fit(batches[i], check_finite=False)
        sync()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if args.shapes:
        table = prof.key_averages(group_by_input_shape=True).table
        print(table(sort_by=key, row_limit=3 * args.rows, max_name_column_width=40, max_shapes_column_width=70))


if __name__ == "__main__":
    main()
