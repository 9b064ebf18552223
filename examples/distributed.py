"""Sparsity measurement with torch.distributed: each rank runs the model on its own shard of the text.
``--mode data`` (data-parallel): every hook's learner is shared by all ranks (the pursuit of each learner batch is
split over them, gradients all-reduced); ``--mode hooks`` (hook-parallel): each hook's learner lives on one rank.

    torchrun --nproc_per_node=2 examples/distributed.py                          # tiny random model, CPU (gloo)
    torchrun --nproc_per_node=2 examples/distributed.py --mode data              # the same, data-parallel
    torchrun --nproc_per_node=2 examples/distributed.py --model smollm2-135m --hooks resid_post --layers 0:30:5
    torchrun --nproc_per_node=4 examples/distributed.py --model smollm2-135m --device cuda   # NCCL, one GPU per rank
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=4 --master_addr=HOST0 --master_port=29500 \
        examples/distributed.py --device cuda --out report.json     # two nodes: run on each, R = 0 and 1

Rank 0 prints the report, which equals that of one process fed the shards interleaved batch by batch
(``tests/scale/test_distributed.py`` and ``tests/scale/test_data_parallel.py`` check it).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from tl_sparsity import DataParallelCollector, HookParallelCollector


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a tl_sparsity.tl.models name or folder (default: tiny random model)")
    p.add_argument("--hooks", default="resid_post,mlp_post")
    p.add_argument("--layers", default=None, help="as in tl-sparsity run, e.g. 0:30:5")
    p.add_argument("--tokens", type=int, default=8192, help="tokens over all ranks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=("hooks", "data"), default="hooks", help="hook-parallel or data-parallel")
    p.add_argument("--out", default=None, help="rank 0 also writes the report here (.csv: a table, else JSON)")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))  # this node's GPU: the global rank counts over all nodes
    if cuda:
        torch.cuda.set_device(local)  # collectives (NCCL) use the current device
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{local}" if cuda else "cpu"
    torch.set_num_threads(1)
    try:
        if args.model is None:
            from pathlib import Path

            sys.path.insert(0, str(Path(__file__).parent))
            from quickstart import tiny_model

            model = tiny_model().to(device) if cuda else tiny_model()  # (TL 3 prints a line on .to)
            gen = torch.Generator().manual_seed(0)
            batches = [torch.randint(1, 1000, (8, 64), generator=gen) for _ in range(max(1, args.tokens // 504))]
        else:
            from tl_sparsity import text
            from tl_sparsity.tl import models

            model, tok = models.load_model(args.model, device=device)
            batches = list(text.token_windows(tok, text.load_texts("pydoc"), ctx_len=128, batch_size=8,
                                              max_tokens=args.tokens, seed=0))
        from tl_sparsity.cli import hook_spec

        shard = batches[rank::world][: len(batches) // world]  # the same number of batches on every rank
        hooks = hook_spec(args.hooks, int(model.cfg.n_layers), layers=args.layers)
        opts = {"batch_size": 512, **({"device": device} if cuda else {})}
        if args.mode == "data":
            col = DataParallelCollector(model, hooks=hooks, **opts)  # = SparsityCollector(..., parallel="data")
            layout = "every hook's learner shared by all ranks"
        else:
            col = HookParallelCollector(model, hooks=hooks, **opts)
            layout = f"hooks owned per rank: {[sum(1 for r in col.owner.values() if r == k) for k in range(world)]}"
        col.fit([b.to(device) for b in shard], progress=rank == 0)
        report = col.report()  # on every rank: it is collective
        if rank == 0:
            print(f"# {world} ranks, {args.mode}-parallel, {layout}")
            print(report.to_markdown())
            if args.out:
                (report.to_csv if args.out.endswith(".csv") else report.save)(args.out)
        dist.barrier()  # tear down together: gloo aborts a rank whose peer has already gone
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip the exit-time teardown: about once in 50 runs on a busy machine, gloo (torch 2.13) aborted a rank there
    # ("terminate called without an active exception") after the process group was destroyed and the report out.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
