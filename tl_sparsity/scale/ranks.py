"""What both parallel modes share: where collectives run, row counts gathered in one collective, per-rank
checkpoint folders, agreement on the number of batches, and side statistics merged over the ranks.

Used by :mod:`tl_sparsity.scale.shared_coder` (the shared learner), :mod:`tl_sparsity.scale.ranked` (what both modes'
collectors share), :mod:`tl_sparsity.scale.data_parallel` and :mod:`tl_sparsity.scale.hook_parallel`;
``torch.distributed`` is imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["all_gather_flat", "comm_device", "common_checkpoint", "finite_row_counts", "merged_extras",
           "rank_dir", "resolve_parallel", "same_batch_count"]


def resolve_parallel(parallel: str | None, group: Any = None) -> str | None:
    """``"data"`` or None. ``"auto"``: data-parallel when ``torch.distributed`` is initialised with more than one
    rank in ``group``; ``"data"`` requires it to be initialised; None / ``"none"``: every rank on its own."""
    if parallel in (None, "none", False):
        return None
    if parallel not in ("auto", "data"):
        raise ValueError(f"parallel must be 'auto', 'data' or None, got {parallel!r} (hook-parallel collection is "
                         "tl_sparsity.HookParallelCollector).")
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if parallel == "data" and not ready:
        raise RuntimeError("parallel='data' needs torch.distributed initialised first: launch with torchrun and call "
                           "torch.distributed.init_process_group(backend='gloo' or 'nccl').")
    if not ready:
        return None
    return "data" if parallel == "data" or dist.get_world_size(group) > 1 else None


def all_gather_flat(out: Tensor, t: Tensor, group: Any = None) -> Tensor:
    """Collective: every rank's ``t`` ``[k, ...]`` into ``out`` ``[world·k, ...]``, in rank order."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the old name warns (2.13)
    gather(out, t.contiguous(), group=group)
    return out


def finite_row_counts(rows: list[Tensor | None], group: Any = None) -> list[list[int]]:
    """Collective: for each entry of ``rows`` (this rank's rows ``[n, d]`` of one hook, or None for none), every
    rank's number of all-finite rows, ``[len(rows)][world]``, with one all-gather and one host synchronisation."""
    import torch.distributed as dist

    if not rows:
        return []
    dev, world = comm_device(group), dist.get_world_size(group)
    zero = torch.zeros((), dtype=torch.long, device=dev)
    local = torch.stack([zero if r is None or r.shape[0] == 0 else torch.isfinite(r).all(dim=1).sum().to(dev)
                         for r in rows])
    out = all_gather_flat(torch.empty(world * len(rows), dtype=torch.long, device=dev), local, group)
    return out.view(world, len(rows)).T.tolist()


def comm_device(group: Any = None) -> torch.device:
    """Where tensors for ``group``'s collectives live: the current CUDA device under NCCL, else the CPU.

    Under NCCL each process must first make its own GPU current, ``torch.cuda.set_device(int(os.environ
    ["LOCAL_RANK"]))`` (torchrun numbers ranks over all nodes, LOCAL_RANK within one). A process with LOCAL_RANK > 0
    left on the default cuda:0 raises here instead of failing in NCCL ("Duplicate GPU detected")."""
    import os

    import torch.distributed as dist

    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    current, local = torch.cuda.current_device(), int(os.environ.get("LOCAL_RANK", "0"))
    if current == 0 and 0 < local < torch.cuda.device_count():
        raise RuntimeError(f"this process (LOCAL_RANK {local}) still has cuda:0 as its current CUDA device, like local "
                           "rank 0, so NCCL would fail; call torch.cuda.set_device(int(os.environ['LOCAL_RANK'])) "
                           "before torch.distributed.init_process_group, and put the model on that device.")
    return torch.device("cuda", current)


def rank_dir(root: Any, rank: int, world: int) -> Path:
    """This rank's checkpoint folder under ``root``."""
    return Path(root) / f"rank{rank:03d}-of-{world:03d}"


def common_checkpoint(folder: Path, group: Any = None) -> Path | None:
    """Collective: the checkpoint folder under this rank's ``folder`` whose ``fit`` progress (batches done) is the
    newest that every rank has; None when no rank has any. Raises on every rank when some ranks have checkpoints
    and no progress is common to all."""
    import torch.distributed as dist

    from ..coding.state_io import CheckpointError

    mine: dict[int, str] = {}
    for ckpt in sorted(folder.glob("ckpt-*")):
        try:
            fit = json.loads((ckpt / "manifest.json").read_text()).get("fit") or {}
        except (OSError, ValueError):
            continue  # unreadable: not a candidate (read_collector would name the damage)
        if "batches_done" in fit:
            mine[int(fit["batches_done"])] = str(ckpt)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, sorted(mine), group=group)
    if not any(everyone):
        return None
    common = set(everyone[0]).intersection(*everyone[1:])
    if not common:
        raise CheckpointError(f"the ranks' checkpoints under {folder.parent} share no fit progress (batches done "
                              f"per rank: {everyone}); use a new checkpoint_dir.")
    return Path(mine[max(common)])


def same_batch_count(batches: list[Any], group: Any = None) -> None:
    """Raise on every rank unless every rank of ``group`` passes the same number of batches."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    mine = torch.tensor([len(batches)], device=comm_device(group))
    counts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(counts, mine, group=group)
    if len({int(c) for c in counts}) != 1:
        raise ValueError(f"every rank must pass the same number of batches to fit(); got {[int(c) for c in counts]}"
                         " per rank (a rank with more would wait forever for the others).")


def merged_extras(col: Any) -> dict[str, Any]:
    """Collective: each hook's side statistics (covariance, neuron statistics) merged over the ranks in rank order,
    as new :class:`~tl_sparsity.stats.side.SideStats` (the collector's own keep counting this rank's rows)."""
    import torch.distributed as dist

    from ..stats.side import SideStats

    group = col.group
    states = {name: ex.state() for name, ex in col.extras.items()}
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, states, group=group)
    out = {}
    for name, ex in col.extras.items():
        merged = SideStats(name, ex.want_cov, ex.want_neurons, ex.neuron_options)
        lr = col.learners[name]
        device = lr.dictionary_.device if lr.initialized else torch.device("cpu")  # not the sender's cuda:N
        for part in gathered:
            cov, neurons = ex.loaded(*part[name], device=device)
            if cov is not None:
                merged.cov = cov if merged.cov is None else merged.cov.merge(cov)
            if neurons is not None:
                merged.neurons = neurons if merged.neurons is None else merged.neurons.merge(neurons)
        merged._control = ex._control  # the control is cached per row count, which every rank shares
        out[name] = merged
    return out
