"""``OnlineSparseCoder``: streaming dictionary learning with the paper's objective, one per hook.

Rows arrive in any chunking through :meth:`OnlineSparseCoder.partial_fit`; they are buffered and processed in fixed
batches of ``batch_size`` rows, and all randomness comes from one seeded generator drawn once per batch, so the
learned state does not depend on how the stream was chunked (streaming equals one call on the concatenation).

Per batch: first split off held-out rows (probability ``holdout_frac``; never trained on, kept in a bounded
reservoir by reservoir sampling, the first ``probe_size`` of them also in a fixed probe). Nothing learns from a
held-out row: on the first batch the normaliser (centre with the training rows' mean unless ``center=False``, scale
so their average L2 norm is 1), the dictionary's seed and λ's first guess come from the training rows only. Then
code the training rows (greedy pursuit, or the exact lasso); while λ adapts (the first ``warmup_steps`` dictionary
steps) set λ ← ``lam_ratio`` × mean max coefficient (the paper's adaptive rule), then freeze it; take ``phi_steps``
Adam steps on Φ with the closed-form gradient −(2/n)·αᵀ(x − αΦ), tangent to the unit sphere, and renormalise the
rows. Then ``replay`` more steps on batches drawn from a bounded buffer of recent training rows (``replay_size``):
what matters for convergence is the number of dictionary steps, and replay buys them without model forwards.

Along training the held-out normalized loss of the probe is traced (:mod:`tl_sparsity.coding.convergence`), and
``converged_`` says whether it has stopped moving (by at most ``tol`` over the last half of at least ``min_steps``
steps, without swinging by more than 2.5·``tol`` there).

The class is assembled from parts: its options (:mod:`.options`), the training step (:mod:`.training`), and the
held-out rows, convergence trace, λ check and replay buffer (:mod:`.tracking`); this module holds the public API.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from . import state_io as _state
from .bounds import RowRule, normalise
from .massive import MassiveRows
from .devices import check_device
from .intake import RowIntake
from .metrics import MetricAccumulator
from .options import SAVED_FIELDS, LearnerOptions
from .rows import split_rows, to_device
from .safe_io import defer_interrupts
from .tracking import Tracking
from .training import WARMUP_CAP, TrainingStep

__all__ = ["OnlineSparseCoder", "LearnerOptions", "state_bytes", "to_device", "split_rows", "WARMUP_CAP"]

_O = LearnerOptions  # the defaults below are the options' own


def state_bytes(d: int, m: int, reservoir_size: int, n_pending: int = 0, probe_size: int = 0,
                replay_size: int = 0) -> int:
    """Bytes of tensors an initialised learner keeps, whatever the number of tokens seen (float32):
    4·d·(3m + 1 + reservoir_size + probe_size + replay_size + n_pending) — dictionary, two Adam moments [m, d],
    mean [d], the held-out reservoir, the held-out probe, the replay buffer and pending rows (n_pending <
    batch_size, or more that a collector's learning budget deferred, at most ``col.backlog_mb`` for all its hooks:
    tl.budget) — plus the CPU generator's 5056-byte state and the convergence trace (≤ 512 points), held outside.
    Each batch also allocates, transiently, O(batch_size·m + m² + m·d) floats (codes, correlations, Gram matrix).
    At d = 576 with the defaults (m = 4608, reservoir 8192, probe 512, replay 8192): 51 MB per hook."""
    return 4 * d * (3 * m + 1 + reservoir_size + probe_size + replay_size + n_pending)


class OnlineSparseCoder(RowIntake, RowRule, MassiveRows, Tracking, TrainingStep):
    """Online sparse coding of rows x ≈ αΦ, α ≥ 0, unit-norm dictionary rows (``PAPER.md``).

    Parameters (stored only; nothing is allocated until the first batch): one keyword argument per field of
    :class:`~tl_sparsity.coding.options.LearnerOptions`, which documents and checks them, with its defaults;
    :meth:`from_options` builds a learner from such an object and :attr:`options` gives it back.

    Learned state (trailing underscore, as in scikit-learn): ``dictionary_`` [m, d], ``mean_`` [d], ``scale_``,
    ``lam_``, ``n_tokens_`` (rows trained on), ``n_heldout_`` (held-out rows seen), ``n_steps_`` (dictionary
    updates), ``capped_``, ``n_dropped_`` (rows the row rule of :mod:`.bounds` rejected), ``massive_norm_`` and
    ``n_massive_`` (rows kept out as massive activations, :mod:`.massive`), ``converged_`` and ``convergence_``
    (the rule's verdict and evidence), ``trace_`` (the held-out trace). Size bounded by :func:`state_bytes`."""

    def __init__(
        self,
        d_in: int | None = _O.d_in,
        expansion: float = _O.expansion,
        lam: float | None = _O.lam,
        solver: str = _O.solver,
        seed: int = _O.seed,
        batch_size: int = _O.batch_size,
        lr: float | None = _O.lr,
        warmup_tokens: int | None = _O.warmup_tokens,
        lam_ratio: float = _O.lam_ratio,
        holdout_frac: float = _O.holdout_frac,
        reservoir_size: int = _O.reservoir_size,
        max_steps: int | None = _O.max_steps,
        phi_steps: int = _O.phi_steps,
        device: str | torch.device | None = _O.device,
        init: str = _O.init,
        center: bool = _O.center,
        replay: int = _O.replay,
        replay_size: int | None = _O.replay_size,
        warmup_steps: int = _O.warmup_steps,
        probe_size: int = _O.probe_size,
        tol: float = _O.tol,
        min_steps: int = _O.min_steps,
        lam_rounds: int = _O.lam_rounds,
        rate_checks: int = _O.rate_checks,
        massive_ratio: float | None = _O.massive_ratio,
        phi_optimizer: str = _O.phi_optimizer,
    ) -> None:
        options = LearnerOptions(
            d_in=d_in, expansion=expansion, lam=lam, solver=solver, seed=seed, batch_size=batch_size, lr=lr,
            warmup_tokens=warmup_tokens, lam_ratio=lam_ratio, holdout_frac=holdout_frac, reservoir_size=reservoir_size,
            max_steps=max_steps, phi_steps=phi_steps, device=device, init=init, center=center, replay=replay,
            replay_size=replay_size, warmup_steps=warmup_steps, probe_size=probe_size, tol=tol, min_steps=min_steps,
            lam_rounds=lam_rounds, rate_checks=rate_checks, massive_ratio=massive_ratio, phi_optimizer=phi_optimizer)
        for name, value in options.as_dict().items():  # plain attributes: the learner's own from here on
            setattr(self, name, value)
        check_device(self.device)  # here, not as torch's bare AssertionError at the first batch
        self._pending: list[Tensor] = []
        self._n_pending = 0
        self.n_tokens_ = self.n_heldout_ = self.n_steps_ = self.n_dropped_ = self.capped_ = self.n_massive_ = 0
        self.massive_norm_ = math.inf
        self.dictionary_: Tensor | None = None
        self._gen: torch.Generator | None = None
        self.trace_ = self._new_trace()

    @classmethod
    def from_options(cls, options: LearnerOptions) -> "OnlineSparseCoder":
        """A learner with ``options``."""
        return cls(**options.as_dict())

    # ------------------------------------------------------------------ public API
    def get_params(self) -> dict:
        """The constructor arguments but ``device`` (for reports, saved files and building an identical learner)."""
        return {k: getattr(self, k) for k in SAVED_FIELDS}

    @property
    def options(self) -> LearnerOptions:
        """This learner's options now (``d_in`` is set by the first batch)."""
        return LearnerOptions(**self.get_params(), device=self.device)

    @property
    def initialized(self) -> bool:
        return self.dictionary_ is not None

    @torch.no_grad()
    def partial_fit(self, x: Float[Tensor, "n d"], check_finite: bool = True) -> "OnlineSparseCoder":
        """Feed rows ``x`` [n, d]; every full batch of ``batch_size`` rows is processed at once.

        Rows with NaN/±Inf entries or a squared norm over 1e30 (the row rule, :mod:`.bounds`: past it float32
        statistics and Adam's second moment could overflow) are dropped before any arithmetic and counted in
        ``n_dropped_``; that check waits for ``x`` on the host (a CUDA synchronisation), so a caller that has already
        checked for NaN/Inf may pass ``check_finite=False``: the overflow bound still applies (see
        :meth:`~tl_sparsity.coding.bounds.RowRule._finite_rows`), and after the λ warm-up such a call never
        synchronises with a CUDA device. Rows left for the next batch are copied (the caller may reuse ``x``).
        A Ctrl-C arriving while a batch is processed is delivered when that batch is done, so the state is always
        that of whole batches.
        """
        for batch in self._batches(x, check_finite):
            with defer_interrupts():
                self._process(batch)
        return self

    @torch.no_grad()
    def flush(self) -> "OnlineSparseCoder":
        """Process the pending rows (fewer than ``batch_size``) now, as one last, shorter batch: held-out split,
        training step and counters as for a full one. For the end of a fixed budget, so that every row received is
        trained on or held out; continuing afterwards is fine (the next batch starts empty)."""
        with defer_interrupts():  # a deferred backlog (:meth:`defer`): its full batches first, all of them
            for batch in self.backlog():
                self._process(batch)
        if self._n_pending:
            batch = torch.cat(self._pending)
            self._pending, self._n_pending = [], 0
            with defer_interrupts():
                self._process(batch)
        return self

    @torch.no_grad()
    def transform(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n m"]:
        """Codes α ≥ 0 of raw rows ``x`` under the current dictionary and λ (normalised as in training)."""
        self._require_init()
        return self._code(self.normalize(x))

    @torch.no_grad()
    def normalize(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """Apply the frozen normaliser: (x − mean_) / scale_ (rows longer than 1e6 afterwards are shrunk to that
        length, :func:`~tl_sparsity.coding.bounds.normalise`)."""
        self._require_init()
        return normalise(self._as_rows(x), self.mean_, self.scale_)

    @torch.no_grad()
    def evaluate(self, x: Float[Tensor, "n d"] | None = None) -> dict[str, float]:
        """Metrics of ``PAPER.md`` on raw rows ``x`` — by default on the held-out reservoir — with the current
        dictionary and λ. See :func:`tl_sparsity.sparsity_metrics` for the keys; adds ``n_eval``."""
        self._require_init()
        xn = self.heldout_ if x is None else self.normalize(x)
        acc, gram = MetricAccumulator(self.lam_), self._gram() if xn.shape[0] > self.batch_size else None
        for start in range(0, xn.shape[0], self.batch_size):
            chunk = xn[start : start + self.batch_size]
            acc.update(chunk, self.dictionary_, self._code(chunk, gram=gram))
        out = acc.result()
        out["n_eval"] = acc.n
        return out

    @property
    def heldout_(self) -> Tensor:
        """The held-out rows currently in the reservoir, normalised, ``[k, d]``."""
        self._require_init()
        return self._reservoir[: self._res_fill]

    # ------------------------------------------------------------------ state, checkpoints, memory
    def state_dict(self) -> dict:
        """The full state, copied, as ``{"tensors": {name: Tensor}, "meta": JSON-able dict}``: parameters,
        dictionary, Adam moments, normaliser, λ, counters, reservoir, pending rows, RNG state (:mod:`.checkpoint`)."""
        tensors, meta = _state.learner_state(self)
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict, device: str | torch.device | None = None) -> "OnlineSparseCoder":
        """Restore :meth:`state_dict` output; this learner's parameters must equal the saved ones. The state is
        checked first, as a file's is (types, ranges, shapes): a bad one raises ``CheckpointError`` naming the field
        and leaves this learner as it was."""
        if not isinstance(state, dict) or not isinstance(state.get("tensors"), dict) or not isinstance(
                state.get("meta"), dict):
            raise _state.CheckpointError("load_state_dict: expected state_dict()'s output, a dict with 'tensors' "
                                         f"and 'meta' dicts; got {type(state).__name__}.")
        _state.check_learner(state["tensors"], state["meta"], "load_state_dict")
        return _state.restore_learner(self, state["tensors"], state["meta"], device)

    def save(self, path: str | Path) -> Path:
        """Write the full state to one safetensors file at ``path``, atomically; :meth:`load` reads it back."""
        return _state.save_learner(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "OnlineSparseCoder":
        """A learner from :meth:`save`'s file; continuing it gives bit-for-bit what the saved one would give."""
        tensors, meta = _state.read_learner(path)
        lr = cls(**_state.saved_params(meta), device=device or meta.get("device"))
        return _state.restore_learner(lr, tensors, meta, device)

    # ------------------------------------------------------------------ for collectors training learners together
    def prepare(self, batch: Float[Tensor, "n d"]) -> Tensor:
        """Split off one batch's held-out rows (kept for evaluation; nothing learns from them) and return its
        normalised training rows."""
        return self._prepare(batch)

    def finite_rows(self, x: Float[Tensor, "n d"]) -> Tensor:
        """``x`` without the rows the row rule rejects (NaN/±Inf, or squared norm over 1e30); they are counted in
        ``n_dropped_``."""
        return self._finite_rows(x, check_finite=True)

    def memory_bytes(self) -> int:
        """Bytes of tensor storage this learner holds (distinct storages); equals :func:`state_bytes`."""
        tensors = [v for v in vars(self).values() if isinstance(v, Tensor)] + list(self._pending)
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    # ------------------------------------------------------------------ internals
    def _require_init(self) -> None:
        if self.dictionary_ is None:
            raise RuntimeError(
                f"no dictionary yet: the learner has {self._n_pending} of the {self.batch_size} rows its first batch"
                " needs. Feed more rows with partial_fit (or lower batch_size)."
            )

