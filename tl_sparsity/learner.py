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

Along training the held-out normalized loss of the probe is traced (:mod:`tl_sparsity.convergence`), and
``converged_`` says whether it has stopped moving (by at most ``tol`` over the last half of at least ``min_steps``
steps, without swinging by more than 2.5·``tol`` there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from . import checkpoint as _ckpt
from .safe_io import defer_interrupts
from .convergence import ConvergenceTrace
from .metrics import MetricAccumulator
from .pursuit import default_max_steps, greedy_pursuit, lasso_pursuit, triton_applies

__all__ = ["OnlineSparseCoder", "state_bytes"]

_SOLVERS = ("greedy", "lasso")

#: Most greedy steps per row while λ adapts. Those codes only set λ (from each row's largest coefficient, found in
#: the first steps) and drive the first Φ-steps; with a young dictionary and a λ still too small, uncapped pursuits
#: fit noise up to the 4·d cap (at d = 576 on a 2-core CPU: 4.5 s per batch of 1024 instead of ~0.5 s).
WARMUP_CAP = 64


def state_bytes(d: int, m: int, reservoir_size: int, n_pending: int = 0, probe_size: int = 0,
                replay_size: int = 0) -> int:
    """Bytes of tensors an initialised learner keeps, whatever the number of tokens seen (float32):
    4·d·(3m + 1 + reservoir_size + probe_size + replay_size + n_pending) — dictionary, two Adam moments [m, d],
    mean [d], the held-out reservoir, the held-out probe, the replay buffer and pending rows (n_pending <
    batch_size) — plus the CPU generator's 5056-byte state and the convergence trace (≤ 512 points), held outside.
    Each batch also allocates, transiently, O(batch_size·m + m² + m·d) floats (codes, correlations, Gram matrix).
    At d = 576 with the defaults (m = 4608, reservoir 8192, probe 512, replay 8192): 51 MB per hook."""
    return 4 * d * (3 * m + 1 + reservoir_size + probe_size + replay_size + n_pending)


class OnlineSparseCoder:
    """Online sparse coding of rows x ≈ αΦ, α ≥ 0, unit-norm dictionary rows (``PAPER.md``).

    Parameters (stored only; nothing is allocated until the first batch):
        d_in: row width; ``None`` infers it from the first batch.
        expansion: dictionary size m = ``expansion`` × d_in (paper: 8).
        lam: fixed λ; ``None`` (default) uses the adaptive rule during warm-up, then freezes it.
        solver: ``"greedy"`` (the paper's pursuit) or ``"lasso"`` (exact non-negative lasso; slow reference).
        seed: seeds the dictionary, the held-out split and the reservoir.
        batch_size: rows per batch taken from the stream (one dictionary step, plus ``replay`` steps).
        lr: Adam learning rate for Φ (entries of unit rows of width d are ~1/√d, so the default is ``0.05/√d``).
        warmup_steps: dictionary steps during which λ adapts (then it is frozen).
        warmup_tokens: if given, λ adapts during this many training rows instead of ``warmup_steps`` steps.
        lam_ratio: λ = ``lam_ratio`` × mean max coefficient (paper: 0.1).
        holdout_frac: fraction of rows never trained on, for evaluation.
        reservoir_size: most held-out rows kept (reservoir sampling over all held-out rows).
        max_steps: cap on greedy steps per row (default 4·d); rows that hit it are counted in ``capped_``.
        replay: extra dictionary steps per batch, each on ``batch_size`` rows drawn (with replacement) from the
            replay buffer; 0 is the plain one-pass online learner. Held-out rows never enter the buffer.
        replay_size: rows the replay buffer keeps (the most recent training rows); default 8 × ``batch_size``.
        probe_size: held-out rows (the first ones) on which the convergence trace is measured.
        lam_rounds: how many times λ may be re-estimated after the rule first says converged (the paper's "repeat
            a couple of rounds"): λ's fixed point ``lam_ratio`` × mean max coefficient is recomputed on training
            rows with the learned dictionary; if it moved by more than ``tol``, the new λ is set and convergence is
            judged afresh from there. 0 keeps the λ frozen after warm-up.
        tol, min_steps: the convergence rule: the held-out normalized loss moved by at most ``tol`` (relative) over
            the last half of at least ``min_steps`` dictionary steps, and swung by at most 2.5·``tol`` within it,
            all with λ frozen (:mod:`tl_sparsity.convergence`).
        phi_steps: Adam steps on Φ per batch of codes.
        device: where the state lives; ``None`` uses the first batch's device.
        init: ``"data"`` seeds atoms with random normalised rows of the first batch (plus a little noise);
            ``"random"`` draws them uniformly on the sphere.
        center: subtract the first batch's mean (default). ``False`` keeps ``mean_ = 0``, for rows that are already
            centred by their exact mean (the synthetic sources): the sample mean of heavy-tailed rows does not
            converge, and for the isotropic-Cauchy control it shifts every row by a vector as long as the median row
            (``benchmarks/cauchy_study.py``).

    Learned state (trailing underscore, as in scikit-learn): ``dictionary_`` [m, d], ``mean_`` [d], ``scale_``,
    ``lam_``, ``n_tokens_`` (rows trained on), ``n_heldout_`` (held-out rows seen), ``n_steps_`` (dictionary
    updates), ``capped_``, ``n_dropped_`` (non-finite rows), ``converged_`` and ``convergence_`` (the rule's verdict
    and evidence), ``trace_`` (the held-out trace). Its size is bounded by :func:`state_bytes`; :meth:`save` /
    :meth:`load`.
    """

    def __init__(
        self,
        d_in: int | None = None,
        expansion: float = 8,
        lam: float | None = None,
        solver: str = "greedy",
        seed: int = 0,
        batch_size: int = 1024,
        lr: float | None = None,
        warmup_tokens: int | None = None,
        lam_ratio: float = 0.1,
        holdout_frac: float = 0.1,
        reservoir_size: int = 8192,
        max_steps: int | None = None,
        phi_steps: int = 1,
        device: str | torch.device | None = None,
        init: str = "data",
        center: bool = True,
        replay: int = 7,
        replay_size: int | None = None,
        warmup_steps: int = 100,
        probe_size: int = 512,
        tol: float = 0.02,
        min_steps: int = 400,
        lam_rounds: int = 2,
    ) -> None:
        if init not in ("data", "random"):
            raise ValueError(f"init must be 'data' (random normalised first-batch rows) or 'random', got {init!r}.")
        if solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}.")
        if d_in is not None and int(d_in) < 1:
            raise ValueError(f"d_in must be a positive integer or None, got {d_in!r}.")
        if not expansion > 0:
            raise ValueError(f"expansion must be > 0, got {expansion!r}.")
        if lam is not None and not lam > 0:
            raise ValueError(f"lam must be > 0 (or None for the adaptive rule), got {lam!r}.")
        if int(batch_size) < 2:
            raise ValueError(f"batch_size must be ≥ 2, got {batch_size!r}.")
        if not 0.0 <= holdout_frac < 1.0:
            raise ValueError(f"holdout_frac must be in [0, 1), got {holdout_frac!r}.")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}.")
        if not lam_ratio > 0:
            raise ValueError(f"lam_ratio must be > 0, got {lam_ratio!r}.")
        if int(reservoir_size) < 0 or (warmup_tokens is not None and int(warmup_tokens) < 0) or int(phi_steps) < 1:
            raise ValueError("reservoir_size and warmup_tokens must be ≥ 0 and phi_steps ≥ 1.")
        if int(replay) < 0 or (replay_size is not None and int(replay_size) < 1) or int(warmup_steps) < 0:
            raise ValueError(f"replay and warmup_steps must be ≥ 0 and replay_size ≥ 1 (or None), got replay={replay!r},"
                             f" replay_size={replay_size!r}, warmup_steps={warmup_steps!r}.")
        if int(lam_rounds) < 0:
            raise ValueError(f"lam_rounds must be ≥ 0, got {lam_rounds!r}.")
        if int(probe_size) < 8:
            raise ValueError(f"probe_size must be ≥ 8 held-out rows, got {probe_size!r}.")
        ConvergenceTrace(tol, min_steps)  # validates tol and min_steps
        self.d_in = None if d_in is None else int(d_in)
        self.expansion = expansion
        self.lam = None if lam is None else float(lam)
        self.solver, self.seed, self.batch_size, self.lr = solver, int(seed), int(batch_size), lr
        self.warmup_tokens = None if warmup_tokens is None else int(warmup_tokens)
        self.warmup_steps = int(warmup_steps)
        self.replay = int(replay)
        self.replay_size = None if replay_size is None else int(replay_size)
        self.probe_size, self.tol, self.min_steps = int(probe_size), float(tol), int(min_steps)
        self.lam_rounds = int(lam_rounds)
        self.lam_ratio = float(lam_ratio)
        self.holdout_frac = float(holdout_frac)
        self.reservoir_size = int(reservoir_size)
        self.max_steps, self.phi_steps, self.device, self.init = max_steps, int(phi_steps), device, init
        self.center = bool(center)
        self._pending: list[Tensor] = []
        self._n_pending = 0
        self.n_tokens_ = self.n_heldout_ = self.n_steps_ = self.n_dropped_ = self.capped_ = 0
        self.dictionary_: Tensor | None = None
        self._gen: torch.Generator | None = None
        self.trace_ = ConvergenceTrace(self.tol, self.min_steps)

    # ------------------------------------------------------------------ public API
    def get_params(self) -> dict:
        """The constructor arguments (for reports and for building an identical learner)."""
        keys = ("d_in", "expansion", "lam", "solver", "seed", "batch_size", "lr", "warmup_tokens", "lam_ratio",
                "holdout_frac", "reservoir_size", "max_steps", "phi_steps", "init", "center", "replay", "replay_size",
                "warmup_steps", "probe_size", "tol", "min_steps", "lam_rounds")
        return {k: getattr(self, k) for k in keys}

    @property
    def initialized(self) -> bool:
        return self.dictionary_ is not None

    @property
    def n_pending_(self) -> int:
        """Rows received but not yet processed (fewer than ``batch_size``)."""
        return self._n_pending

    @torch.no_grad()
    def partial_fit(self, x: Float[Tensor, "n d"], check_finite: bool = True) -> "OnlineSparseCoder":
        """Feed rows ``x`` [n, d]; every full batch of ``batch_size`` rows is processed at once.

        Rows containing NaN or ±Inf are dropped and counted in ``n_dropped_``; that check waits for ``x`` on the
        host (a CUDA synchronisation), so a caller that has already checked may pass ``check_finite=False`` (a
        non-finite row would then corrupt the dictionary). After the λ warm-up, a call with ``check_finite=False``
        never synchronises with a CUDA device. Rows left for the next batch are copied (the caller may reuse ``x``).
        A Ctrl-C arriving while a batch is processed is delivered when that batch is done, so the state is always
        that of whole batches.
        """
        for batch in self._batches(x, check_finite):
            with defer_interrupts():
                self._process(batch)
        return self

    def _batches(self, x: Tensor, check_finite: bool) -> Iterator[Tensor]:
        """The full batches that ``x`` completes, pending rows first, in stream order; what is left becomes the
        pending rows (copied) once the last batch has been taken. The pending rows are released as the first batch
        is handed out, so a consumer that stops early (Ctrl-C after a batch) never processes a row twice."""
        x = self._finite_rows(self._as_rows(x), check_finite)
        n, size = x.shape[0], self.batch_size
        if n == 0:
            return
        done = size - self._n_pending  # rows of x that complete the pending batch
        if done > n:
            self._pending.append(x.clone())
            self._n_pending += n
            return
        first = torch.cat([*self._pending, x[:done]]) if self._pending else x[:done]
        self._pending, self._n_pending = [], 0
        yield first
        while n - done >= size:
            yield x[done : done + size]
            done += size
        rest = x[done:]  # copied below, so a view of its tail does not keep a large x alive
        self._pending, self._n_pending = ([rest.clone()], rest.shape[0]) if rest.shape[0] else ([], 0)

    @torch.no_grad()
    def transform(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n m"]:
        """Codes α ≥ 0 of raw rows ``x`` under the current dictionary and λ (normalised as in training)."""
        self._require_init()
        return self._code(self.normalize(x))

    @torch.no_grad()
    def normalize(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """Apply the frozen normaliser: (x − mean_) / scale_."""
        self._require_init()
        return (self._as_rows(x) - self.mean_) / self.scale_

    @torch.no_grad()
    def evaluate(self, x: Float[Tensor, "n d"] | None = None) -> dict[str, float]:
        """Metrics of ``PAPER.md`` on raw rows ``x`` — by default on the held-out reservoir — with the current
        dictionary and λ. See :func:`tl_sparsity.sparsity_metrics` for the keys; adds ``n_eval``."""
        self._require_init()
        xn = self.heldout_ if x is None else self.normalize(x)
        acc = MetricAccumulator(self.lam_)
        for start in range(0, xn.shape[0], self.batch_size):
            chunk = xn[start : start + self.batch_size]
            acc.update(chunk, self.dictionary_, self._code(chunk))
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
        tensors, meta = _ckpt.learner_state(self)
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict, device: str | torch.device | None = None) -> "OnlineSparseCoder":
        """Restore :meth:`state_dict` output; this learner's parameters must equal the saved ones."""
        return _ckpt.restore_learner(self, state["tensors"], state["meta"], device)

    def save(self, path: str | Path) -> Path:
        """Write the full state to one safetensors file at ``path``, atomically; :meth:`load` reads it back."""
        return _ckpt.save_learner(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "OnlineSparseCoder":
        """A learner from :meth:`save`'s file; continuing it gives bit-for-bit what the saved one would give."""
        return _ckpt.load_learner(path, device)

    def memory_bytes(self) -> int:
        """Bytes of tensor storage this learner holds (distinct storages); equals :func:`state_bytes`."""
        tensors = [v for v in vars(self).values() if isinstance(v, Tensor)] + list(self._pending)
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    # ------------------------------------------------------------------ internals
    def _as_rows(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 2:
            raise ValueError(f"expected rows [n, d], got shape {tuple(x.shape)}; flatten with x.reshape(-1, d).")
        d = self.d_in if self.dictionary_ is None else self.dictionary_.shape[1]
        d = self._pending[0].shape[1] if d is None and self._pending else d
        if d is not None and x.shape[1] != d:
            raise ValueError(f"this learner has d_in={d} but got rows of width {x.shape[1]}.")
        first = self._pending[0].device if self._pending else x.device  # before init: where the first rows are
        dev = self.dictionary_.device if self.dictionary_ is not None else (self.device or first)
        return x.to(device=dev, dtype=torch.float32)

    def _finite_rows(self, x: Tensor, check_finite: bool) -> Tensor:
        """``x`` without its rows holding NaN/±Inf (counted in ``n_dropped_``); unchecked when not ``check_finite``."""
        if not check_finite:
            return x
        finite = torch.isfinite(x).all(dim=1)
        if bool(finite.all()):
            return x
        self.n_dropped_ += int((~finite).sum())
        return x[finite]

    def _require_init(self) -> None:
        if self.dictionary_ is None:
            raise RuntimeError(
                f"no dictionary yet: the learner has {self._n_pending} of the {self.batch_size} rows its first batch"
                " needs. Feed more rows with partial_fit (or lower batch_size)."
            )

    def _init_state(self, batch: Tensor) -> None:
        """Allocate the state; the normaliser, the dictionary's seed and λ's first guess come from ``batch``, the
        first batch's training rows (never its held-out rows). The generator ``_gen`` exists already."""
        d = batch.shape[1]
        self.d_in = d
        dev = batch.device
        self.mean_ = batch.mean(0) if self.center else torch.zeros(d, device=dev)
        scale = float((batch - self.mean_).norm(dim=1).mean())
        self.scale_ = scale if scale > 0 else 1.0
        m = max(1, int(round(self.expansion * d)))
        xn0 = (batch - self.mean_) / self.scale_
        if self.init == "data":  # random training rows (with replacement when m > batch) plus a little noise
            pick = torch.randint(0, batch.shape[0], (m,), generator=self._gen).to(dev)
            noise = torch.randn(m, d, generator=self._gen).to(dev)
            rows = xn0[pick]
            phi = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) + 0.1 * noise / math.sqrt(d)
        else:
            phi = torch.randn(m, d, generator=self._gen).to(dev)
        self.dictionary_ = phi / phi.norm(dim=1, keepdim=True)
        self._adam_m = torch.zeros_like(self.dictionary_)
        self._adam_v = torch.zeros_like(self.dictionary_)
        self._lr = self.lr if self.lr is not None else 0.05 / math.sqrt(d)
        self._reservoir = torch.zeros(self.reservoir_size, d, device=dev)
        self._res_fill = 0
        self._probe = torch.zeros(self.probe_size, d, device=dev)
        self._probe_fill = 0
        self._replay_buf = torch.zeros(self._replay_cap if self.replay else 0, d, device=dev)
        self._replay_fill = self._replay_pos = 0
        self._cap = default_max_steps(d) if self.max_steps is None else int(self.max_steps)
        if self.lam is not None:
            self.lam_ = self.lam
        else:  # initial guess: the first greedy coefficient is about the largest correlation
            self.lam_ = self.lam_ratio * float((xn0 @ self.dictionary_.T).max(dim=1).values.clamp_min(0).mean())
            self.lam_ = max(self.lam_, 1e-6)

    @property
    def _replay_cap(self) -> int:
        return 8 * self.batch_size if self.replay_size is None else self.replay_size

    # ------------------------------------------------------------------ convergence
    @property
    def lam_adapting(self) -> bool:
        """Whether λ still adapts (the adaptive rule's warm-up); False once frozen or when ``lam`` is fixed."""
        if self.lam is not None:
            return False
        if self.warmup_tokens is not None:
            return self.n_tokens_ < self.warmup_tokens
        return self.n_steps_ < self.warmup_steps

    @property
    def convergence_(self) -> dict:
        """The convergence rule's verdict now: ``converged`` (bool), ``drift`` (relative change of the held-out
        probe's normalized loss over the last half of training), ``reason``, ``n_steps``, ``lam_frozen_at``."""
        out = self.trace_.verdict(self.n_steps_)
        checks = self.trace_.lam_checks
        if out["converged"] and self._lam_check_due():
            out["converged"], out["reason"] = False, "λ not yet checked at convergence"
        elif checks and checks[-1][1] != checks[-1][2] and not out["converged"]:
            step, before, after = checks[-1]
            out["reason"] += f" (λ re-estimated at step {int(step)}: {before:.4g} → {after:.4g})"
        if not self.initialized:
            out["reason"] = "no dictionary yet"
        elif self._probe_fill < self.probe_size and not self.trace_.steps:
            out["reason"] = (f"the held-out probe has {self._probe_fill} of its {self.probe_size} rows; feed more "
                             "tokens (or raise holdout_frac)")
        return {**out, "n_steps": self.n_steps_, "lam_frozen_at": self.trace_.lam_frozen_at,
                "lam_checks": [list(c) for c in checks]}

    @property
    def converged_(self) -> bool:
        """Whether the held-out normalized loss has converged by the rule of :mod:`tl_sparsity.convergence`."""
        return bool(self.convergence_["converged"])

    def _track(self) -> bool:
        """Record when λ froze, and take a trace point on the held-out probe when one is due. No points while λ
        adapts: the rule reads only points taken after λ froze, and coding the probe with a young dictionary and a
        small λ runs pursuits to the 4·d cap. Returns whether a point was taken."""
        if self.lam_adapting:
            return False
        if self.trace_.lam_frozen_at is None:
            self.trace_.lam_frozen_at = self.n_steps_
        step = self.n_steps_
        if self._probe_fill < self.probe_size or (self.trace_.steps and step < self._next_point()):
            return False
        acc = MetricAccumulator(self.lam_)
        acc.update(self._probe, self.dictionary_, self._code(self._probe))
        self.trace_.add(step, acc.result()["normalized_loss"])
        return True

    def _lam_check_due(self) -> bool:
        """Whether λ is to be checked when the rule next says converged: λ adaptive, no check has found it stable,
        fewer than ``lam_rounds`` re-estimates so far."""
        if self.lam is not None or self.lam_adapting:
            return False
        checks = self.trace_.lam_checks
        if checks and checks[-1][1] == checks[-1][2]:
            return False
        return sum(1 for c in checks if c[1] != c[2]) < self.lam_rounds

    def _check_lam(self, x: Tensor, n_total: int) -> None:
        """At the first trace point where the rule says converged (and again after each re-estimate): recompute λ's fixed point on
        training rows — the replay buffer, or this step's rows ``x`` — with the learned dictionary. A move of more
        than ``tol`` sets the new λ and restarts the λ-frozen window; a smaller one keeps λ, and the verdict
        stands."""
        due = self._lam_check_due() and bool(self.trace_.verdict(self.n_steps_)["converged"])
        if not self._agree(due):
            return
        rows, n = (self._replay_buf[: self._replay_fill], self._replay_fill) if self._replay_fill else (x, n_total)
        before = self.lam_
        for _ in range(3):  # the adaptive rule's rounds, with the dictionary fixed
            mean_max = self._mean_max(self._code(rows), n)
            if not mean_max > 0:
                break
            self.lam_ = self.lam_ratio * mean_max
        if abs(self.lam_ / before - 1.0) <= self.tol:
            self.lam_ = before
        else:
            self.trace_.lam_frozen_at = self.n_steps_
        self.trace_.lam_checks.append([self.n_steps_, before, self.lam_])

    def _agree(self, flag: bool) -> bool:
        """``flag`` as all processes that share this learner see it (one process here)."""
        return flag

    def _settle(self, x: Tensor, n_total: int) -> None:
        """After each dictionary step: the trace, and at each new trace point the check of λ at convergence (the
        same steps on every process that shares the learner)."""
        if self._track():
            self._check_lam(x, n_total)

    def _next_point(self) -> int:
        """The first step after the last trace point at which the schedule takes a point."""
        s = self.trace_.steps[-1] + 1
        while not ConvergenceTrace.due(s):
            s += 1
        return s

    # ------------------------------------------------------------------ replay
    def _remember(self, x: Tensor) -> None:
        """Write training rows ``x`` into the replay ring buffer (the oldest are overwritten)."""
        cap, n = self._replay_buf.shape[0], x.shape[0]
        if n >= cap:
            self._replay_buf.copy_(x[n - cap :])
            self._replay_fill, self._replay_pos = cap, 0
            return
        idx = (np.arange(n) + self._replay_pos) % cap
        self._replay_buf.index_copy_(0, to_device(torch.from_numpy(idx), x.device), x)
        self._replay_pos = int((self._replay_pos + n) % cap)
        self._replay_fill = min(cap, self._replay_fill + n)

    def _after_batch(self, x: Tensor, n_total: int) -> None:
        """After a fresh batch's step on training rows ``x``: ``replay`` steps on rows drawn from the replay buffer,
        and the convergence trace."""
        if not (self.replay and x.shape[0]):
            self._settle(x, n_total)
            return
        self._remember(x)
        self._settle(x, n_total)
        n = x.shape[0]
        for _ in range(self.replay):
            idx = torch.randint(0, self._replay_fill, (n,), generator=self._gen)
            rows = self._replay_buf.index_select(0, to_device(idx, x.device))
            self._step(rows, n)
            self._settle(rows, n)

    @property
    def capped_(self) -> int:
        """Rows that stopped at ``max_steps`` (on CUDA counted on the device; reading this syncs once)."""
        if self._capped_dev is not None:
            self._capped += int(self._capped_dev)
            self._capped_dev = None
        return self._capped

    @capped_.setter
    def capped_(self, value: int) -> None:
        self._capped, self._capped_dev = int(value), None

    def _count_capped(self, count: int | Tensor) -> None:
        """Add a pursuit's capped rows: an int on the host, or a device tensor kept on the device (no sync)."""
        if isinstance(count, Tensor):
            self._capped_dev = count + (0 if self._capped_dev is None else self._capped_dev)
        else:
            self._capped += count

    def _code(self, xn: Tensor, warm: bool = False) -> Tensor:
        """Codes of normalised rows ``xn``. ``warm``: a training step while λ adapts, whose pursuit stops after
        :data:`WARMUP_CAP` steps and whose capped rows are not counted (see the class docstring)."""
        cap = min(self._cap, WARMUP_CAP) if warm else self._cap
        if self.solver == "lasso":
            return lasso_pursuit(xn, self.dictionary_, self.lam_)
        if triton_applies(xn, self.dictionary_):  # one kernel launch, no host sync
            from .kernels import greedy_pursuit_triton

            alpha, _, capped = greedy_pursuit_triton(xn, self.dictionary_, self.lam_, max_steps=cap)
            self._last_capped = capped.sum()  # a device tensor: counted without a sync
            return alpha
        alpha, info = greedy_pursuit(xn, self.dictionary_, self.lam_, max_steps=cap, return_info=True)
        self._last_capped = info.capped
        return alpha

    def _process(self, batch: Tensor) -> None:
        x = self._prepare(batch)
        if x.shape[0]:
            self._train(x, x.shape[0])

    def _prepare(self, batch: Tensor) -> Tensor:
        """Split off a batch's held-out rows (first: nothing learns from them), normalise, keep the held-out rows;
        returns the training rows (normalised)."""
        held = self._heldout_mask(batch.shape[0])
        if self.dictionary_ is None:
            self._init_state(split_rows(batch, held)[1])
        heldout, x = split_rows((batch - self.mean_) / self.scale_, held)
        self._add_heldout(heldout)
        return x

    def _heldout_mask(self, n: int) -> Tensor:
        """Which of a batch's ``n`` rows are held out (a CPU draw: no device sync). The first batch of a learner
        creates its generator and keeps at least one training row for the normaliser."""
        first = self._gen is None or self.dictionary_ is None
        if first:
            self._gen = torch.Generator(device="cpu").manual_seed(self.seed)
        held = torch.rand(n, generator=self._gen) < self.holdout_frac
        if first and bool(held.all()):
            held[:] = False  # a tiny first batch drawn all held out: train on it rather than learn from held rows
        return held

    def _train(self, x: Tensor, n_total: int) -> None:
        """One fresh batch: code the training rows ``x``, adapt λ during warm-up, take the Φ-steps, then the replay
        steps and the convergence trace. ``n_total``: the rows of this step over all processes (``x.shape[0]`` here;
        more in :class:`tl_sparsity.data_parallel.DataParallelCoder`)."""
        self._step(x, n_total)
        self.n_tokens_ += n_total
        self._after_batch(x, n_total)

    def _step(self, x: Tensor, n_total: int) -> None:
        """One dictionary update from rows ``x``: code, adapt λ while it adapts, take ``phi_steps`` Φ-steps."""
        warm = self.lam_adapting
        alpha = self._code(x, warm)
        if self.solver == "greedy" and not warm:
            self._count_capped(self._last_capped)
        if warm:
            mean_max = self._mean_max(alpha, n_total)
            if mean_max > 0:
                self.lam_ = self.lam_ratio * mean_max
                alpha = self._code(x, warm)
        for _ in range(self.phi_steps):
            self._phi_step(x, alpha, n_total)

    def _mean_max(self, alpha: Tensor, n_total: int) -> float:
        """Mean over the step's rows of each row's largest coefficient (the adaptive λ rule's ‖α‖∞)."""
        return float(alpha.max(dim=1).values.mean())

    def _phi_grad(self, x: Tensor, alpha: Tensor, n_total: int) -> Tensor:
        """∇Φ of the mean ‖x − αΦ‖² over the step's rows, −(2/n)·αᵀ(x − αΦ), ``[m, d]`` (not yet tangent)."""
        if triton_applies(x, self.dictionary_):  # bf16 products, fp32 accumulation
            from .kernels import phi_products

            return phi_products(x, alpha, self.dictionary_)[1]
        return (-2.0 / x.shape[0]) * (alpha.T @ (x - alpha @ self.dictionary_))

    def _phi_step(self, x: Tensor, alpha: Tensor | None, n_total: int, grad: Tensor | None = None) -> None:
        """One Adam step on Φ from the codes ``alpha`` of rows ``x`` (or from ``grad``, their gradient, when given:
        :mod:`tl_sparsity.grouped` forms it for several learners at once)."""
        phi = self.dictionary_
        grad = self._phi_grad(x, alpha, n_total) if grad is None else grad
        self.n_steps_ += 1
        if triton_applies(x, phi):  # one fused Adam-on-the-sphere kernel
            from .kernels import adam_sphere_step

            adam_sphere_step(phi, grad, self._adam_m, self._adam_v, self._lr, self.n_steps_)
            return
        grad -= (grad * phi).sum(1, keepdim=True) * phi  # tangent to the unit sphere
        b1, b2, eps = 0.9, 0.999, 1e-8
        t = self.n_steps_
        self._adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self._adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        mhat = self._adam_m / (1 - b1**t)
        vhat = self._adam_v / (1 - b2**t)
        phi -= self._lr * mhat / (vhat.sqrt() + eps)
        norms = phi.norm(dim=1, keepdim=True)
        phi /= torch.where(norms > 0, norms, torch.ones_like(norms))

    def _add_heldout(self, rows: Tensor) -> None:
        """Reservoir sampling (Algorithm R) of all held-out rows into ``reservoir_size`` slots."""
        k = rows.shape[0]
        if k == 0:
            return
        if self._probe_fill < self.probe_size:  # the probe: the first held-out rows, fixed once full
            p = min(k, self.probe_size - self._probe_fill)
            self._probe[self._probe_fill : self._probe_fill + p] = rows[:p]
            self._probe_fill += p
        seen = self.n_heldout_
        self.n_heldout_ += k
        free = max(0, self.reservoir_size - self._res_fill)
        take = min(free, k)
        if take:
            self._reservoir[self._res_fill : self._res_fill + take] = rows[:take]
            self._res_fill += take
        rest = rows[take:]
        if rest.shape[0] == 0 or self.reservoir_size == 0:
            return
        idx = torch.arange(seen + take, seen + k, dtype=torch.float64) + 1  # 1-based index of each newcomer
        slot = (torch.rand(rest.shape[0], generator=self._gen, dtype=torch.float64) * idx).long().numpy()
        # Vectorised Algorithm R, resolved on the host (the draws are there): of the newcomers aimed at one slot the
        # last wins it, as sequentially; then one gather and one scatter on the rows' device.
        aimed = np.flatnonzero(slot < self.reservoir_size)
        last = np.full(self.reservoir_size, -1, dtype=np.int64)
        np.maximum.at(last, slot[aimed], aimed)
        dst = np.flatnonzero(last >= 0)
        ids = to_device(torch.from_numpy(np.concatenate([dst, last[dst]])), rows.device)
        self._reservoir.index_copy_(0, ids[: dst.size], rest.index_select(0, ids[dst.size :]))


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor ``t`` on ``device``; to a CUDA device through pinned memory without waiting (no host sync)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def split_rows(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(x[mask], x[~mask])`` for a CPU bool ``mask`` [n], in order, by one ``index_select`` with a host-built
    index: no device sync (boolean indexing of a CUDA tensor waits for the device to count the rows). The two parts
    are views of one gathered tensor."""
    m = mask.numpy()
    picked = np.flatnonzero(m)
    both = x.index_select(0, to_device(torch.from_numpy(np.concatenate([picked, np.flatnonzero(~m)])), x.device))
    return both[: picked.size], both[picked.size :]
