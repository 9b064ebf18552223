"""Multi-process collection throughput: N ranks, each with its own replica of a GPT-2-small-shaped TransformerLens
model (random weights, built as in ``bench_e2e.py``) and its own token shard, collecting every hook of ``--hooks``.

    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py --mode hooks     # one GPU per rank, NCCL
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py --mode data
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py --mode none      # no communication: the baseline
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py --device cpu --layers 2 --d-model 64 --batch 2 \\
        --seq 16 --iters 2 --warmup-tokens 64 --batch-size 64                    # a smoke test on CPU (gloo)

Modes: ``hooks`` = ``tl_sparsity.HookParallelCollector`` (hook i's learner on rank i % N; rows gathered
to it after each forward); ``data`` = ``SparsityCollector(..., parallel="data")`` (one hook's learning split over the
ranks); ``none`` = an independent ``SparsityCollector`` per rank (each learner sees only its rank's rows). Every rank
runs the same number of forwards: warm-up (until every learner that has rows has frozen λ, agreed over the ranks
with an all-reduce), then ``--iters`` batches in one ``col.fit(...)`` call, timed between barriers with
``cuda.synchronize``. The plain forward (``model(ids, return_type=None)``, what ``fit`` runs) is timed the same way
on every rank at once, before and after. Rank 0 prints the world size, the device, tokens/s over all ranks, each
rank's tokens/s, and hook 0's ``normalized_loss`` from ``col.report()`` (called on every rank).

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``), as the GPU host requires.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import VOCAB, add_model_args, load_tl, tl_version, write_gpt2_folder

from tl_sparsity import SparsityCollector


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["hooks", "data", "none"], default="hooks")
    add_model_args(p)
    p.add_argument("--hooks", default="resid_post", help="collector hook spec (alias, names, globs)")
    p.add_argument("--batch", type=int, default=64, help="sequences per forward per rank")
    p.add_argument("--iters", type=int, default=10, help="timed forwards per rank")
    p.add_argument("--shard-batches", type=int, default=4, help="distinct token batches per rank, cycled")
    p.add_argument("--max-warmup-forwards", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (default 1 on CPU)")
    return p.parse_args(argv)


def setup(args):
    """Initialise the process group; returns (rank, world, device)."""
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc_per_node=2 benchmarks/bench_distributed.py")
    local = int(os.environ["LOCAL_RANK"])
    dev = torch.device(args.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        torch.set_num_threads(args.threads or 1)
        dist.init_process_group("gloo")
    if args.threads and dev.type == "cuda":
        torch.set_num_threads(args.threads)
    return dist.get_rank(), dist.get_world_size(), dev


def build_replica(args, rank, dev):
    """Rank 0 writes one random GPT-2 folder; every rank loads its own replica from it (identical weights)."""
    holder = [tempfile.mkdtemp(prefix="bench_dist_gpt2_") if rank == 0 else None]
    if rank == 0:
        write_gpt2_folder(holder[0], args.layers, args.d_model, seed=0)
    dist.broadcast_object_list(holder, src=0)
    model, desc = load_tl(holder[0], dev, getattr(torch, args.dtype), args.backend)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(holder[0], ignore_errors=True)
    return model, desc


def make_collector(args, model):
    opts = {"batch_size": args.batch_size, "warmup_tokens": args.warmup_tokens, "expansion": args.expansion,
                "neurons": False}
    if args.mode == "hooks":
        from tl_sparsity import HookParallelCollector

        return HookParallelCollector(model, args.hooks, **opts)
    has_parallel = "parallel" in inspect.signature(SparsityCollector.__init__).parameters
    if args.mode == "data":
        if not has_parallel:
            raise SystemExit("--mode data needs SparsityCollector(..., parallel='data'), which this tl_sparsity "
                             "does not have yet.")
        return SparsityCollector(model, args.hooks, parallel="data", **opts)
    return SparsityCollector(model, args.hooks, **({"parallel": None} if has_parallel else {}), **opts)


def local_learners(col):
    """This rank's learners that have received rows (hook-parallel: the hooks it owns)."""
    names = col.owned() if hasattr(col, "owned") else list(col.learners)
    out = []
    for name in names:
        lr = col.learners[name]
        if lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_ > 0:
            out.append(lr)
    return out


def all_warm(col, args, dev):
    """True on every rank when every rank's fed learners have trained past λ's warm-up (an all-reduce MIN)."""
    need = args.warmup_tokens + args.batch_size
    mine = local_learners(col)
    ok = all(lr.n_tokens_ >= need for lr in mine)
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_all(fn, dev):
    """(this rank's seconds, seconds until every rank is done): barrier, sync, run, sync, barrier."""
    dist.barrier()
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    t_local = time.perf_counter() - t0
    dist.barrier()
    return t_local, time.perf_counter() - t0


def gather(obj, world):
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def main(argv=None):
    args = parse_args(argv)
    rank, world, dev = setup(args)
    try:
        run(args, rank, world, dev)
        dist.barrier()  # tear down together: gloo aborts a rank whose peer has already gone
    finally:
        dist.destroy_process_group()


def run(args, rank, world, dev):
    torch.manual_seed(0)
    model, desc = build_replica(args, rank, dev)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    shard = [torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen).to(dev) for _ in range(args.shard_batches)]
    ntok = args.batch * args.seq
    say = print if rank == 0 else (lambda *a, **k: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    say(f"world size {world}; device: {name} ×{world} ({dist.get_backend()}); torch {torch.__version__}; "
        f"transformer_lens {tl_version()}; model: {desc}, {args.layers} layers, d={args.d_model}, {args.dtype}")
    say(f"mode {args.mode}; hooks {args.hooks}; per rank {args.batch}×{args.seq} = {ntok} tokens per forward; "
        f"learner batch_size {args.batch_size}, warmup_tokens {args.warmup_tokens}, expansion {args.expansion:g}",
        flush=True)

    def plain():
        with torch.no_grad():
            for i in range(args.iters):
                model(shard[i % len(shard)], return_type=None)

    with torch.no_grad():
        model(shard[0], return_type=None)
    t_plain = timed_all(plain, dev)

    col = make_collector(args, model)
    say(f"collector: {type(col).__name__} with {len(col.hook_names)} hooks", flush=True)
    t0, n_warm = time.perf_counter(), 0
    while not (n_warm and all_warm(col, args, dev)):  # at least one forward: learners infer d_in from it
        if n_warm >= args.max_warmup_forwards:
            raise RuntimeError(f"still warming up after {n_warm} forwards per rank: lower --warmup-tokens.")
        col.fit([shard[n_warm % len(shard)]], progress=False)
        n_warm += 1
    warm_s = time.perf_counter() - t0
    batches = [shard[(n_warm + i) % len(shard)] for i in range(args.iters)]
    t_col = timed_all(lambda: col.fit(batches, progress=False), dev)
    t_plain = min(t_plain, timed_all(plain, dev), key=lambda t: t[1])
    rep = col.report()  # on every rank (collective in the parallel modes)
    first = col.hook_names[0]
    row = rep[first]
    lr = col.learners[first]
    held = getattr(lr, "dictionary_", None) is not None  # hook-parallel: only the owner holds it
    per_rank = gather({"rank": rank, "t_col": t_col[0], "t_plain": t_plain[0], "nl": row["normalized_loss"],
                       "n_tokens": row["n_tokens"], "lam": lr.lam_ if held else None,
                       "dict_sum": float(lr.dictionary_.double().abs().sum()) if held else None}, world)
    if rank != 0:
        return
    total = world * args.iters * ntok
    tps_col, tps_plain = total / t_col[1], total / t_plain[1]
    print(f"warm-up: {n_warm} forwards per rank, {warm_s:.1f} s (λ frozen on every learner before timing)")
    print(f"\n| | tokens/s, all {world} ranks | per rank (min–max) | × plain forward time |")
    print("|---|---|---|---|")
    lo, hi = (min(args.iters * ntok / r["t_plain"] for r in per_rank), max(args.iters * ntok / r["t_plain"]
                                                                            for r in per_rank))
    print(f"| plain forward | {tps_plain:,.0f} | {lo:,.0f}–{hi:,.0f} | 1.00 |")
    lo, hi = (min(args.iters * ntok / r["t_col"] for r in per_rank), max(args.iters * ntok / r["t_col"]
                                                                          for r in per_rank))
    print(f"| collect ({args.mode}) | {tps_col:,.0f} | {lo:,.0f}–{hi:,.0f} | {t_col[1] / t_plain[1]:.2f} |")
    print("\nper rank: " + "; ".join(f"rank {r['rank']}: {args.iters * ntok / r['t_col']:,.0f} tok/s collected, "
                                     f"{args.iters * ntok / r['t_plain']:,.0f} plain" for r in per_rank))
    nls = ", ".join(f"{r['nl']:.4f}" for r in per_rank)
    ntoks = ", ".join(str(r["n_tokens"]) for r in per_rank)
    print(f"report {first}: normalized_loss per rank [{nls}] (n_tokens trained per rank [{ntoks}]); "
          + ("independent learners per rank" if args.mode == "none" else "one learner over all ranks' rows")
          + ("" if all(math.isfinite(r["nl"]) for r in per_rank) else " — NOT FINITE: learning did not happen"))
    print("hook 0's learner per rank (λ, Σ|Φ|): " + "; ".join(
        f"rank {r['rank']}: " + ("not held here" if r["lam"] is None else f"{r['lam']:.6g}, {r['dict_sum']:.6f}")
        for r in per_rank))


if __name__ == "__main__":
    main()
