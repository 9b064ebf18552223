"""How one completed forward's kept rows reach a collector's learners and side statistics: hook learners of one shape
train together (data-parallel collectors feed their own way: :mod:`tl_sparsity.scale.data_parallel`)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..coding.grouped import train_together

__all__ = ["feed", "all_finite", "train_rounds", "waiting_bytes"]


def feed(col: Any, sink: dict[str, list[tuple]], limit: float | None = None, backlog_bytes: int = 0) -> None:
    """Hand ``sink`` (per hook, the ``(rows, acts, toks, keep)`` chunks of one completed forward) to ``col``'s
    learners and side statistics (``SparsityCollector._feed``; within a learning budget: :mod:`.budget`).

    The rows are checked for NaN/Inf with one host synchronisation for all hooks, not one per hook, so on CUDA the
    CPU queues every hook's learner work without waiting for the previous hook's, and learners of one shape take
    their batches together (:func:`tl_sparsity.coding.grouped.train_together`: on CUDA, one set of launches for all
    hooks' r-th batches). ``limit``: seconds of learning, after which the batches left wait while all learners'
    waiting rows stay within ``backlog_bytes`` (:func:`train_rounds`)."""
    start = time.perf_counter()
    finite = iter(all_finite([c[0] for chunks in sink.values() for c in chunks]))
    queues = []  # per hook, the full batches this forward completes, in stream order
    for name, chunks in sink.items():
        learner, batches = col.learners[name], []
        for (rows, acts, toks, keep), ok in zip(chunks, [next(finite) for _ in chunks]):
            batches.extend(learner.batches(rows, check_finite=not ok))  # NaN/Inf: the learner drops them
            col.extras[name].update(rows, acts, toks, keep)
        queues.append((learner, batches))
    others = waiting_bytes((lr, lr.n_pending_) for name, lr in col.learners.items() if name not in sink)
    train_rounds(queues, limit, start, backlog_bytes - others)  # the bound is the collector's, all hooks together


def train_rounds(queues: list[tuple[Any, list[Tensor]]], limit: float | None = None, start: float = 0.0,
                 backlog_bytes: int = 0) -> None:
    """Each hook's r-th batch, all together, for r = 0, 1, ... With ``limit``: past round 0, a round that would end
    more than ``limit`` seconds after ``start`` (judged by the last round's length) is not started while all
    learners' waiting rows (:func:`waiting_bytes`) stay within ``backlog_bytes``; the batches left are deferred, in
    order (``OnlineSparseCoder.defer``)."""
    began = start
    for r in range(max((len(b) for _, b in queues), default=0)):
        train_together([(lr, lr.prepare(b[r])) for lr, b in queues if r < len(b)])
        now = time.perf_counter()
        if limit is not None and 2 * now - began - start > limit and waiting_bytes(
                (lr, lr.n_pending_ + sum(x.shape[0] for x in b[r + 1:])) for lr, b in queues) <= backlog_bytes:
            for lr, b in queues:
                lr.defer(b[r + 1:])
            return
        began = now


def waiting_bytes(rows: Iterable[tuple[Any, int]]) -> int:
    """Bytes of float32 rows that ``(learner, n_rows)`` pairs hold waiting (each learner's row width)."""
    return sum(4 * n * (lr.d_in or 0) for lr, n in rows)


def all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor is all finite, with one host synchronisation per device instead of one per tensor."""
    out: list[bool] = [True] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        flags = torch.stack([torch.isfinite(tensors[i]).all() for i in idx]).tolist()
        for i, flag in zip(idx, flags):
            out[i] = bool(flag)
    return out
