"""What an :class:`~tl_sparsity.coding.learner.OnlineSparseCoder` keeps besides its dictionary (a part of that class).

- The held-out split: each batch's rows are held out with probability ``holdout_frac`` (never trained on), kept in
  a bounded reservoir by reservoir sampling; the first ``probe_size`` of them also form a fixed probe.
- The convergence trace: the probe's normalized loss along training, once λ is frozen
  (:mod:`tl_sparsity.coding.convergence`), and the verdict ``convergence_`` / ``converged_``.
- The check of λ at convergence: at the first trace point where the rule says converged (and again after each
  re-estimate, up to ``lam_rounds`` times), λ's fixed point is recomputed with the learned dictionary.
- The rate check: when the trace is flat, or trendless but swinging (and λ checked), the dictionary's rate is cut by
  10 and the verdict waits for the trace to be flat again at the level it had (up to ``rate_checks`` cuts).
- The replay buffer: a ring of the most recent training rows (``replay_size``), from which ``replay`` extra
  dictionary steps per batch draw their rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .convergence import ConvergenceTrace
from .metrics import MetricAccumulator
from .options import replay_buffer, replay_rows, replay_steps, rule_steps
from .rows import to_device

__all__ = ["Tracking"]


class Tracking:
    """Held-out reservoir and probe, convergence trace, λ check and replay buffer of an online sparse coder; mixed
    into :class:`~tl_sparsity.coding.learner.OnlineSparseCoder`, whose attributes and training step it uses."""

    #: Called with no arguments after each learner batch is trained (its replay steps included), however the batch
    #: was trained (alone or grouped); e.g. a progress bar. Set it on an instance; ``del`` it to go back to None.
    #: Not learner state: never saved.
    on_batch: Callable[[], None] | None = None

    # ------------------------------------------------------------------ held-out rows
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

    # ------------------------------------------------------------------ convergence
    @property
    def lam_adapting(self) -> bool:
        """Whether λ still adapts (the adaptive rule's warm-up); False once frozen or when ``lam`` is fixed."""
        if self.lam is not None:
            return False
        if self.warmup_tokens is not None:
            return self.n_tokens_ < self.warmup_tokens
        return self.n_steps_ < self.warmup_steps

    def _new_trace(self) -> ConvergenceTrace:
        """An empty trace with this learner's rule (no rate checks for block-coordinate descent: it has no rate)."""
        checks = 0 if self.phi_optimizer == "bcd" else self.rate_checks
        atoms = self.dictionary_.shape[0] if getattr(self, "dictionary_", None) is not None else None
        return ConvergenceTrace(self.tol, rule_steps(self.min_steps, self.batch_size, atoms), rate_checks=checks)

    @property
    def convergence_(self) -> dict:
        """The convergence rule's verdict now: ``converged`` (bool), ``drift`` (relative change of the held-out
        probe's normalized loss over the last half of training), ``rate_change`` (how much the last cut of the rate
        moved it), ``reason``, ``n_steps``, ``lam_frozen_at``, ``lam_checks``, ``rate_cuts``."""
        out = self.trace_.verdict(self.n_steps_)
        checks = self.trace_.lam_checks
        if (out["flat"] or out["cut"]) and self._lam_check_due() and not (checks and checks[-1][1] == checks[-1][2]):
            out["converged"] = out["flat"] = out["cut"] = False
            out["reason"] = "λ not yet checked at its fixed point"
        elif checks and checks[-1][1] != checks[-1][2] and not out["converged"]:
            step, before, after = checks[-1]
            out["reason"] += f" (λ re-estimated at step {int(step)}: {before:.4g} → {after:.4g})"
        if not self.initialized:
            out["reason"] = "no dictionary yet"
        elif self._probe_fill < self.probe_size and not self.trace_.steps:
            out["reason"] = (f"the held-out probe has {self._probe_fill} of its {self.probe_size} rows; feed more "
                             "tokens (or raise holdout_frac)")
        return {**out, "n_steps": self.n_steps_, "lam_frozen_at": self.trace_.lam_frozen_at,
                "lam_checks": [list(c) for c in checks], "rate_cuts": [list(c) for c in self.trace_.rate_cuts]}

    @property
    def converged_(self) -> bool:
        """Whether the held-out normalized loss has converged by the rule of :mod:`tl_sparsity.coding.convergence`."""
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
        acc = MetricAccumulator(self.lam_, active=False)  # the trace reads L_norm only
        acc.update(self._probe, self.dictionary_, self._code(self._probe))
        self.trace_.add(step, acc.result()["normalized_loss"])
        return True

    def _next_point(self) -> int:
        """The first step after the last trace point at which the schedule takes a point."""
        return ConvergenceTrace.next_due(self.trace_.steps[-1], self.trace_.origin)

    def _settle(self, x: Tensor, n_total: int) -> None:
        """After each dictionary step: the trace, and at each new trace point the check of λ when one is due (the
        same steps on every process that shares the learner)."""
        if self._track():
            self._check_lam(x, n_total)
            self._check_rate()

    # ------------------------------------------------------------------ λ at its fixed point
    def _lam_check_due(self) -> bool:
        """Whether λ is still checked: λ adaptive and frozen, and fewer than ``lam_rounds`` checks have moved it."""
        if self.lam is not None or self.lam_adapting or self.lam_rounds == 0:
            return False
        return sum(1 for c in self.trace_.lam_checks if c[1] != c[2]) < self.lam_rounds

    def _check_lam(self, x: Tensor, n_total: int) -> None:
        """At each doubling of the step count since λ froze (the first trace point at or past twice the step of the
        last check, or of the freeze): recompute λ's fixed point on training rows — the replay buffer, or this step's
        rows ``x`` — with the learned dictionary. A move of more than ``tol`` sets the new λ and restarts the
        λ-frozen window; a smaller one keeps λ. So when the rule says converged (which needs a window at least as
        long as the time since λ last moved), the latest check lies in that window's last half and found λ at its
        fixed point — unless ``lam_rounds`` moves are spent."""
        checks = self.trace_.lam_checks
        last = checks[-1][0] if checks else self.trace_.lam_frozen_at
        due = self._lam_check_due() and last is not None and self.n_steps_ >= 2 * max(int(last), 1)
        if not self._agree(due):
            return
        rows, n = (self._replay_buf[: self._replay_fill], self._replay_fill) if self._replay_fill else (x, n_total)
        before, gram = self.lam_, self._gram()
        for _ in range(3):  # the adaptive rule's rounds, with the dictionary fixed
            mean_max = self._mean_max(self._code(rows, gram=gram), n)
            if not mean_max > 0:
                break
            self.lam_ = self.lam_ratio * mean_max
        if abs(self.lam_ / before - 1.0) <= self.tol:
            self.lam_ = before
        else:
            self.trace_.lam_frozen_at = self.n_steps_
        checks.append([self.n_steps_, before, self.lam_])

    def _check_rate(self) -> None:
        """At each trace point: if the verdict says a rate check is due (a flat or a trendless but swinging trace, λ
        checked, a check pending and one left), cut the dictionary's rate (:meth:`ConvergenceTrace.cut`, recording
        the window's level)."""
        v = self.convergence_
        if self._agree(v["cut"]):
            self.trace_.cut(self.n_steps_, v["level"])

    def _agree(self, flag: bool) -> bool:
        """``flag`` as all processes that share this learner see it (one process here)."""
        return flag

    # ------------------------------------------------------------------ replay
    @property
    def _replay_cap(self) -> int:
        return replay_rows(self.replay_size, self.batch_size, self.d_in)

    @property
    def _replay_alloc(self) -> int:
        """Rows the replay buffer allocates: ``_replay_cap``, or 0 where no replay steps are taken."""
        return replay_buffer(self.replay, self.replay_size, self.batch_size, self.d_in)

    @property
    def _replay_n(self) -> int:
        """Replay steps per learner batch (``replay``, or the rule for None, once the row width is known)."""
        return replay_steps(self.replay, self._replay_cap, self.batch_size) if self.d_in else 0

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
        if not (self._replay_n and x.shape[0]):
            self._settle(x, n_total)
        else:
            self._replay(x, n_total)
        if self.on_batch is not None:
            self.on_batch()

    def _replay(self, x: Tensor, n_total: int) -> None:
        self._remember(x)
        self._settle(x, n_total)
        n = x.shape[0]
        for rows in self._replay_rows(n):
            self._step(rows, n)
            self._settle(rows, n)

    def _replay_rows(self, n: int) -> Iterator[Tensor]:
        """The rows of each of a batch's ``replay`` steps: ``n`` rows drawn uniformly, with replacement, from the
        replay buffer (the learner's own generator; all steps' draws at once: one copy to the device per batch)."""
        idx = torch.randint(0, self._replay_fill, (self._replay_n, n), generator=self._gen)
        idx = to_device(idx, self._replay_buf.device)
        return (self._replay_buf.index_select(0, i) for i in idx)
