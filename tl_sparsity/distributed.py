"""Hook-parallel collection with ``torch.distributed``: many hooks' learners spread over ranks.

Every rank runs its own model replica on its own shard of batches (``torchrun --nproc_per_node=N``); hook ``i``'s
learner (and its side statistics) lives only on rank ``i % world_size``. After each forward, every hook's kept rows
are gathered (``torch.distributed.gather``; gloo on CPU, NCCL on GPUs) to the owning rank in rank order, so the owner
sees, step after step, rank 0's rows then rank 1's rows, …: exactly what one process fed the shards interleaved
batch by batch would see — and since learners are chunk-invariant, the same dictionaries and the same report.
``report()`` gathers the owners' rows, so it is the full report on every rank.

Limits (each raises a clear error): only ``fit`` feeds a hook-parallel collector (not ``fwd_hooks`` / ``attach`` /
``start``); every rank must pass the same number of batches; neuron statistics and checkpoints are not supported in
this mode yet. Data-parallel learning (every hook's learner shared by all ranks) is ``SparsityCollector``'s default
under ``torch.distributed``: :mod:`tl_sparsity.data_parallel`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .collector import SparsityCollector
from .data_parallel import same_batch_count
from .report import SparsityReport

__all__ = ["HookParallelCollector"]


class HookParallelCollector(SparsityCollector):
    """A :class:`SparsityCollector` whose hooks' learners are spread over the ranks of ``group`` (default: the
    world). Build it on every rank with the same arguments, after ``torch.distributed.init_process_group``."""

    def __init__(self, model: Any, hooks: Any = "resid_post", *, group: Any = None, **options: Any) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("HookParallelCollector needs torch.distributed initialised first: launch with torchrun "
                               "and call torch.distributed.init_process_group(backend='gloo' or 'nccl').")
        if options.get("neurons"):
            raise ValueError("neuron statistics are not supported in hook-parallel mode yet: pass neurons=False.")
        options["neurons"] = False
        options["parallel"] = None  # this class's own mode, not data-parallel
        super().__init__(model, hooks, **options)
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.owner = {name: i % self.world for i, name in enumerate(self.hook_points)}
        self._rows_seen = 0  # rows of the first hook over all ranks (the same number on every rank)

    @property
    def n_tokens(self) -> int:
        """Rows received by the first hook, summed over all ranks."""
        return self._rows_seen

    def owned(self) -> list[str]:
        """The hooks whose learners live on this rank."""
        return [name for name, r in self.owner.items() if r == self.rank]

    # ------------------------------------------------------------------ only fit() feeds this collector
    def fwd_hooks(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a HookParallelCollector is fed by fit() only (its rows are gathered to their "
                                  "owning ranks after each forward); use SparsityCollector for fwd_hooks().")

    attach = start = fwd_hooks  # type: ignore[assignment]

    def fit(self, token_batches: Iterable[Any] | Tensor, n_tokens: int | None = None, progress: bool = True,
            checkpoint_dir: Any = None, checkpoint_every: Any = None, **forward_kwargs: Any) -> "SparsityCollector":
        """:meth:`SparsityCollector.fit` on this rank's shard; every rank must pass the same number of batches."""
        if checkpoint_dir is not None or checkpoint_every is not None:
            raise ValueError("checkpoints are not supported in hook-parallel mode yet.")
        batches = [token_batches] if isinstance(token_batches, Tensor) else list(token_batches)
        same_batch_count(batches, self.group)
        return super().fit(batches, n_tokens=n_tokens, progress=progress and self.rank == 0, **forward_kwargs)

    def _feed(self, sink: dict[str, list[tuple]]) -> None:
        # every hook's rows travel first, then each rank learns its hooks: gathering hook by hook between learning
        # steps would make each rank wait for the owner of the previous hook, so the ranks would learn in turn
        received = {}
        for i, (name, chunks) in enumerate(sink.items()):
            rows = [c[0] for c in chunks]
            mine = torch.cat(rows) if rows else None
            parts, total = _gather_rows(mine, self.owner[name], self.world, self.group, self._width(name, mine))
            if i == 0:
                self._rows_seen += total
            if parts is not None:
                received[name] = parts
        for name, parts in received.items():
            for part in parts:
                self.learners[name].partial_fit(part)
                self.extras[name].update(part, None, None, None)

    def _width(self, name: str, rows: Tensor | None) -> int:
        return rows.shape[1] if rows is not None else int(self.learners[name].d_in or 0)

    # ------------------------------------------------------------------ results
    def report(self, controls: bool | None = None) -> SparsityReport:
        """The full report on every rank: each rank evaluates the hooks it owns, then all rows are gathered."""
        import torch.distributed as dist

        from . import extras as _extras
        from . import hooks as _hooks

        rows = self._rows(self.owned())
        meta: dict[str, Any] = {"model": _hooks.model_info(self.model), "options": self.learners_params(),
                                "skip_bos": self.skip_bos, "hook_parallel": {"world_size": self.world}}
        tables = _extras.add_to_report(self, rows, meta, self.controls if controls is None else bool(controls))
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (rows, tables, meta.get("controls")), group=self.group)
        by_hook = {r["hook"]: r for part in gathered for r in part[0]}
        all_rows = [by_hook[name] for name in self.hook_points]
        if all(r["status"].startswith("no tokens") for r in all_rows):
            raise RuntimeError("no activations collected yet: run fit(...) on every rank first.")
        all_tables = {k: v for part in gathered for k, v in part[1].items()}
        if any(part[2] for part in gathered):
            meta["controls"] = next(part[2] for part in gathered if part[2])
        return SparsityReport(all_rows, meta, all_tables)


def _gather_rows(rows: Tensor | None, dst: int, world: int, group: Any,
                 width: int) -> tuple[list[Tensor] | None, int]:
    """Gather every rank's ``rows`` ``[n_r, d]`` to rank ``dst`` (in rank order; None on the other ranks), and the
    total number of rows over all ranks (on every rank)."""
    import torch.distributed as dist

    device = rows.device if rows is not None else torch.device("cpu")
    mine = rows if rows is not None else torch.zeros(0, width, device=device)
    sizes = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([mine.shape[0], mine.shape[1]], device=device), group=group)
    n_max, d = max(int(s[0]) for s in sizes), max(int(s[1]) for s in sizes)
    padded = torch.zeros(n_max, d, dtype=torch.float32, device=device)
    if mine.shape[0]:
        padded[: mine.shape[0]] = mine
    rank = dist.get_rank(group)
    out = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
    dist.gather(padded, out, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
    total = sum(int(s[0]) for s in sizes)
    if out is None:
        return None, total
    return [o[: int(s[0])] for o, s in zip(out, sizes)], total
