"""Where and how often a :class:`~tl_sparsity.tl.collector.SparsityCollector`'s hooks are attached.

**By name, when attached.** A collector keeps hook *names*, not HookPoint objects: ``fwd_hooks()``, ``attach()``
and ``fit()`` look each name up in the model's ``hook_dict`` when they are called, and the hooks of ``start()`` are
looked up again at the start of every forward (and moved when the HookPoint has changed). Tools that replace a
HookPoint — SAELens ``add_sae`` / ``reset_saes`` / ``HookedSAETransformer.run_with_saes`` (with or without
``use_error_term``) — therefore neither blind nor break a collector. Where an SAE sits at a name the collector
measures, the collector measures the SAE's input hook point ``<name>.hook_sae_input``: the activation the model
computed there, i.e. what the user named. The SAE's own hook points (``<name>.hook_sae_acts_post``: its latents,
...) are measured when named explicitly. The report's ``measured`` column says which object each hook measured.

**Once per forward.** One collector feeds each hook point at most once per forward. Mixing ways of attaching that
would feed a row twice raises a :class:`DoubleCountError` naming the mix and the fix, instead of counting twice
(where a copy could be trained on while its twin is held out): ``fwd_hooks()``, ``attach()`` or ``fit()`` while the
collector is started, or inside ``with col.attach():``; ``start()`` inside ``attach()``; and, during a forward, a
collector hook that sees the very activation another of its hooks already took (e.g. a ``fwd_hooks()`` list used
after ``start()``, or two such lists in one ``run_with_hooks``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from . import hooks as _hooks

__all__ = ["DoubleCountError", "HookName", "locate", "describe", "check_free", "attached", "start", "stop",
           "refresh", "first_sight", "record", "measured_label"]

#: what an SAE hook point carries (SAELens names)
SAE_PARTS = {
    "hook_sae_input": "the SAE's input: the model's activation there",
    "hook_sae_acts_pre": "the SAE's latents before its activation function",
    "hook_sae_acts_post": "the SAE's latents",
    "hook_sae_recons": "the SAE's reconstruction",
    "hook_sae_error": "the SAE's error term",
    "hook_sae_output": "the SAE's output: what the model reads on",
}
_FIX = ("use one way at a time: col.stop() before col.fwd_hooks() / col.attach() / col.fit(...), or, while "
        "started, just run the model (every forward is measured once).")


class DoubleCountError(RuntimeError):
    """Raised instead of feeding a collector's learners the same rows twice."""


def locate(col: Any, name: str, hook_dict: dict[str, Any] | None = None) -> tuple[str, Any]:
    """``(name measured, HookPoint)`` for the collector hook ``name`` now, recorded for the report; raises a
    ``KeyError`` naming SAEs and their hook points when the name is not in the model now."""
    hook_dict = dict(col.model.hook_dict) if hook_dict is None else hook_dict
    found = _hooks.point(hook_dict, name)
    if found is None:
        raise _hooks._unknown(name, list(hook_dict) + _hooks.sae_sites(hook_dict), hook_dict)
    col._measured.setdefault(name, {})[found[0]] = None
    return found


def describe(name: str, target: str) -> str:
    """``target`` (the hook point measured for the collector hook ``name``), with what it carries when an SAE's."""
    part = target.rsplit(".", 1)[-1]
    return f"{target} ({SAE_PARTS[part]})" if part in SAE_PARTS else target


def measured_label(col: Any, name: str) -> str:
    """The report's ``measured`` cell: every hook point that fed the collector hook ``name`` ("; "-joined)."""
    return "; ".join(describe(name, t) for t in col._measured.get(name, {name: None}))


def check_free(col: Any, what: str) -> None:
    """Raise :class:`DoubleCountError` when ``what`` (``"col.fit(...)"``, ...) would add a second set of hooks."""
    if col._started:
        raise DoubleCountError(f"{what} on a started collector would feed every row twice: the hooks of col.start() "
                               f"see those forwards too. {_FIX}")
    if col._attached_depth:
        raise DoubleCountError(f"{what} inside `with col.attach():` (or during col.fit(...)) would feed every row "
                               f"twice: the collector's hooks are attached already. {_FIX}")


def first_sight(col: Any, name: str, activation: Tensor, hook_point: Any, own: bool) -> None:
    """Called by every collector hook as it runs: raise :class:`DoubleCountError` when another of this collector's
    hooks already took this very activation at ``name``, or (a ``fwd_hooks()`` hook, ``own`` False) when the
    collector's own hooks sit on ``hook_point``."""
    seen = col._last_seen.get(name)
    if (seen is not None and seen() is activation) or (
            not own and hook_point is not None and id(hook_point) in col._on):
        raise DoubleCountError(f"{name}: this collector's hooks ran twice in one forward, so its rows would be "
                               f"counted twice (col.fwd_hooks() used together with col.start(), col.attach(), "
                               f"col.fit() or another col.fwd_hooks() list). {_FIX}")
    col._last_seen[name] = weakref.ref(activation)
    if not own:
        record(col, name, hook_point)


def _add(col: Any, name: str, fn: Any, permanent: bool, hook_dict: dict[str, Any]) -> tuple[Any, list[Any]]:
    hp = locate(col, name, hook_dict)[1]
    handles = _hooks.add_hook(hp, fn, permanent)
    col._on[id(hp)] = col._on.get(id(hp), 0) + 1
    return hp, handles


def _remove(col: Any, hp: Any, handles: list[Any]) -> None:
    _hooks.remove_hook(hp, handles)
    left = col._on.get(id(hp), 0) - 1
    if left > 0:
        col._on[id(hp)] = left
    else:
        col._on.pop(id(hp), None)


class HookName:
    """The name in a ``fwd_hooks()`` pair: a filter that TransformerLens applies to ``hook_dict`` when
    ``run_with_hooks`` (or SAELens ``run_with_hooks_with_saes``, after adding its SAEs) attaches the hook, so the
    hook lands on the HookPoint named ``name`` then, or on the SAE's input hook point where an SAE has replaced it.
    Compares equal to the plain name. A match also marks a new forward for the once-per-forward check (an
    activation reused by a later forward, e.g. a cached residual passed again with ``start_at_layer``, is new)."""

    def __init__(self, name: str, col: Any) -> None:
        self.name, self._col = name, col

    def __call__(self, hook_name: str) -> bool:
        hit = hook_name == self.name or hook_name == f"{self.name}.{_hooks.SAE_INPUT}"
        if hit:
            self._col._last_seen.pop(self.name, None)
        return hit

    def __eq__(self, other: object) -> bool:
        return other == self.name if isinstance(other, str) else isinstance(other, HookName) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"HookName({self.name!r})"


def record(col: Any, name: str, hook_point: Any) -> None:
    """Note, for the report, the hook point a ``fwd_hooks()`` hook of ``name`` ran on (its TransformerLens name)."""
    target = getattr(hook_point, "name", None)
    col._measured.setdefault(name, {})[target if target == f"{name}.{_hooks.SAE_INPUT}" else name] = None


@contextlib.contextmanager
def attached(col: Any, attention_mask: Tensor | None, sink: dict[str, list[tuple]] | None = None,
             tokens: Tensor | None = None, names: list[str] | None = None, what: str = "col.attach()"
             ) -> Iterator[None]:
    """Hooks for ``names`` (default: all) from now until exit (``attach()``, ``fit()``): looked up now (a name the
    model lacks raises here), and again before every forward of the model, like those of :func:`start`."""
    check_free(col, what)
    hook_dict = dict(col.model.hook_dict)
    names = list(col.hook_points) if names is None else names
    for name in names:
        locate(col, name, hook_dict)
    col._attached_depth += 1
    col._temporary_fns = {n: col._hook_fn(n, attention_mask, sink=sink, tokens=tokens, own=True) for n in names}
    try:
        col._forwards.install()
        refresh(col)
        yield
    finally:
        col._attached_depth -= 1
        col._temporary_fns = {}
        _clear(col, col._temporary)
        if not col._started:
            col._forwards.remove()


def start(col: Any) -> None:
    """``SparsityCollector.start``: persistent hooks on every hook point the names reach now."""
    if col._attached_depth:
        raise DoubleCountError("col.start() inside `with col.attach():` or col.fit(...) would feed every row twice. "
                               + _FIX)
    col._forwards.install()
    col._started = True
    refresh(col)


def refresh(col: Any) -> None:
    """Before every forward of the model (while started or attached): move the collector's hooks to the HookPoints
    their names reach now (an SAE added or removed since); a name that reaches none now (an SAE's hook point, the
    SAE gone) waits. A new forward: activations taken before it may come again (once-per-forward check)."""
    col._last_seen.clear()
    if not col._started and not col._temporary_fns:
        return
    hook_dict = dict(col.model.hook_dict)
    if col._started:
        _move(col, col._persistent, {n: None for n in col.hook_points}, True, hook_dict)
    _move(col, col._temporary, col._temporary_fns, False, hook_dict)


def _move(col: Any, placed: dict[str, tuple[Any, list[Any]]], fns: dict[str, Any], permanent: bool,
          hook_dict: dict[str, Any]) -> None:
    for name, fn in fns.items():
        here, found = placed.get(name), _hooks.point(hook_dict, name)
        if here is not None and found is not None and here[0] is found[1]:
            continue
        if here is not None:
            _remove(col, *here)
            del placed[name]
        if found is not None:
            fn = fn or col._hook_fn(name, use_attribute=True, own=True)  # start()'s
            if found[0] != name:  # an SAE's hook point: the SAE outlives run_with_saes, and may run on its own
                fn = _only_inside(col, fn)
            placed[name] = _add(col, name, fn, permanent, hook_dict)


def _only_inside(col: Any, fn: Any) -> Any:
    """``fn`` run only during a forward of the collector's model (not when the SAE that holds the hook runs
    elsewhere: called directly, or attached to another model, before the next forward moves the hook back)."""

    def hook(activation: Tensor, hook: Any = None) -> None:
        if col._forwards.depth:
            fn(activation, hook=hook)

    hook.__name__ = fn.__name__
    return hook


def _clear(col: Any, placed: dict[str, tuple[Any, list[Any]]]) -> None:
    for hp, handles in placed.values():
        _remove(col, hp, handles)
    placed.clear()


def stop(col: Any) -> None:
    """``SparsityCollector.stop``: remove exactly the hooks :func:`start` added."""
    col._started = False
    if not col._attached_depth:
        col._forwards.remove()
    _clear(col, col._persistent)
