"""How one completed forward's kept rows reach a collector's learners and side statistics: hook learners of one shape
train together (data-parallel collectors feed their own way: :mod:`tl_sparsity.scale.data_parallel`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..coding.grouped import train_together

__all__ = ["feed", "all_finite"]


def feed(col: Any, sink: dict[str, list[tuple]]) -> None:
    """Hand ``sink`` (per hook, the ``(rows, acts, toks, keep)`` chunks of one completed forward) to ``col``'s
    learners and side statistics (``SparsityCollector._feed``).

    The rows are checked for NaN/Inf with one host synchronisation for all hooks, not one per hook, so on CUDA the
    CPU queues every hook's learner work without waiting for the previous hook's, and learners of one shape take
    their batches together (:func:`tl_sparsity.coding.grouped.train_together`: on CUDA, one set of launches for all
    hooks' r-th batches)."""
    finite = iter(all_finite([c[0] for chunks in sink.values() for c in chunks]))
    queues = []  # per hook, the full batches this forward completes, in stream order
    for name, chunks in sink.items():
        learner, batches = col.learners[name], []
        for (rows, acts, toks, keep), ok in zip(chunks, [next(finite) for _ in chunks]):
            batches.extend(learner.batches(rows, check_finite=not ok))  # NaN/Inf: the learner drops them
            col.extras[name].update(rows, acts, toks, keep)
        queues.append((learner, batches))
    for r in range(max((len(b) for _, b in queues), default=0)):  # each hook's r-th batch, all together
        train_together([(lr, lr.prepare(b[r])) for lr, b in queues if r < len(b)])


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
