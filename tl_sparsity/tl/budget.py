"""How much learning a forward of ``start()`` / ``attach()`` does before the rest waits: a budget in seconds per
forward, so that a notebook cell on a CPU returns in seconds however many learner batches its forward completes.

A completed forward's full learner batches are trained in rounds (every hook's r-th batch, the hooks of one shape
together: :func:`tl_sparsity.tl.feeding.train_rounds`, as ``fit`` trains them). Once a round ends past
``col.learn_seconds`` the batches left are put back, untrained and in order, in front of each learner's pending
rows (``OnlineSparseCoder.defer``): the *backlog*. Nothing learns from them meanwhile and nothing is dropped: the next
forward's learning starts with them; ``report()`` and ``flush()`` train all of them first (:func:`drain`, with a
progress bar), and so does ``fit``'s first forward; checkpoints keep them as pending rows. So every number comes
from the same batches, in the same order, as without a budget (the tests check it bit for bit). A round is not
started when the last one's length says it would end past the budget (round 0 always runs). The backlog of all of
a collector's hooks holds at most ``col.backlog_mb`` megabytes of rows (:data:`BACKLOG_MB`, 256 MiB by default: at
d = 576, 116 k rows, e.g. about 50 forwards of 8 × 128 tokens at three hooks); a forward that would leave more trains
on, past its budget, until it does not — memory stays bounded, and from there a forward costs what it does without
a budget. Set it higher to defer more (``report()`` then trains more), 0 to defer nothing.

``col.learn_seconds``: ``"auto"`` (the default) is :data:`CPU_LEARN_SECONDS` where the learners compute on a CPU
and no budget elsewhere; a number of seconds (0: one round per forward); or None: every batch inside its forward.
``fit`` has no budget (its forwards are the job), nor have the ``torch.distributed`` modes (their ranks must take
the same steps). ``fwd_hooks()`` hooks learn inside the hook as each runs, each within its share of the budget.
"""

from __future__ import annotations

from typing import Any

import torch

from ..coding.safe_io import defer_interrupts
from . import feeding as _feeding
from .forwards import feed_each

__all__ = ["BACKLOG_MB", "CPU_LEARN_SECONDS", "Checked", "check_learn_seconds", "check_backlog_mb", "drain", "feed"]

CPU_LEARN_SECONDS = 3.0  #: the default budget per forward where the learners compute on a CPU
BACKLOG_MB = 256.0  #: the default bound on a collector's deferred rows, in MiB (all hooks together)


def check_learn_seconds(value: Any) -> float | str | None:
    """``value`` if it is a valid ``learn_seconds`` (``"auto"``, None or seconds ≥ 0), else a ValueError."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"learn_seconds must be 'auto', None or a number of seconds >= 0, got {value!r}; e.g. "
                         "col.learn_seconds = 3.0, or None to learn every batch inside its forward.")
    return float(value)


def check_backlog_mb(value: Any) -> float:
    """``value`` if it is a valid ``backlog_mb`` (megabytes ≥ 0), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"backlog_mb must be a number of megabytes >= 0, got {value!r}; e.g. col.backlog_mb = 1024 "
                         "to let more rows wait for report(), or 0 to learn every batch inside its forward.")
    return float(value)


class Checked:
    """A collector attribute (``learn_seconds``, ``backlog_mb``: see the module) checked by ``check`` when set."""

    def __init__(self, check: Any, default: Any) -> None:
        self.check, self.default = check, default

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self.attr, self.default)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj, self.attr, self.check(value))


def budget(col: Any, sink: dict[str, list[tuple]]) -> float | None:
    """Seconds of learning this forward may take before its remaining batches wait; None: no limit."""
    seconds = col.learn_seconds
    if seconds is None or col.parallel or getattr(col, "_in_fit", False):
        return None
    if seconds == "auto":
        on_cpu = all(_device(col.learners[name], chunks).type == "cpu" for name, chunks in sink.items())
        return CPU_LEARN_SECONDS if on_cpu else None
    return seconds


def _device(learner: Any, chunks: list[tuple]) -> torch.device:
    if learner.dictionary_ is not None:
        return learner.dictionary_.device
    return torch.device(learner.device) if learner.device else chunks[0][0].device if chunks else torch.device("cpu")


def feed(col: Any, sink: dict[str, list[tuple]], share: int = 1) -> None:
    """Hand one completed forward's chunks ``(rows, acts, toks, keep)`` to each hook's side statistics and learner
    (:func:`tl_sparsity.tl.feeding.feed`) within :func:`budget` (``share``: that many hooks share it, e.g. every
    hook of ``fwd_hooks()``, each fed as it runs). The ``torch.distributed`` modes: each chunk's ``partial_fit``."""
    if col.parallel:
        return feed_each(col, sink)
    limit = budget(col, sink)
    with defer_interrupts(), torch.inference_mode(False), torch.no_grad():
        _feeding.feed(col, sink, None if limit is None else limit / share, int(col.backlog_mb * 2**20))


def drain(col: Any) -> None:
    """Train every learner's deferred backlog (its full pending batches), hooks' r-th batches together."""
    queues = [(lr, batches) for lr in col.learners.values() if (batches := lr.backlog())]
    if queues:
        with defer_interrupts(), torch.inference_mode(False), torch.no_grad():
            _feeding.train_rounds(queues)
