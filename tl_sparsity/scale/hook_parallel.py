"""Hook-parallel collection with ``torch.distributed``: :class:`HookParallelCollector`, many hooks' learners spread
over ranks.

Every rank runs its own model replica on its own shard of batches (``torchrun --nproc_per_node=N``); hook ``i``'s
learner (and its side statistics: covariance, neuron statistics) lives only on rank ``i % world_size``. After each
forward, every hook's kept rows are gathered (``torch.distributed.gather``; gloo on CPU, NCCL on GPUs) to the owning
rank in rank order, so the owner sees, step after step, rank 0's rows then rank 1's rows, …: exactly what one process
fed the shards interleaved batch by batch would see — and since learners are chunk-invariant, the same dictionaries
and the same report. Hooks with neuron statistics (``neurons=``, as in :class:`SparsityCollector`: by default the
``mlp_post`` hooks) send their raw activations ``[batch, pos, d]`` instead, bit for bit in their own dtype, with the
keep-mask and the token ids (shapes may differ between ranks); the owner rebuilds the rows from them and updates the
learner and :class:`~tl_sparsity.stats.neurons.NeuronStats` chunk by chunk, as one process would. ``report()`` gathers
the owners' rows and neuron tables, so it is the full report on every rank.

``fit``, ``attach()`` and ``start()`` feed a hook-parallel collector: each completed forward's rows are gathered, so
every rank must run the same number of forwards (and pass the same number of batches to ``fit``), all with token
ids or all without. ``fwd_hooks()`` raises a clear error: a hook list cannot tell when a forward has ended.
``flush()`` works: each rank trains the hooks it owns on their pending rows. Checkpoints (``fit(checkpoint_dir=...)``, ``save``,
``load``) are per rank, as in data-parallel mode (:mod:`tl_sparsity.scale.ranked`). Data-parallel learning (every
hook's learner shared by all ranks) is :mod:`tl_sparsity.scale.data_parallel`, ``SparsityCollector``'s default
under ``torchrun``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..coding.safe_io import defer_interrupts
from ..report import SparsityReport
from ..tl import hooks as _hooks
from ..tl import rows as _rows
from .ranked import RankedCollector
from .ranks import comm_device

__all__ = ["HookParallelCollector"]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # sent bit for bit; others as float32
_HEAD = 5  # per chunk: batch, pos, width, dtype code, tokens given


class HookParallelCollector(RankedCollector):
    """A :class:`~tl_sparsity.tl.collector.SparsityCollector` whose hooks' learners are spread over the ranks of
    ``group`` (default: the world); see the module. Build it on every rank with the same arguments, after
    ``torch.distributed.init_process_group``: ``HookParallelCollector(model, hooks, group=None, **options)``."""

    parallel = "hooks"
    mode = "hook-parallel"
    alternative = ("Use col.fit(batches), col.attach() or col.start() on every rank, or DataParallelCollector "
                   "(SparsityCollector(..., parallel='data')).")

    def __init__(self, model: Any, hooks: Any = "resid_post", *, group: Any = None, **options: Any) -> None:
        super().__init__(model, hooks, group=group, **options)
        self.owner = {name: i % self.world for i, name in enumerate(self.hook_points)}
        self._rows_seen = 0  # rows of the first hook over all ranks (the same number on every rank)
        self._with_tokens: dict[str, bool] = {}  # per neuron hook: started with token ids (known on every rank)

    @property
    def n_tokens(self) -> int:
        """Rows received by the first hook, summed over all ranks."""
        return self._rows_seen

    def owned(self) -> list[str]:
        """The hooks whose learners live on this rank."""
        return [name for name, r in self.owner.items() if r == self.rank]

    # ------------------------------------------------------------------ whole forwards: fit(), attach(), start()
    def fwd_hooks(self, *args: Any, **kwargs: Any) -> Any:
        """Not in this mode: a hook list does not know when a forward ends, and each forward's rows are gathered to
        their owning ranks once it has (use ``attach()`` or ``start()``, which do know)."""
        raise self._cannot("fwd_hooks()", "each forward's rows are gathered to their owning ranks once the forward "
                           "has completed, which a hook list cannot tell; use attach() or start()")

    def _feed_forward(self, sink: dict[str, list[tuple]]) -> None:
        """One completed forward of ``attach()`` / ``start()``: every hook's rows (none for a hook that did not run)
        gathered to their owners, as after each of ``fit()``'s forwards. Collective: every rank must run the same
        number of forwards."""
        with defer_interrupts(), torch.inference_mode(False), torch.no_grad():
            self._feed({name: sink.get(name, []) for name in self.hook_points})

    # ------------------------------------------------------------------ fit() and its checkpoints (see the base)
    def _fit_state(self) -> dict[str, Any]:
        return {"rows_seen": self._rows_seen, "with_tokens": self._with_tokens}

    def _restore_fit_state(self, fit: dict[str, Any]) -> None:
        self._rows_seen = int(fit.get("rows_seen", 0))
        self._with_tokens = {k: bool(v) for k, v in fit.get("with_tokens", {}).items()}

    def _feed(self, sink: dict[str, list[tuple]]) -> None:
        # every hook's rows travel first, then each rank learns its hooks: gathering hook by hook between learning
        # steps would make each rank wait for the owner of the previous hook, so the ranks would learn in turn
        device = _comm_device(self.group, sink)
        received, total, tokens = {}, 0, {}
        for i, (name, chunks) in enumerate(sink.items()):
            if self.extras[name].want_neurons:  # raw activations, keep-masks and token ids: rows are rebuilt
                data, n_kept, flag = _pack(chunks, device)
                bufs, info = _gather_bytes(data, [n_kept, flag], self.owner[name], self.group, device)
                tokens[name] = self._tokens_flag(name, [int(x[1]) for x in info])
                n_rows = sum(int(x[0]) for x in info)
                parts = None if bufs is None else [_unpack(buf, tokens[name]) for buf in bufs]
            else:
                rows = [c[0] for c in chunks]
                mine = torch.cat(rows).to(device) if rows else None
                parts, n_rows = _gather_rows(mine, self.owner[name], self.world, self.group, self._width(name, mine),
                                             device)
                parts = None if parts is None else [[(part, None, None, None)] for part in parts]
            total = n_rows if i == 0 else total
            if parts is not None:
                received[name] = parts
        self._rows_seen += total  # nothing changes before every gather has succeeded
        self._with_tokens.update((k, v) for k, v in tokens.items() if v is not None)
        for name, parts in received.items():
            for part in parts:  # rank order; within a rank, the hook's calls in order
                for rows, acts, toks, keep in part:
                    self.learners[name].partial_fit(rows)
                    self.extras[name].update(rows, acts, toks, keep)

    def _tokens_flag(self, name: str, flags: list[int]) -> bool | None:
        """Whether hook ``name``'s neuron statistics get token ids this forward (None: no rank kept a row), from
        every rank's flags (bit 0: a chunk with tokens, bit 1: a chunk without); the same answer on every rank."""
        union = 0
        for f in flags:
            union |= f
        started = self._with_tokens.get(name)
        if union == 0:
            return None
        if started is False:  # as SparsityCollector: statistics started without tokens go on without
            if union & 1:
                warnings.warn(f"hook {name}: its neuron statistics were started without token ids, so fit goes on "
                              "without them too (token and trigram detectors stay off).", stacklevel=3)
            return False
        if union == 3:
            raise ValueError(f"hook {name}: neuron statistics got token ids from some ranks and none from others in "
                             "one forward; pass integer token batches to fit on every rank (or embeddings on all).")
        if started and union == 2:
            raise ValueError(f"hook {name}: its neuron statistics were started with token ids and this forward has "
                             "none: pass integer token batches to fit every time, or never.")
        return union == 1

    def _width(self, name: str, rows: Tensor | None) -> int:
        return rows.shape[1] if rows is not None else int(self.learners[name].d_in or 0)

    # ------------------------------------------------------------------ results
    def report(self, controls: bool | None = None) -> SparsityReport:
        """The full report on every rank: each rank evaluates the hooks it owns, then all rows are gathered."""
        import torch.distributed as dist

        rows = self._rows(self.owned())
        meta: dict[str, Any] = {"model": _hooks.model_info(self.model), "options": self.learners_params(),
                                "skip_bos": self.skip_bos, "hook_parallel": {"world_size": self.world}}
        tables = _rows.add_to_report(self, rows, meta, self.controls if controls is None else bool(controls))
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (rows, tables, meta.get("controls"), meta.get("neurons")), group=self.group)
        by_hook = {r["hook"]: r for part in gathered for r in part[0]}
        all_rows = [by_hook[name] for name in self.hook_points]
        if all(r["status"].startswith("no tokens") for r in all_rows):
            raise RuntimeError("no activations collected yet: run fit(...) on every rank first.")
        pooled = {k: v for part in gathered for k, v in part[1].items()}
        all_tables = {f"neurons/{n}": pooled.pop(f"neurons/{n}") for n in self.hook_points if f"neurons/{n}" in pooled}
        all_tables.update(pooled)  # in hook order, as SparsityCollector's
        if any(part[2] for part in gathered):
            meta["controls"] = next(part[2] for part in gathered if part[2])
        if "neurons" in meta:  # each hook's token count from its owner
            meta["neurons"]["n_tokens_seen"] = {n: gathered[self.owner[n]][3]["n_tokens_seen"][n]
                                                for n in self.neuron_hooks}
        return SparsityReport(all_rows, meta, all_tables)


def _gather_rows(rows: Tensor | None, dst: int, world: int, group: Any, width: int,
                 device: torch.device) -> tuple[list[Tensor] | None, int]:
    """Gather every rank's ``rows`` ``[n_r, d]`` (on ``device``) to rank ``dst`` (in rank order; None on the other
    ranks), and the total number of rows over all ranks (on every rank)."""
    import torch.distributed as dist

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


def _comm_device(group: Any, sink: dict[str, list[tuple]]) -> torch.device:
    """Where collectives' tensors live: the CPU for gloo (its gather takes CPU tensors only), else (NCCL) the device of
    this rank's activations (:func:`~tl_sparsity.scale.ranks.comm_device` when this rank has none)."""
    device = comm_device(group)
    if device.type == "cpu":
        return device
    local = next((c[0].device for chunks in sink.values() for c in chunks), None)
    return local if local is not None else device


def _pack(chunks: list[tuple], device: torch.device) -> tuple[Tensor, int, int]:
    """One rank's neuron inputs of one hook (the sink's ``(rows, acts, toks, keep)`` chunks, ``acts`` ``[b, p, d]``)
    as one uint8 buffer: an int64 header (chunk count, then per chunk b, p, d, dtype code, tokens given) and token
    ids ``[b, p]``, then each chunk's activation bytes, then its keep-mask bytes, every part padded to 8 bytes.
    Chunks with no kept row are left out (they change nothing). Returns ``(buffer, kept rows, tokens flag)``: flag
    bit 0 when a chunk carries token ids, bit 1 when one does not."""
    kept = [c for c in chunks if c[0].shape[0]]
    head, ints, acts, keeps, flag = [len(kept)], [], [], [], 0
    for rows, a, toks, keep in kept:
        a = a if a.dtype in _DTYPES else a.float()  # exact for narrower floats: NeuronStats only thresholds
        b, p, d = a.shape
        head += [b, p, d, _DTYPES.index(a.dtype), int(toks is not None)]
        flag |= 1 if toks is not None else 2
        if toks is not None:
            ints.append(toks.reshape(b, p).to(device, torch.int64).reshape(-1))
        acts.append(_bytes(a.to(device)))
        keeps.append(_bytes(keep.to(device, torch.uint8)))
    ints.insert(0, torch.tensor(head, dtype=torch.int64, device=device))
    buf = torch.cat([_bytes(torch.cat(ints)), *acts, *keeps])
    return buf, sum(int(c[0].shape[0]) for c in kept), flag


def _unpack(buf: Tensor, tokens: bool | None) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor]]:
    """The chunks ``(rows, acts, toks, keep)`` of one :func:`_pack` buffer (views of it; ``toks`` None unless
    ``tokens``); ``rows`` are rebuilt as the collector builds them: ``acts[keep]`` as float32."""
    n = int(buf[:8].view(torch.int64)[0])
    specs = buf[: 8 * (1 + _HEAD * n)].view(torch.int64)[1:].view(n, _HEAD).tolist()
    off = 8 * (1 + _HEAD * n)
    toks: list[Tensor | None] = []
    for b, p, _, _, has in specs:
        toks.append(buf[off: off + 8 * b * p].view(torch.int64).view(b, p) if has and tokens else None)
        off += 8 * b * p if has else 0
    acts = []
    for b, p, d, code, _ in specs:
        size = b * p * d * _DTYPES[code].itemsize
        acts.append(buf[off: off + size].view(_DTYPES[code]).view(b, p, d))
        off += _pad8(size)
    out = []
    for (b, p, _, _, _), a, t in zip(specs, acts, toks):
        keep = buf[off: off + b * p].view(b, p).bool()
        off += _pad8(b * p)
        out.append((a[keep].to(torch.float32), a, t, keep))
    return out


def _bytes(t: Tensor) -> Tensor:
    """``t``'s bytes as a flat uint8 tensor, padded with zeros to a multiple of 8 (so every part stays aligned)."""
    flat = t.contiguous().view(-1).view(torch.uint8)
    pad = _pad8(flat.numel()) - flat.numel()
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _gather_bytes(data: Tensor, extra: list[int], dst: int, group: Any, device: torch.device
                  ) -> tuple[list[Tensor] | None, list[list[int]]]:
    """Gather every rank's uint8 ``data`` (on ``device``; lengths may differ) to rank ``dst``; returns the buffers in
    rank order (None on the other ranks) and every rank's integers ``extra`` (on every rank)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    sizes = [torch.zeros(1 + len(extra), dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel(), *extra], device=device), group=group)
    info = [s.tolist() for s in sizes]
    longest = max(s[0] for s in info)
    padded = data if data.numel() == longest else torch.cat([data, data.new_zeros(longest - data.numel())])
    out = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank(group) == dst else None
    dist.gather(padded, out, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
    return (None if out is None else [o[: s[0]] for o, s in zip(out, info)]), [s[1:] for s in info]
