"""``SparsityCollector``: hook functions that stream a model's activations into one learner per hook point.

Hook functions never change the activation (they return ``None``), copy what they keep, flatten
``[batch, pos, ...]`` to rows ``[kept positions, features]``, cast to float32, and drop the BOS position and padding.
TransformerLens is reached only through :mod:`tl_sparsity.hooks`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from . import checkpoint as _ckpt
from . import data_parallel as _dp
from . import ranks as _ranks
from . import extras as _extras
from . import hooks as _hooks
from .grouped import train_together
from .learner import OnlineSparseCoder
from .report import SparsityReport

__all__ = ["SparsityCollector"]


class SparsityCollector:
    """Measure feature sparsity at a model's hook points (``PAPER.md``), one :class:`OnlineSparseCoder` per hook.

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.
        hooks: alias (``"resid_post"`` → every layer; see :data:`tl_sparsity.hooks.ALIASES`), exact HT-style
            name, glob, filter function, comma-separated string or list of these.
        skip_bos: drop the first position of each sequence (the first attended one when an ``attention_mask`` is
            given). BOS/[CLS] activations have outsized norms; set False if your inputs carry no BOS.
        controls: keep each hook's streamed mean and covariance (float64, d × d) of the rows its learner gets, so that
            ``report()`` adds ``control_normalized_loss``, ``control_normalized_loss_se`` and ``sparsity_ratio`` (the
            same learner trained on a Gaussian with that mean and covariance; as costly as the learning itself).
        neurons: neuron statistics (:class:`~tl_sparsity.neurons.NeuronStats`: dead neurons, firing rates, token /
            trigram detectors, positional neurons) — None: on for ``mlp_post`` hooks; False: off; True: every hook;
            or hook names / aliases / globs among ``hooks``. Token detectors need token ids: ``fit`` passes them,
            ``fwd_hooks`` / ``attach`` take ``tokens=``, ``start()`` reads ``col.tokens``.
        neuron_options: keyword arguments of ``NeuronStats`` (``threshold``, ``absolute``, ``trigram_slots``, ...).
        parallel: ``"auto"`` (default): data-parallel when ``torch.distributed`` is initialised with more than one
            rank — every rank runs its replica on its own tokens, every hook's learner is shared by all ranks
            (:mod:`tl_sparsity.data_parallel`), and ``report()`` (called on every rank) describes all ranks' tokens;
            ``"data"``: the same, required; None: this process on its own. Every rank must run the same forwards.
        process_group: the ``torch.distributed`` group of the data-parallel ranks (default: the world).
        **learner_options: passed to every :class:`OnlineSparseCoder` (``expansion``, ``lam``, ``seed``, ...).

    Use ``model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks() + others)``, ``with col.attach(): model(tokens)``,
    ``col.start()`` / ``col.stop()`` across notebook cells, or ``col.fit(batches)``; then ``col.report()``.
    """

    def __init__(self, model: Any, hooks: _hooks.HookSpec = "resid_post", *, skip_bos: bool = True,
                 controls: bool = False, neurons: Any = None, neuron_options: dict[str, Any] | None = None,
                 parallel: str | None = "auto", process_group: Any = None, **learner_options: Any) -> None:
        self.model = model
        self.hook_points = _hooks.resolve_hooks(model, hooks)
        self.skip_bos = bool(skip_bos)
        self.learner_options = dict(learner_options)
        OnlineSparseCoder(**self.learner_options)  # validate options once, with a clear error
        self.parallel = _dp.resolve_parallel(parallel, process_group)
        make = (lambda: _dp.DataParallelCoder(group=process_group, **self.learner_options)) if self.parallel else (
            lambda: OnlineSparseCoder(**self.learner_options))
        self.learners: dict[str, OnlineSparseCoder] = {name: make() for name in self.hook_points}
        if not isinstance(controls, bool):
            raise TypeError(f"controls must be True or False, got {controls!r}.")
        self.controls = controls
        self.neuron_hooks = _extras.neuron_hooks(model, self.hook_points, neurons)
        self.neuron_options = _extras.check_neuron_options(neuron_options)
        self.extras = {name: _extras.HookExtras(name, controls, name in self.neuron_hooks, self.neuron_options)
                       for name in self.hook_points}  # per hook: covariance and neuron statistics
        self.attention_mask: Tensor | None = None  # used by hooks added with start()
        self.tokens: Tensor | None = None  # token ids [batch, pos] used by hooks added with start()
        self._persistent: dict[str, list[Any]] = {}

    def __repr__(self) -> str:
        state = "started" if self._persistent else "idle"
        return f"SparsityCollector({len(self.hook_points)} hooks, {state}, tokens={self.n_tokens})"

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_points)

    @property
    def n_tokens(self) -> int:
        """Rows received by the hook that received most (trained, held out and pending); hooks frozen by
        ``fit(..., until="converged")`` stop counting."""
        if not self.learners:
            return 0
        return max(lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_ for lr in self.learners.values())

    # ------------------------------------------------------------------ hook functions
    def keep_mask(self, activation: Tensor, attention_mask: Tensor | None = None) -> Bool[Tensor, "batch pos"]:
        """The positions a hook keeps of ``activation`` ``[batch, pos, ...]``: attended (``attention_mask``), minus
        BOS (the first attended position) when ``skip_bos``. A new tensor, on the activation's device."""
        if activation.ndim < 2:
            raise ValueError(f"expected an activation [batch, pos, ...], got shape {tuple(activation.shape)}.")
        (b, p), dev = activation.shape[:2], activation.device
        with torch.inference_mode(False):  # usable outside inference mode too
            keep = torch.ones(b, p, dtype=torch.bool, device=dev)
            if attention_mask is not None:
                mask = torch.as_tensor(attention_mask).to(dev)
                if tuple(mask.shape) != (b, p):
                    raise ValueError(
                        f"attention_mask has shape {tuple(mask.shape)} but the activation is [batch={b}, pos={p}, "
                        "...]; pass the mask of the tokens of this forward."
                    )
                keep &= mask.bool()
            if self.skip_bos and p > 0:
                first = keep.int().argmax(dim=1) if attention_mask is not None else torch.zeros(b, dtype=torch.long)
                keep[torch.arange(b, device=dev), first.to(dev)] = False
        return keep

    def rows(self, activation: Tensor, attention_mask: Tensor | None = None,
             keep: Bool[Tensor, "batch pos"] | None = None) -> Tensor:
        """The rows a hook keeps from ``activation`` ``[batch, pos, ...]``: a float32 copy ``[n_kept, features]`` of
        the positions of ``keep`` (default :meth:`keep_mask`). Without a mask and ``keep`` the rows are a slice (no
        boolean indexing, which waits for the device: on CUDA the forward is then not held up at every hook)."""
        act = activation.detach()
        feats = act.reshape(*act.shape[:2], math.prod(act.shape[2:]))  # not -1: ambiguous for empty batches
        with torch.inference_mode(False):  # state built here must be usable outside inference mode too
            if attention_mask is None and keep is None and act.ndim >= 2:  # every position, or all but BOS
                first = int(self.skip_bos and act.shape[1] > 0)
                return feats[:, first:].reshape(-1, feats.shape[2]).to(torch.float32, copy=True)
            keep = self.keep_mask(act, attention_mask) if keep is None else keep
            return feats[keep].to(torch.float32).clone()

    def _hook_fn(self, name: str, attention_mask: Tensor | None = None, use_attribute: bool = False,
                 sink: dict[str, list[tuple]] | None = None, tokens: Tensor | None = None) -> Callable:
        # sink: fit()'s, whose tokens are implicit (dropped for neuron statistics started without tokens)
        learner, extras = self.learners[name], self.extras[name]

        def hook(activation: Tensor, hook: Any = None) -> None:
            mask = self.attention_mask if use_attribute else attention_mask
            act = activation.detach()
            keep = self.keep_mask(act, mask)
            rows = self.rows(act) if mask is None else self.rows(act, keep=keep)  # the same rows; a slice: no sync
            if learner.d_in is not None and rows.shape[0] and rows.shape[1] != learner.d_in:
                raise ValueError(f"hook {name}: its learner has d_in={learner.d_in} but this activation has "
                                 f"{rows.shape[1]} features per position (a different model or hook?).")
            acts = act.reshape(*act.shape[:2], rows.shape[1]) if extras.want_neurons else None
            toks = None if acts is None else extras.check(acts, self.tokens if use_attribute else tokens, keep,
                                                          rows.shape[0], implicit=sink is not None)
            if sink is not None:  # fit(): kept until the forward completes, then fed to the learners
                if acts is not None:
                    with torch.inference_mode(False):
                        acts = acts.clone()  # raw dtype; no reference to the model's tensor is kept
                sink[name].append((rows, acts, toks, keep))
                return None
            with torch.inference_mode(False), torch.no_grad():
                learner.partial_fit(rows)
                extras.update(rows, acts, toks, keep)
            return None

        hook.__name__ = f"tl_sparsity[{name}]"
        return hook

    # ------------------------------------------------------------------ ways to attach
    def fwd_hooks(self, attention_mask: Tensor | None = None, tokens: Tensor | None = None
                  ) -> list[tuple[str, Callable]]:
        """``[(name, fn), ...]`` for ``model.run_with_hooks(..., fwd_hooks=col.fwd_hooks() + others)``.

        ``attention_mask`` ``[batch, pos]`` (1 = real token) of the tokens of that call excludes padding;
        ``tokens`` ``[batch, pos]`` (the token ids of that call) feed the neuron statistics' token detectors.
        """
        return [(name, self._hook_fn(name, attention_mask, tokens=tokens)) for name in self.hook_points]

    @contextlib.contextmanager
    def attach(self, attention_mask: Tensor | None = None, tokens: Tensor | None = None
               ) -> Iterator["SparsityCollector"]:
        """``with col.attach(): model(tokens)`` — hooks live exactly for the block, also when it raises.
        ``attention_mask`` and ``tokens`` as in :meth:`fwd_hooks`."""
        with self._attached(attention_mask, tokens=tokens):
            yield self

    @contextlib.contextmanager
    def _attached(self, attention_mask: Tensor | None, sink: dict[str, list[tuple]] | None = None,
                  tokens: Tensor | None = None, names: list[str] | None = None) -> Iterator[None]:
        added: list[tuple[Any, list[Any]]] = []
        try:
            for name in self.hook_points if names is None else names:
                hp = self.hook_points[name]
                fn = self._hook_fn(name, attention_mask, sink=sink, tokens=tokens)
                added.append((hp, _hooks.add_hook(hp, fn, False)))
            yield
        finally:
            for hp, handles in added:
                _hooks.remove_hook(hp, handles)

    def start(self) -> "SparsityCollector":
        """Keep hooks attached across calls (and ``model.reset_hooks()``) until :meth:`stop`.

        Padding is excluded through ``col.attention_mask``, and token ids reach the neuron statistics through
        ``col.tokens``; set them before each forward.
        """
        for name, hp in self.hook_points.items():
            if name not in self._persistent:
                self._persistent[name] = _hooks.add_hook(hp, self._hook_fn(name, use_attribute=True), permanent=True)
        return self

    def stop(self) -> "SparsityCollector":
        """Remove exactly the hooks :meth:`start` added."""
        for name, handles in self._persistent.items():
            _hooks.remove_hook(self.hook_points[name], handles)
        self._persistent = {}
        return self

    # ------------------------------------------------------------------ streaming loop
    def fit(self, token_batches: Iterable[Any] | Tensor, n_tokens: int | None = None, progress: bool = True,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None, *,
            until: str | None = None, max_tokens: int | None = None, **forward_kwargs: Any) -> "SparsityCollector":
        """Run the model over ``token_batches`` with the hooks attached, until they end or ``n_tokens`` rows
        (per hook, after BOS/padding removal) were collected.

        ``until="converged"``: also stop once every hook's learner has converged (``OnlineSparseCoder.converged_``);
        a hook that has converged is frozen for the rest of the call — its hook is no longer attached, so it costs
        nothing while the others go on (and the forward stops after the last hooked layer still learning).
        ``max_tokens`` is another name for ``n_tokens``, the budget (give one of them).

        Each batch is a token tensor ``[batch, pos]``, a ``(tokens, attention_mask)`` pair or a dict with
        ``input_ids`` (and ``attention_mask``); a single 2-D tensor is one batch. Forwards stop after the last
        hooked layer when every hook is inside a block; integer token tensors also feed the neuron statistics. A
        batch reaches the learners, covariances and neuron statistics only once its forward has completed (until
        then each hook holds a copy of that one batch), so an interrupted ``fit`` (Ctrl-C, an error in any hook)
        leaves every one of them holding exactly the batches before it, and ``report()`` usable.

        Checkpoints: with ``checkpoint_dir``, a checkpoint is written there (atomically, see :meth:`save`) every
        ``checkpoint_every`` batches — counted as batches taken from ``token_batches``, empty ones included — and
        when ``fit`` ends. If ``checkpoint_dir`` already holds a checkpoint written by ``fit``, this collector's
        state is replaced by it and the batches it had consumed are skipped: pass the same batches, in the same
        order (the last consumed batch is checked against its sha256), to continue the interrupted run exactly.
        In data- and hook-parallel modes every rank keeps its checkpoints in ``checkpoint_dir/rank<r>-of-<world>``,
        and a resumed run starts from the newest checkpoint that every rank has (a crash between two ranks' writes
        falls back to the previous one).
        """
        if max_tokens is not None:
            if n_tokens is not None:
                raise ValueError("give the token budget once: n_tokens or max_tokens (the same thing), not both.")
            n_tokens = max_tokens
        if n_tokens is not None and int(n_tokens) <= 0:
            raise ValueError(f"n_tokens must be a positive integer or None, got {n_tokens!r}.")
        if until not in (None, "converged"):
            raise ValueError(f"until must be None (run through the batches or the budget) or 'converged', got "
                             f"{until!r}.")
        if until is not None and self._distributed:
            raise ValueError("fit(until='converged') runs in one process; in data- or hook-parallel mode give a "
                             "token budget (n_tokens=) and read each hook's `converged` column in the report.")
        if checkpoint_every is not None and (checkpoint_dir is None or int(checkpoint_every) < 1):
            raise ValueError("checkpoint_every must be a positive number of batches, and needs checkpoint_dir.")
        if isinstance(token_batches, Tensor):
            token_batches = [token_batches]
        resume_from = checkpoint_dir
        if self._distributed:  # data- or hook-parallel: every rank runs the same number of forwards
            token_batches = list(token_batches)
            if checkpoint_dir is not None:  # one folder per rank; resume from the newest checkpoint all ranks have
                checkpoint_dir = _ranks.rank_dir(checkpoint_dir, self._rank, self._world)
                resume_from = _ranks.common_checkpoint(checkpoint_dir, self._group)
            _ranks.same_batch_count(token_batches, self._group)
            progress = progress and self._rank == 0
        auto_stop = "stop_at_layer" not in forward_kwargs and "stop_at_layer" in _forward_params(self.model)
        forward_kwargs.setdefault("return_type", None)
        batches = iter(token_batches)
        done, start, last_fp = 0, self.n_tokens, None
        if resume_from is not None and _ckpt.exists(resume_from):
            done, start, last_fp, fit_state = _ckpt.resume_fit(self, resume_from, batches)
            self._restore_fit_state(fit_state)
        saved_at = done
        if n_tokens is not None and self.n_tokens - start >= n_tokens:
            batches = iter(())  # a resumed run that had already reached n_tokens
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_tokens, initial=self.n_tokens - start, unit="tok", unit_scale=True, desc="tl_sparsity")
        active = list(self.hook_points)
        try:
            with torch.no_grad():
                for batch in batches:
                    if until is not None:  # converged hooks are frozen: not attached, not fed
                        active = [n for n in active if not self.learners[n].converged_]
                        if not active:
                            break
                    tokens, mask = _split_batch(batch)
                    before = self.n_tokens
                    kwargs = self._stop_early(active, forward_kwargs) if auto_stop else forward_kwargs
                    self._fit_batch(tokens, mask, kwargs, active)
                    done += 1
                    last_fp = None if checkpoint_dir is None else _ckpt.fingerprint(tokens, mask)
                    if bar is not None:
                        bar.update(self.n_tokens - before)
                    if checkpoint_every and done % int(checkpoint_every) == 0:
                        saved_at = self._checkpoint(checkpoint_dir, done, start, last_fp)
                    if n_tokens is not None and self.n_tokens - start >= n_tokens:
                        break
            if checkpoint_dir is not None and saved_at != done:
                self._checkpoint(checkpoint_dir, done, start, last_fp)
        finally:
            if bar is not None:
                bar.close()
        return self

    def _stop_early(self, names: list[str], forward_kwargs: dict[str, Any]) -> dict[str, Any]:
        """``forward_kwargs`` with ``stop_at_layer`` after the last layer of ``names`` when all are in blocks."""
        layers = [_hooks.parse_hook_name(n)[0] for n in names]
        if not layers or any(layer is None for layer in layers):
            return forward_kwargs
        n_layers = getattr(self.model.cfg, "n_layers", None)
        last = max(layers) + 1  # type: ignore[type-var]
        return forward_kwargs if n_layers is not None and last >= n_layers else {**forward_kwargs,
                                                                                  "stop_at_layer": last}

    def _fit_batch(self, tokens: Any, mask: Tensor | None, forward_kwargs: dict[str, Any],
                   names: list[str] | None = None) -> None:
        names = list(self.hook_points) if names is None else names
        if isinstance(tokens, Tensor) and tokens.numel() == 0:  # an empty batch: nothing to run
            if self.parallel:
                self._feed({name: [] for name in names})  # the other ranks' rows still count
            return
        sink: dict[str, list[tuple]] = {name: [] for name in names}
        ids = tokens if isinstance(tokens, Tensor) and not tokens.is_floating_point() else None
        kwargs = dict(forward_kwargs)
        key = _mask_keyword(self.model) if mask is not None else None
        if key is not None and key not in kwargs:
            kwargs[key] = mask  # padding must not be attended to (bidirectional models, left padding)
        with self._attached(mask, sink, tokens=ids, names=names):
            self.model.run_with_hooks(tokens, fwd_hooks=[], **kwargs)
        with _ckpt.defer_interrupts(), torch.inference_mode(False):  # learners and statistics: all or nothing
            self._feed(sink)

    def _feed(self, sink: dict[str, list[tuple]]) -> None:
        """Hand one completed forward's kept rows (and neuron inputs) to the learners and side statistics. The rows
        are checked for NaN/Inf with one host synchronisation for all hooks, not one per hook, so on CUDA the CPU
        queues every hook's learner work without waiting for the previous hook's, and learners of one shape take
        their batches together (:func:`tl_sparsity.grouped.train_together`: on CUDA, one set of launches for all
        hooks' r-th batches). Data-parallel: that one synchronisation also brings every rank's count of finite rows
        of every hook (one collective for all hooks); each learner is told them (``counts=``), so it exchanges
        nothing itself."""
        if not self.parallel:
            finite = iter(_all_finite([c[0] for chunks in sink.values() for c in chunks]))
            queues = []  # per hook, the full batches this forward completes, in stream order
            for name, chunks in sink.items():
                learner, batches = self.learners[name], []
                for (rows, acts, toks, keep), ok in zip(chunks, [next(finite) for _ in chunks]):
                    batches.extend(learner._batches(rows, check_finite=not ok))  # NaN/Inf: the learner drops them
                    self.extras[name].update(rows, acts, toks, keep)
                queues.append((learner, batches))
            for r in range(max((len(b) for _, b in queues), default=0)):  # each hook's r-th batch, all together
                train_together([(lr, lr._prepare(b[r])) for lr, b in queues if r < len(b)])
            return
        joined = [torch.cat([c[0] for c in chunks]) if chunks else None for chunks in sink.values()]
        counts = _ranks.finite_row_counts(joined, self._group)  # per hook, every rank's rows, after dropping NaN/Inf
        for (name, chunks), x, n in zip(sink.items(), joined, counts):
            learner = self.learners[name]
            if x is not None and n[self._rank] < x.shape[0]:  # NaN/Inf rows: dropped and counted by the learner's check
                x = learner._finite_rows(x, check_finite=True)
            learner.partial_fit(torch.zeros(0, 0) if x is None else x, check_finite=False, counts=n)
            for rows, acts, toks, keep in chunks:
                self.extras[name].update(rows, acts, toks, keep)

    def _checkpoint(self, root: str | Path, done: int, start: int, fp: str | None) -> int:
        _ckpt.save_collector(self, root, fit={"batches_done": done, "start_tokens": start, "last_batch_sha256": fp,
                                              **self._fit_state()})
        return done

    def _fit_state(self) -> dict[str, Any]:
        """What a subclass keeps beside its learners and statistics, saved with ``fit``'s checkpoints."""
        return {}

    def _restore_fit_state(self, fit: dict[str, Any]) -> None:
        """Restore :meth:`_fit_state` from a resumed checkpoint's ``fit`` record."""

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Checkpoint every learner's full state and the side statistics (covariances, neuron statistics) under
        ``path`` (safetensors + a JSON manifest naming the model, hooks, widths and options, with the sha256 of
        every file); written atomically beside the previous one,
        which is kept. Returns the new checkpoint's folder. See :mod:`tl_sparsity.checkpoint` for the layout."""
        if self._distributed:  # every rank writes its own folder
            path = _ranks.rank_dir(path, self._rank, self._world)
        return _ckpt.save_collector(self, path)

    @classmethod
    def load(cls, path: str | Path, model: Any, device: str | torch.device | None = None) -> "SparsityCollector":
        """A collector on ``model`` restored from :meth:`save` (``path``: the folder given to ``save`` or ``fit``,
        or one ``ckpt-*`` folder). Raises :class:`tl_sparsity.checkpoint.CheckpointError` naming the difference
        when ``model``, the hooks or their widths do not match, or when a file is damaged."""
        return _ckpt.load_collector(cls, path, model, device)

    # ------------------------------------------------------------------ results
    def report(self, controls: bool | None = None) -> SparsityReport:
        """Evaluate every learner on its held-out rows with its final dictionary; one row per hook.

        With ``controls=True`` collectors, also the control columns (``report(controls=False)`` skips them: training
        the controls costs as much as the learning; they are computed once per hook and row count). With neuron
        statistics, their columns (:data:`tl_sparsity.extras.NEURON_COLUMNS`, None/NaN on hooks without) and one
        table per hook, ``report.neurons(hook)``.
        """
        if controls and not self.controls:
            raise ValueError("this collector keeps no covariances: build it with SparsityCollector(..., "
                             "controls=True) to get control columns.")
        rows = self._rows(self.learners)
        view: Any = self
        if self.parallel:  # collective: every rank gets the report of all ranks' tokens
            for row in rows:
                row.update(self.learners[row["hook"]].global_counts())
            view = copy.copy(self)
            view.extras = _ranks.merged_extras(self)
        if all(r["status"].startswith("no tokens") for r in rows):
            raise RuntimeError(
                "no activations collected yet: run the model with col.fwd_hooks(), inside `with col.attach():`, "
                "after col.start(), or through col.fit(...) first."
            )
        for row in rows:
            if row["status"] != "ok" and row["converged"] is not False:
                warnings.warn(f"{row['hook']}: {row['status']}", stacklevel=2)
        late = [r for r in rows if r["converged"] is False]
        if late:
            warnings.warn(f"{len(late)} of {len(rows)} hooks have not converged; their numbers are not yet the "
                          "method's (feed more tokens, or fit(..., until='converged')): "
                          + "; ".join(f"{r['hook']}: {r['convergence']}" for r in late), stacklevel=2)
        meta: dict[str, Any] = {"model": _hooks.model_info(self.model), "options": self.learners_params(),
                                "skip_bos": self.skip_bos}
        if self.parallel:
            meta["data_parallel"] = {"world_size": self._world}
        tables = _extras.add_to_report(view, rows, meta, self.controls if controls is None else bool(controls))
        for name, lr in self.learners.items():  # the evidence of each verdict: the held-out probe's trace
            if lr.trace_.steps:
                tables[f"trace/{name}"] = [{"step": s, "normalized_loss": v}
                                           for s, v in zip(lr.trace_.steps, lr.trace_.values)]
        if self.parallel:
            for name, ex in view.extras.items():
                self.extras[name]._control = ex._control  # keep the control cache
        return SparsityReport(rows, meta, tables)

    def _rows(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """Report rows (hook, layer, site and :func:`learner_row`) for the learners of ``names``."""
        rows = []
        for name in names:
            layer, site = _hooks.parse_hook_name(name)
            rows.append({"hook": name, "layer": layer, "site": site, **learner_row(self.learners[name])})
        return rows

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

    def learners_params(self) -> dict[str, Any]:
        return next(iter(self.learners.values())).get_params() if self.learners else {}


def learner_row(learner: OnlineSparseCoder) -> dict[str, Any]:
    """One report row's learner columns (metrics on the held-out reservoir) and a status string."""
    row: dict[str, Any] = {
        "d_in": learner.d_in, "n_atoms": None, "n_tokens": learner.n_tokens_, "n_heldout": learner.n_heldout_,
        "n_eval": 0, "lam": None, "normalized_loss": float("nan"), "normalized_loss_se": float("nan"),
        "coef_norm": float("nan"), "nnz": float("nan"), "fvu": float("nan"), "capped": learner.capped_,
        "n_dropped": learner.n_dropped_, "converged": None, "n_steps": learner.n_steps_, "drift": float("nan"),
        "convergence": "no dictionary yet",
    }
    seen = learner.n_tokens_ + learner.n_heldout_ + learner.n_pending_
    if seen == 0:
        row["status"] = "no tokens: this hook never fired (gated hook point, or a layer past stop_at_layer?)"
        return row
    if not learner.initialized:
        row["status"] = (f"warming up: {seen} rows seen, the first batch needs {learner.batch_size}; "
                         "feed more tokens")
        return row
    row["n_atoms"] = learner.dictionary_.shape[0]
    row["lam"] = learner.lam_
    if learner.heldout_.shape[0] < 2:
        row["status"] = "too few held-out rows to evaluate; feed more tokens (or raise holdout_frac)"
        return row
    ev = learner.evaluate()
    row["n_eval"] = int(ev["n_eval"])
    for k in ("normalized_loss", "normalized_loss_se", "coef_norm", "nnz", "fvu"):
        row[k] = ev[k]
    verdict = learner.convergence_
    row.update(converged=bool(verdict["converged"]), drift=float(verdict["drift"]), convergence=verdict["reason"])
    row["status"] = "ok" if row["converged"] else f"not converged: {verdict['reason']}"
    return row


def _all_finite(tensors: list[Tensor]) -> list[bool]:
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


def _split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"a dict batch needs 'input_ids' (and optionally 'attention_mask'); got {list(batch)}.")
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor):
        return batch[0], batch[1]
    return batch, None


def _forward_params(model: Any) -> Any:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def _mask_keyword(model: Any) -> str | None:
    """``attention_mask`` (HookedTransformer, bridge) or ``one_zero_attention_mask`` (HookedEncoder)."""
    params = _forward_params(model)
    return next((k for k in ("attention_mask", "one_zero_attention_mask") if k in params), None)
