"""``SparsityCollector``: hook functions that stream a model's activations into one learner per hook point.

Hook functions never change the activation (they return ``None``), copy what they keep, flatten ``[batch, pos, ...]``
to rows ``[kept positions, features]``, cast to float32, and drop the BOS position and padding.
Per-head activations ``[batch, pos, head, d_head]`` are measured flattened to ``[batch, pos, head·d_head]``; others
not ``[batch, pos, d]`` (attention maps) raise at the first forward (:func:`tl_sparsity.tl.extract.check_shape`).
TransformerLens is reached only through :mod:`tl_sparsity.tl.hooks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from ..coding.cpu import cpu_options
from ..coding.learner import OnlineSparseCoder
from ..report import SparsityReport
from ..stats import side as _side
from . import attach as _attach
from . import budget as _budget
from . import checkpoint as _ckpt
from . import extract as _extract
from . import feeding as _feeding
from . import fitting as _fitting
from . import forwards as _forwards
from . import hook_select as _select
from . import hooks as _hooks
from . import learn_progress as _progress
from . import resume as _resume
from . import rows as _rows
from .text_input import model_device

__all__ = ["SparsityCollector"]


class SparsityCollector:
    """Measure feature sparsity at a model's hook points (``PAPER.md``), one :class:`OnlineSparseCoder` per hook.

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.
        hooks: alias (``"resid_post"`` → every layer; see :data:`tl_sparsity.tl.hooks.ALIASES`), exact HT-style
            name, glob, filter function, comma-separated string or list of these.
        layers: keep hooks of these layers only, like ``--layers``: ``[0, 3]`` or ``"0:12:4"``; None: every layer.
        skip_bos: drop the first position of each sequence (the first attended one when an ``attention_mask`` is
            given). BOS/[CLS] activations have outsized norms; set False if your inputs carry no BOS.
        controls: keep each hook's streamed mean and covariance (float64, d × d) of the rows its learner gets, so that
            ``report()`` adds ``control_normalized_loss``, ``control_normalized_loss_se`` and ``sparsity_ratio`` (the
            same learner trained on a Gaussian with that mean and covariance; as costly as the learning itself).
        neurons: neuron statistics (:class:`~tl_sparsity.stats.neurons.NeuronStats`: dead neurons, firing rates, token /
            trigram detectors, positional neurons) — None: on for ``mlp_post`` hooks; False: off; True: every hook;
            or hook names / aliases / globs among ``hooks``. Token detectors need token ids: ``fit`` passes them,
            ``fwd_hooks`` / ``attach`` take ``tokens=``, ``start()`` reads ``col.tokens``.
        neuron_options: keyword arguments of ``NeuronStats`` (``threshold``, ``absolute``, ``trigram_slots``, ...).
        **learner_options: passed to every :class:`OnlineSparseCoder` (``expansion``, ``lam``, ``seed``, ...).

    Use ``model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks() + others)``, ``with col.attach(): model(tokens)``,
    ``col.start()`` / ``col.stop()`` across notebook cells, or ``col.fit(batches)``; then ``col.report()``.

    One process; the package's ``SparsityCollector`` (:mod:`tl_sparsity.scale.modes`) adds ``parallel=``.
    """

    parallel: str | None = None  #: the mode: None (one process); "data" or "hooks" in tl_sparsity.scale's subclasses
    progress = True  #: a tqdm.auto bar while a forward's rows train learners (start/attach/fwd_hooks); False: none
    _feed_forward = _progress.feed_each  #: feeds a whole forward of start() / attach() (fit()'s: _feed); overridable
    learn_seconds = _budget.Checked(_budget.check_learn_seconds, "auto")  #: per forward (s), the rest waits: tl.budget
    backlog_mb = _budget.Checked(_budget.check_backlog_mb, _budget.BACKLOG_MB)  #: most rows waiting (MiB): tl.budget

    def __init__(self, model: Any, hooks: _hooks.HookSpec = "resid_post", *, layers: Any = None,
                 skip_bos: bool = True, controls: bool = False, neurons: Any = None,
                 neuron_options: dict[str, Any] | None = None, **learner_options: Any) -> None:
        self.model = model
        self.hook_points = _select.select_hooks(model, hooks, layers)
        self.skip_bos = bool(skip_bos)
        where = learner_options.get("device") or model_device(model)  # CPU: short learner batches, see coding/cpu.py
        self.learner_options = {**cpu_options(where, learner_options), **learner_options}
        OnlineSparseCoder(**self.learner_options)  # validate options once, with a clear error
        self.learners: dict[str, OnlineSparseCoder] = {name: self._new_learner() for name in self.hook_points}
        if not isinstance(controls, bool):
            raise TypeError(f"controls must be True or False, got {controls!r}.")
        self.controls = controls
        self.neuron_hooks = _hooks.neuron_hooks(model, self.hook_points, neurons)
        self.neuron_options = _side.check_neuron_options(neuron_options)
        self.extras = {name: _side.SideStats(name, controls, name in self.neuron_hooks, self.neuron_options)
                       for name in self.hook_points}  # per hook: covariance and neuron statistics
        self.attention_mask: Tensor | None = None  # used by hooks added with start()
        self.tokens: Tensor | None = None  # token ids [batch, pos] used by hooks added with start()
        self._persistent: dict[str, tuple[Any, list[Any]]] = {}  # start()'s hooks: name → (HookPoint, handles)
        # tl_sparsity.tl.attach's state: started?, attach() depth and hooks, own hooks per HookPoint, measured, ...
        self._started, self._attached_depth, self._on, self._measured, self._last_seen = False, 0, {}, {}, {}
        self._temporary, self._temporary_fns = {}, {}  # attach()'s and fit()'s hooks: as _persistent; their fns
        self._forwards = _forwards.WholeForwards(model, self._feed_forward, before=lambda: _attach.refresh(self))

    def _new_learner(self) -> OnlineSparseCoder:
        """One hook's learner (a parallel mode's shares its learning with the other ranks)."""
        return OnlineSparseCoder(**self.learner_options)

    def __repr__(self) -> str:
        state = "started" if self._started else "idle"
        return f"SparsityCollector({len(self.hook_points)} hooks, {state}, tokens={self.n_tokens})"

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_points)

    @property
    def n_tokens(self) -> int:
        """Rows received by the hook that received most (trained, held out and pending); hooks frozen by
        ``fit(..., until="converged")`` stop counting."""
        return max((lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_ for lr in self.learners.values()), default=0)

    # ------------------------------------------------------------------ hook functions
    def keep_mask(self, activation: Tensor, attention_mask: Tensor | None = None) -> Bool[Tensor, "batch pos"]:
        """The positions a hook keeps of ``activation`` ``[batch, pos, ...]``: attended, minus BOS if ``skip_bos``."""
        return _extract.keep_mask(activation, attention_mask, self.skip_bos)

    def rows(self, activation: Tensor, attention_mask: Tensor | None = None,
             keep: Bool[Tensor, "batch pos"] | None = None) -> Tensor:
        """A float32 copy ``[n_kept, features]`` of ``activation``'s positions ``keep`` (default :meth:`keep_mask`);
        without a mask and ``keep``, a slice (no boolean indexing, which would wait for a CUDA device)."""
        return _extract.rows(activation, self.skip_bos, attention_mask, keep)

    def _hook_fn(self, name: str, attention_mask: Tensor | None = None, use_attribute: bool = False,
                 sink: dict[str, list[tuple]] | None = None, tokens: Tensor | None = None, own: bool = False
                 ) -> Callable:
        # sink: fit()'s, whose tokens are implicit (dropped for neuron statistics started without tokens)
        learner, extras = self.learners[name], self.extras[name]

        def hook(activation: Tensor, hook: Any = None) -> None:
            _attach.first_sight(self, name, activation, hook, own)  # fed at most once per forward
            mask = self.attention_mask if use_attribute else attention_mask
            ids = self.tokens if use_attribute else tokens
            act = activation.detach()
            _extract.check_shape(name, act, ids)  # [batch, pos, d] or per-head [batch, pos, head, d_head]
            keep = self.keep_mask(act, mask)
            rows = self.rows(act) if mask is None else self.rows(act, keep=keep)  # the same rows; a slice: no sync
            _extract.check_width(name, rows, learner.d_in)
            acts = act.reshape(*act.shape[:2], rows.shape[1]) if extras.want_neurons else None
            toks = None if acts is None else extras.check(acts, ids, keep, rows.shape[0], implicit=sink is not None)
            held = sink if sink is not None else self._forwards.hold() if use_attribute or own else None
            if held is not None:  # fit(), start(), attach(): kept until the forward completes, then fed
                acts = _extract.own_copy(acts)  # raw dtype; no reference to the model's tensor is kept
                held.setdefault(name, []).append((rows, acts, toks, keep))
                return None
            with _progress.learning_bar(self, {name: [(rows,)]}):  # learns now, within its share of the budget
                _budget.feed(self, {name: [(rows, acts, toks, keep)]}, share=len(self.hook_points))
            return None

        hook.__name__ = f"tl_sparsity[{name}]"
        return hook

    # ------------------------------------------------------------------ ways to attach
    def fwd_hooks(self, attention_mask: Tensor | None = None, tokens: Tensor | None = None
                  ) -> list[tuple[str, Callable]]:
        """``[(name, fn), ...]`` for ``model.run_with_hooks(..., fwd_hooks=col.fwd_hooks() + others)``.

        ``attention_mask`` ``[batch, pos]`` (1 = real token) of the tokens of that call excludes padding;
        ``tokens`` ``[batch, pos]`` (the token ids of that call) feed the neuron statistics' token detectors.
        The names are filters (:class:`~tl_sparsity.tl.attach.HookName`, equal to the name) resolved by TransformerLens
        when it attaches the hooks, so SAEs added meanwhile (SAELens) are no obstacle.
        Raises :class:`~tl_sparsity.tl.attach.DoubleCountError` on a started or attached collector (double counting).
        """
        _attach.check_free(self, "col.fwd_hooks()")
        return [(_attach.HookName(n, self), self._hook_fn(n, attention_mask, tokens=tokens)) for n in self.hook_points]

    @contextlib.contextmanager
    def attach(self, attention_mask: Tensor | None = None, tokens: Tensor | None = None
               ) -> Iterator["SparsityCollector"]:
        """``with col.attach(): model(tokens)`` — hooks live exactly for the block, also when it raises; as with
        :meth:`start`, a forward that raises gives its rows to no hook (with :meth:`fwd_hooks`, the hooks that ran
        keep them). ``attention_mask``, ``tokens`` as in :meth:`fwd_hooks`; hook points looked up on entry; raises
        :class:`~tl_sparsity.tl.attach.DoubleCountError` on a started or already attached collector."""
        with self._attached(attention_mask, tokens=tokens):
            yield self

    def _attached(self, attention_mask: Tensor | None, sink: dict[str, list[tuple]] | None = None,
                  tokens: Tensor | None = None, names: list[str] | None = None) -> Any:
        return _attach.attached(self, attention_mask, sink, tokens, names)

    def start(self) -> "SparsityCollector":
        """Keep hooks attached across calls (and ``model.reset_hooks()``) until :meth:`stop`.

        Padding is excluded through ``col.attention_mask``, and token ids reach the neuron statistics through
        ``col.tokens``; set them before each forward. A forward's rows reach the learners when it returns (see
        :mod:`tl_sparsity.tl.forwards`): one that raises, e.g. in another tool's hook, gives rows to no hook.
        Hook points are looked up by name before every forward, so SAELens ``add_sae`` / ``run_with_saes`` neither
        blind nor break it; while started, ``fwd_hooks()`` / ``attach()`` / ``fit()`` raise (double counting).
        """
        _attach.start(self)
        return self

    def stop(self) -> "SparsityCollector":
        """Remove exactly the hooks :meth:`start` added (and the wrapper of the model's ``forward``)."""
        _attach.stop(self)
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
        ``max_tokens`` is another name for ``n_tokens``, the budget (give one of them). ``fwd_hooks=[(name, fn),
        ...]``: another tool's hooks, run in every forward of the fit (which then runs the whole model); on a hook
        point both use, theirs run first and ours after them, so the collector sees the activation as they left it.

        ``token_batches`` may be text (a string, a list of them, a text file): see :mod:`tl_sparsity.tl.text_input`.
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
        In the parallel modes (:mod:`tl_sparsity.scale`) every rank keeps its checkpoints in
        ``checkpoint_dir/rank<r>-of-<world>``, and a resumed run starts from the newest checkpoint that every rank
        has (a crash between two ranks' writes falls back to the previous one).
        """
        _attach.check_free(self, "col.fit(...)")  # before any forward: rows would be counted twice
        _fitting.fit(self, token_batches, n_tokens, progress, checkpoint_dir, checkpoint_every, until, max_tokens,
                     forward_kwargs)
        return self

    def flush(self) -> "SparsityCollector":
        """Train every learner on its pending rows now, as a last, shorter batch (``OnlineSparseCoder.flush``)."""
        _progress.drain(self)  # deferred batches first (tl.budget)
        with torch.inference_mode(False):
            for learner in self.learners.values():
                learner.flush()
        return self

    def _feed(self, sink: dict[str, list[tuple]]) -> None:
        """Hand one completed forward's kept rows (and neuron inputs) to the learners and side statistics
        (:func:`tl_sparsity.tl.feeding.feed`); hook-parallel collectors gather them to their owners first."""
        _feeding.feed(self, sink)

    def _fit_setup(self, token_batches: Iterable[Any], checkpoint_dir: str | Path | None, progress: bool
                   ) -> tuple[Iterable[Any], str | Path | None, str | Path | None, bool]:
        """``fit``'s batches, checkpoint folder, folder to resume from, progress flag (a parallel mode's: per rank)."""
        return token_batches, checkpoint_dir, checkpoint_dir, progress

    def _fit_state(self) -> dict[str, Any]:
        """What a subclass keeps beside its learners and statistics, saved with ``fit``'s checkpoints."""
        return {}

    def _restore_fit_state(self, fit: dict[str, Any]) -> None:
        """Restore :meth:`_fit_state` from a resumed checkpoint's ``fit`` record."""

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Checkpoint every learner's full state and the side statistics (covariances, neuron statistics) under
        ``path`` (safetensors + a JSON manifest naming the model, hooks, widths and options, with the sha256 of
        every file); written atomically beside the previous one, which is kept. Returns the new checkpoint's folder.
        See :mod:`tl_sparsity.tl.checkpoint` for the layout.

        ``path`` is a folder (created if needed); an existing file there raises :class:`NotADirectoryError` (one
        learner saves to a file: ``col.learners[hook].save(file)``)."""
        return _ckpt.save_collector(self, path, fit=self._fit_state() or None)  # a subclass's counts, if any

    @classmethod
    def load(cls, path: str | Path, model: Any, device: str | torch.device | None = None) -> "SparsityCollector":
        """A collector on ``model`` restored from :meth:`save` (``path``: the folder given to ``save`` or ``fit``,
        or one ``ckpt-*`` folder). Raises :class:`tl_sparsity.tl.checkpoint.CheckpointError` naming the difference
        when ``model``, the hooks or their widths do not match, or when a file is damaged; and naming what was
        given when ``path`` is a file (a learner file loads with ``OnlineSparseCoder.load``)."""
        return _resume.load_collector(cls, path, model, device)

    # ------------------------------------------------------------------ results
    def report(self, controls: bool | None = None) -> SparsityReport:
        """Evaluate every learner on its held-out rows with its final dictionary; one row per hook.

        With ``controls=True`` collectors, also the control columns (``report(controls=False)`` skips them: training
        the controls costs as much as the learning; they are computed once per hook and row count). With neuron
        statistics, their columns (:data:`tl_sparsity.stats.side.NEURON_COLUMNS`, None/NaN on hooks without) and one
        table per hook, ``report.neurons(hook)``.
        """
        _progress.drain(self)  # batches deferred by the learning budget (tl.budget) are trained first
        return _rows.build_report(self, controls)

    def _rows(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """Report rows (hook, layer, site and the learner's columns) for the learners of ``names``."""
        return _rows.hook_rows(self, names)

    def learners_params(self) -> dict[str, Any]:
        return next(iter(self.learners.values())).get_params() if self.learners else {}

