"""What both parallel modes share: where collectives run, row counts gathered in one collective, per-rank
checkpoint folders, agreement on the number of batches, and side statistics merged over the ranks.

Used by :mod:`tl_sparsity.scale.data_parallel` (the shared learner), :mod:`tl_sparsity.distributed` (hook-parallel) and
:class:`tl_sparsity.SparsityCollector`; ``torch.distributed`` is imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["RankView", "all_gather_flat", "comm_device", "common_checkpoint", "finite_row_counts", "merged_extras",
           "rank_dir", "same_batch_count"]


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

    group = col._group
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


class RankView:
    """A collector's place among ranks, read from its learners (``parallel``: None when it runs alone); a base of
    :class:`tl_sparsity.SparsityCollector`."""

    parallel: Any
    learners: dict[str, Any]

    @property
    def _distributed(self) -> bool:
        """Whether the ranks of a ``torch.distributed`` group run this collector together."""
        return self.parallel is not None

    @property
    def _group(self) -> Any:
        return getattr(next(iter(self.learners.values()), None), "group", None)

    @property
    def _rank(self) -> int:
        return getattr(next(iter(self.learners.values()), None), "rank", 0)

    @property
    def _world(self) -> int:
        return getattr(next(iter(self.learners.values()), None), "world", 1)
