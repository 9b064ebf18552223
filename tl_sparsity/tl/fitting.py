"""The work of :meth:`SparsityCollector.fit <tl_sparsity.tl.collector.SparsityCollector.fit>` (documented there): its
checks, a parallel mode's prelude (``col._fit_setup``), resuming from a checkpoint, the loop over token batches with
``until="converged"`` freezing, and one batch's forward.

A batch reaches the learners only once its forward has completed: the hooks attached here put their rows into a sink,
and the collector's ``_feed`` hands the sink over with interrupts deferred.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..coding.safe_io import defer_interrupts
from . import checkpoint as _ckpt
from . import hooks as _hooks
from . import resume as _resume
from . import text_input as _text_input

__all__ = ["fit", "fit_batch", "stop_early"]


def fit(col: Any, token_batches: Iterable[Any] | Tensor, n_tokens: int | None, progress: bool,
        checkpoint_dir: str | Path | None, checkpoint_every: int | None, until: str | None, max_tokens: int | None,
        forward_kwargs: dict[str, Any]) -> None:
    """Run ``col``'s model over ``token_batches`` with its hooks attached (``SparsityCollector.fit``)."""
    n_tokens = _check(col, n_tokens, checkpoint_dir, checkpoint_every, until, max_tokens)
    token_batches = _text_input.as_batches(col, token_batches)  # text → windows through the model's tokenizer
    if isinstance(token_batches, Tensor):
        token_batches = [token_batches]
    # parallel modes: one folder per rank, resumed from the newest checkpoint all ranks have, the same batch count
    token_batches, checkpoint_dir, resume_from, progress = col._fit_setup(token_batches, checkpoint_dir, progress)
    auto_stop = "stop_at_layer" not in forward_kwargs and "stop_at_layer" in forward_params(col.model) and not (
        forward_kwargs.get("fwd_hooks"))  # another tool's hooks may be anywhere: the whole model runs
    forward_kwargs.setdefault("return_type", None)
    batches = iter(token_batches)
    done, start, last_fp = 0, col.n_tokens, None
    if resume_from is not None and _ckpt.exists(resume_from):
        done, start, last_fp, fit_state = _resume.resume_fit(col, resume_from, batches, stacklevel=4)
        col._restore_fit_state(fit_state)
    saved_at = done
    if n_tokens is not None and col.n_tokens - start >= n_tokens:
        batches = iter(())  # a resumed run that had already reached n_tokens
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, initial=col.n_tokens - start, unit="tok", unit_scale=True, desc="tl_sparsity")
    active = list(col.hook_points)
    col._in_fit = True  # fit's bar counts tokens: no second bar for the learning inside its forwards
    try:
        with torch.no_grad():
            for batch in batches:
                if until is not None:  # converged hooks are frozen: not attached, not fed
                    active = [n for n in active if not col.learners[n].converged_]
                    if not active:
                        break
                tokens, mask = _hooks.split_batch(batch)
                before = col.n_tokens
                kwargs = stop_early(col.model, active, forward_kwargs) if auto_stop else forward_kwargs
                fit_batch(col, tokens, mask, kwargs, active)
                done += 1
                last_fp = None if checkpoint_dir is None else _ckpt.fingerprint(tokens, mask)
                if bar is not None:  # the budget's last forward may overshoot it: the bar stops at its total
                    bar.update(min(col.n_tokens - before, bar.total - bar.n) if bar.total else col.n_tokens - before)
                if checkpoint_every and done % int(checkpoint_every) == 0:
                    saved_at = _checkpoint(col, checkpoint_dir, done, start, last_fp)
                if n_tokens is not None and col.n_tokens - start >= n_tokens:
                    break
        if checkpoint_dir is not None and saved_at != done:
            _checkpoint(col, checkpoint_dir, done, start, last_fp)
    finally:
        col._in_fit = False
        if bar is not None:
            if bar.total is None or bar.n < bar.total:  # the batches ended (or all converged) first: end there
                bar.total = bar.n
                bar.refresh()
            bar.close()


def _check(col: Any, n_tokens: int | None, checkpoint_dir: str | Path | None, checkpoint_every: int | None,
           until: str | None, max_tokens: int | None) -> int | None:
    """Raise on an invalid combination of ``fit``'s arguments; returns the token budget."""
    if max_tokens is not None:
        if n_tokens is not None:
            raise ValueError("give the token budget once: n_tokens or max_tokens (the same thing), not both.")
        n_tokens = max_tokens
    if n_tokens is not None and int(n_tokens) <= 0:
        raise ValueError(f"n_tokens must be a positive integer or None, got {n_tokens!r}.")
    if until not in (None, "converged"):
        raise ValueError(f"until must be None (run through the batches or the budget) or 'converged', got "
                         f"{until!r}.")
    if checkpoint_every is not None and (checkpoint_dir is None or int(checkpoint_every) < 1):
        raise ValueError("checkpoint_every must be a positive number of batches, and needs checkpoint_dir.")
    if checkpoint_dir is not None:  # before any forward, not at the first checkpoint
        _ckpt.check_not_a_file(checkpoint_dir)
    return n_tokens


def _checkpoint(col: Any, root: str | Path, done: int, start: int, fp: str | None) -> int:
    _ckpt.save_collector(col, root, fit={"batches_done": done, "start_tokens": start, "last_batch_sha256": fp,
                                         **col._fit_state()})
    return done


def stop_early(model: Any, names: list[str], forward_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``forward_kwargs`` with ``stop_at_layer`` after the last layer of ``names`` when all are in blocks."""
    layers = [_hooks.parse_hook_name(n)[0] for n in names]
    if not layers or any(layer is None for layer in layers):
        return forward_kwargs
    n_layers = getattr(model.cfg, "n_layers", None)
    last = max(layers) + 1  # type: ignore[type-var]
    return forward_kwargs if n_layers is not None and last >= n_layers else {**forward_kwargs, "stop_at_layer": last}


def fit_batch(col: Any, tokens: Any, mask: Tensor | None, forward_kwargs: dict[str, Any],
              names: list[str] | None = None) -> None:
    """One forward of ``col``'s model on ``tokens`` with the hooks of ``names`` (default: all) attached; their rows
    reach the learners and side statistics (``col._feed``) only once the forward has completed. Another tool's hooks
    (``forward_kwargs["fwd_hooks"]``) are added first, so on a hook point both use, theirs run before ours."""
    names = list(col.hook_points) if names is None else names
    if isinstance(tokens, Tensor) and tokens.numel() == 0:  # an empty batch: nothing to run
        col._feed({name: [] for name in names})  # nothing in one process; parallel: the other ranks' rows count
        return
    sink: dict[str, list[tuple]] = {name: [] for name in names}
    col._fit_forwards = getattr(col, "_fit_forwards", 0) + 1  # for report()'s message when no row was kept
    ids = tokens if isinstance(tokens, Tensor) and not tokens.is_floating_point() else None
    kwargs = dict(forward_kwargs)
    key = mask_keyword(col.model) if mask is not None else None
    if key is not None and key not in kwargs:
        kwargs[key] = mask  # padding must not be attended to (bidirectional models, left padding)
    theirs = list(kwargs.pop("fwd_hooks", None) or [])
    with col.model.hooks(fwd_hooks=theirs) if theirs else contextlib.nullcontext(), col._attached(
            mask, sink, tokens=ids, names=names):
        col.model.run_with_hooks(tokens, fwd_hooks=[], **kwargs)
    with defer_interrupts(), torch.inference_mode(False):  # learners and statistics: all or nothing
        col._feed(sink)


def forward_params(model: Any) -> Any:
    """The parameters of ``model.forward`` (empty when its signature cannot be read)."""
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def mask_keyword(model: Any) -> str | None:
    """``attention_mask`` (HookedTransformer, bridge) or ``one_zero_attention_mask`` (HookedEncoder)."""
    params = forward_params(model)
    return next((k for k in ("attention_mask", "one_zero_attention_mask") if k in params), None)
