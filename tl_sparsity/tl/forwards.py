"""Whole forwards for the hooks of ``SparsityCollector.start()``: the rows they take during one forward of the model
reach the learners only when that forward returns, so a forward that raises (in another tool's hook, say) gives
none of its rows to any hook, and every hook keeps the same rows.

The model's ``forward`` is wrapped (an attribute of the model instance, which ``model(...)``, ``run_with_hooks``,
``run_with_cache`` and ``generate`` all call) while the collector is started; ``stop()`` removes the wrapper, or
leaves it inert while something else wraps ``forward`` over it (another started collector: its ``stop()`` then
removes both). Stop the collector before copying the model: a copy would share the wrapper.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ..coding.safe_io import defer_interrupts

__all__ = ["WholeForwards", "feed_each"]


class WholeForwards:
    """Holds what ``hold()`` is given during a forward of ``model`` and hands it to ``feed`` once that (outermost)
    forward has returned; drops it, for every hook, when the forward raises."""

    def __init__(self, model: Any, feed: Callable[[dict[str, list[tuple]]], None],
                 before: Callable[[], None] | None = None) -> None:
        self.model, self.feed, self.before = model, feed, before  # before: called as an outermost forward starts
        self.active, self.depth = False, 0
        self.sink: dict[str, list[tuple]] = {}
        self._wrapper: Callable | None = None
        self._had_own = False  # whether the model instance had its own ``forward`` before ours

    def hold(self) -> dict[str, list[tuple]] | None:
        """The sink of the forward running now, or None outside one (then rows are fed at once)."""
        return self.sink if self.active and self.depth else None

    def install(self) -> None:
        self.active = True
        if self._wrapper is not None:  # still in place (inert since a stop())
            return
        inner = self.model.forward
        self._had_own = "forward" in vars(self.model)

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return inner(*args, **kwargs)
            if self.depth == 0 and self.before is not None:
                self.before()  # e.g. hooks moved to HookPoints that replaced theirs (tl_sparsity.tl.attach.refresh)
            self.depth += 1
            if self.depth == 1:
                self.sink = {}
            try:
                out = inner(*args, **kwargs)
            except BaseException:
                if self.depth == 1:
                    self.sink = {}  # the failed forward's rows: given to no hook
                raise
            finally:
                self.depth -= 1
            if self.depth == 0 and self.sink:
                sink, self.sink = self.sink, {}
                self.feed(sink)
            return out

        forward._tl_sparsity_forwards = self  # type: ignore[attr-defined]
        self._wrapper = forward
        self._inner = inner
        self.model.forward = forward

    def remove(self) -> None:
        self.active, self.sink = False, {}
        if self._wrapper is None or vars(self.model).get("forward") is not self._wrapper:
            return  # not installed, or wrapped again by something else: left in place, inert
        below: WholeForwards | None = self
        while below is not None and not below.active:  # ours, then inert ones left under it by earlier stop()s
            below._unwrap()
            below = getattr(vars(self.model).get("forward"), "_tl_sparsity_forwards", None)

    def _unwrap(self) -> None:
        if self._had_own:
            self.model.forward = self._inner
        else:
            del self.model.forward
        self._wrapper = None


def feed_each(col: Any, sink: dict[str, list[tuple]]) -> None:
    """Hand one completed forward's chunks ``(rows, acts, toks, keep)`` to each hook's learner (``partial_fit``)
    and side statistics: the ``torch.distributed`` modes' feeding (one process: :func:`tl_sparsity.tl.budget.feed`)."""
    with defer_interrupts(), torch.inference_mode(False), torch.no_grad():
        for name, chunks in sink.items():
            for rows, acts, toks, keep in chunks:
                col.learners[name].partial_fit(rows)
                col.extras[name].update(rows, acts, toks, keep)
