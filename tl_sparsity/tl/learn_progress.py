"""A progress bar (``tqdm.auto``: a widget in notebooks) for the learning that happens inside a forward.

With ``start()``, ``attach()`` or ``fwd_hooks()``, the forward that completes a learner batch (4096 rows by default)
also trains on it, for every hook: on CPU that can take seconds to minutes with no sign of life. :func:`learning_bar`
counts the learner batches a completed forward's rows will train, and when there are any shows a bar that advances
as each hook's batch is done (shown only when the learning lasts longer than :data:`DELAY` seconds). ``fit`` has its
own bar over tokens and turns this one off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["DELAY", "drain", "feed_each", "learning_bar", "planned_batches"]

DELAY = 0.5  #: seconds of learning before the bar appears (short learning shows nothing)


def planned_batches(col: Any, sink: dict[str, list[tuple]]) -> int:
    """Learner batches that feeding ``sink`` (per hook, the kept ``(rows, ...)`` chunks of a forward) will train."""
    total = 0
    for name, chunks in sink.items():
        learner = col.learners[name]
        rows = sum(int(c[0].shape[0]) for c in chunks)
        total += (learner.n_pending_ + rows) // int(learner.batch_size)  # a deferred backlog included
    return total


@contextlib.contextmanager
def learning_bar(col: Any, sink: dict[str, list[tuple]]) -> Iterator[None]:
    """Within the block, each learner batch that ``col``'s learners finish advances a bar (see the module); nothing
    when ``col.progress`` is off, inside ``fit``, data-parallel, or when the forward completes no learner batch."""
    n = 0 if not col.progress or getattr(col, "_in_fit", False) or col.parallel else planned_batches(col, sink)
    if not n:
        yield
        return
    from tqdm.auto import tqdm

    hooks = f"{len(sink)} hook{'' if len(sink) == 1 else 's'}"
    bar = tqdm(total=n, desc=f"tl_sparsity: learning ({hooks})", unit="batch", leave=False, delay=DELAY)
    learners = [col.learners[name] for name in sink]
    for learner in learners:
        learner.on_batch = lambda: bar.update(1)  # once per learner batch, whichever way the batch is trained
    try:
        yield
    finally:
        for learner in learners:
            del learner.on_batch  # back to the class's None
        bar.close()


def feed_each(col: Any, sink: dict[str, list[tuple]]) -> None:
    """``start()``'s and ``attach()``'s feeding (:func:`tl_sparsity.tl.budget.feed`: within the learning budget)
    with :func:`learning_bar`."""
    from . import budget

    with learning_bar(col, sink):
        budget.feed(col, sink)


def drain(col: Any) -> None:
    """:func:`tl_sparsity.tl.budget.drain` (the learners' deferred batches) with a bar over those batches."""
    from . import budget

    with learning_bar(col, {name: [] for name, lr in col.learners.items() if lr.n_pending_ >= lr.batch_size}):
        budget.drain(col)
