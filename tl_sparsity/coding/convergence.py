"""Whether a learner's number has converged: a bounded trace of its held-out normalized loss along training, and the
rule that reads it.

The trace holds ``(step, value)`` points, where ``step`` counts dictionary updates and ``value`` is the normalized loss
of a fixed probe of held-out rows (rows never trained on, the same rows at every point, so two points differ only
by what the dictionary learned). Points are taken on a geometric schedule — every step at first, then every
2^k steps with about :data:`POINTS_PER_DOUBLING` points per doubling of the step count, counted afresh from each cut
of the rate (below) — and at most
``max_points`` are kept, so the trace stays small however long a run goes.

The rule (:meth:`ConvergenceTrace.verdict`), at step t, with λ frozen since step t_λ and the dictionary's rate last
cut at step o (0 before any cut):

* the window is the last half of the steps since o, (o + (t − o)/2, t], split into two quarters;
* ``drift`` = (mean of the points of the first quarter) / (mean of the points of the second) − 1, the relative change
  of the held-out normalized loss over the window;
* ``spread`` = (largest / smallest point in the window) − 1, how far the trace swings within it;
* the trace is *flat* ⇔ |drift| ≤ ``tol``, spread ≤ 2.5·``tol``, t ≥ ``min_steps``, t/2 ≥ t_λ (the window has λ
  frozen), t ≥ 1.5·o (after a cut, a third of the steps since it), and each quarter holds at least two points;
* converged ⇔ flat, and (``rate_checks`` > 0) the last *rate check* found the level unchanged: when the trace is
  first flat, the learner cuts its dictionary rate by :data:`RATE_CUT` and goes on (:meth:`cut`, recording the
  window's mean, the ``level``); once flat again, ``rate_change`` = level now / level at the cut − 1, and the verdict
  is converged if |rate_change| ≤ ``tol``, else the rate is cut again (at most ``rate_checks`` cuts);
* a trace with no trend (|drift| ≤ ``tol``, the other conditions of flatness met) whose spread exceeds 2.5·``tol``
  is cut as well, if the window before it, (o + (t − o)/4, o + (t − o)/2] with λ frozen, had no trend either and a
  mean within ``tol`` of this window's: at a constant rate such a trace may never become flat, and a smaller rate
  settles it; the verdict then waits for a flat trace within ``tol`` of the window's mean at the cut. (The second
  window keeps a trace that still falls, but swings, from being cut on one lucky window.)

The spread condition was added by measurement: on SmolLM2-135M's middle residual layers (heavy-tailed activations)
the probe's trace swings by 10–50 % from point to point, and the drift test alone passed on a lucky pair of windows
with values 13–30 % away from where 3 900 steps ended (``docs/convergence.md``).

The rate check was added by measurement too: a dictionary trained at a constant rate settles at a level that a
smaller rate goes below — on SmolLM2-135M's residual stream the check lowered the values 6–20 % (median 15 %) — so
a flat trace alone says "settled at this rate", not "at the method's value". If the excess over the long-run value
grew in proportion to the rate and a cut's effect were read in full, a cut by 10 that lowers the level by at most
``tol`` would leave an excess of at most ``tol``/9; on real activations the effect is still growing when it is read,
and the verdict rests on the drops shrinking from cut to cut, as measured in ``docs/convergence.md``.

A learning curve that still falls by more than ``tol`` over the last half of its steps is not at its long-run
value; one that moves less has, on the synthetic sources of ``benchmarks/convergence.py``, come within a few per
cent of the value a run ten times longer reaches.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ConvergenceTrace", "POINTS_PER_DOUBLING", "RATE_CUT"]

#: Trace points per doubling of the number of dictionary steps (once past the first 2·POINTS_PER_DOUBLING steps).
POINTS_PER_DOUBLING = 16
#: The factor by which a rate check divides the dictionary's rate (module docstring).
RATE_CUT = 10.0


class ConvergenceTrace:
    """Held-out normalized loss along training (bounded) and the convergence rule (module docstring)."""

    def __init__(self, tol: float = 0.02, min_steps: int = 100, max_points: int = 512, rate_checks: int = 0) -> None:
        if not 0 < tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol!r}.")
        if int(min_steps) < 1 or int(max_points) < 8:
            raise ValueError("min_steps must be ≥ 1 and max_points ≥ 8.")
        if int(rate_checks) < 0:
            raise ValueError(f"rate_checks must be ≥ 0, got {rate_checks!r}.")
        self.tol, self.min_steps, self.max_points = float(tol), int(min_steps), int(max_points)
        self.rate_checks = int(rate_checks)
        self.rate_cuts: list[list[float]] = []  # [step, level before] of each cut of the dictionary's rate
        self.steps: list[int] = []
        self.values: list[float] = []
        self.lam_frozen_at: int | None = None  # the dictionary step from which λ no longer changes
        self.lam_checks: list[list[float]] = []  # [step, λ before, λ after] of each check of λ after it froze

    @staticmethod
    def due(step: int, origin: int = 0) -> bool:
        """Whether a point is taken at dictionary step ``step`` (geometric schedule in the steps since ``origin``)."""
        step -= origin
        return step >= 1 and step % ConvergenceTrace.spacing(step) == 0

    @staticmethod
    def spacing(step: int) -> int:
        """Steps between trace points around ``step`` (counted from the origin): 1, then doubling with the steps so
        far, :data:`POINTS_PER_DOUBLING` points per doubling."""
        return 1 << max(0, (max(1, step // POINTS_PER_DOUBLING)).bit_length() - 1)

    @staticmethod
    def next_due(after: int, origin: int = 0) -> int:
        """The first step after ``after`` at which :meth:`due` takes a point: a jump to the next multiple of the
        schedule's spacing (at most a few jumps), not a walk over every step in between."""
        s = max(int(after) - origin + 1, 1)
        while True:
            every = ConvergenceTrace.spacing(s)
            if s % every == 0:
                return s + origin
            s = (s // every + 1) * every

    def add(self, step: int, value: float) -> None:
        if self.steps and step <= self.steps[-1]:
            return
        self.steps.append(int(step))
        self.values.append(float(value))
        if len(self.steps) > self.max_points:
            del self.steps[0], self.values[0]

    @property
    def origin(self) -> int:
        """The step the schedule of points counts from: the last cut of the rate (0 before any), so that the window
        after a cut holds as many points as the first one."""
        return int(self.rate_cuts[-1][0]) if self.rate_cuts else 0

    @property
    def rate_scale(self) -> float:
        """The factor on the dictionary's rate: 1 / :data:`RATE_CUT` per cut so far."""
        return RATE_CUT ** -len(self.rate_cuts)

    def cut(self, step: int, level: float) -> None:
        """Record a cut of the dictionary's rate at ``step``, where the window's mean was ``level``."""
        self.rate_cuts.append([int(step), float(level)])

    def verdict(self, step: int | None = None) -> dict[str, Any]:
        """``{"converged", "flat", "cut", "drift", "spread", "level", "rate_change", "reason"}`` at ``step``
        (default: the last point); ``flat`` says the trace alone passes (module docstring), ``cut`` that a rate check
        is pending and one is left (the learner cuts its rate here), ``level`` is the window's mean and
        ``rate_change`` the last rate check's result (``None`` where not measured)."""
        t = step if step is not None else (self.steps[-1] if self.steps else 0)
        nan = float("nan")
        out: dict[str, Any] = {"converged": False, "flat": False, "cut": False, "drift": nan, "spread": nan,
                               "level": None, "rate_change": None}
        o = self.origin
        window = self._window(o + (t - o) / 2, t)
        if window is not None:
            out["drift"], out["spread"], out["level"] = window
        frozen = self.lam_frozen_at
        if t < self.min_steps:
            out["reason"] = f"{t} dictionary steps, fewer than the {self.min_steps} the rule needs"
        elif frozen is None or t < 2 * frozen:
            out["reason"] = (f"λ was still adapting at step {t}" if frozen is None else
                             f"λ froze at step {frozen}, less than half of the {t} steps ago")
        elif 2 * (t - o) < o:
            out["reason"] = (f"the dictionary's rate was cut at step {o}; judged again from step {o + (o + 1) // 2}")
        elif math.isnan(out["drift"]):
            out["reason"] = "too few held-out trace points"
        elif abs(out["drift"]) > self.tol:
            out["reason"] = (f"held-out normalized loss moved {100 * out['drift']:+.1f}% over the last half of {t} "
                             f"steps (tolerance {100 * self.tol:.0f}%)")
        elif out["spread"] > 2.5 * self.tol:
            out["reason"] = (f"held-out normalized loss swings by {100 * out['spread']:.0f}% within the last half of "
                             f"{t} steps (tolerance {250 * self.tol:.0f}%)")
            # trendless but jittery: a smaller rate settles it, if the window before was trendless at the same level
            prev = self._window(o + (t - o) / 4, o + (t - o) / 2) if o + (t - o) / 4 >= frozen else None
            steady = (prev is not None and abs(prev[0]) <= self.tol
                      and abs(out["level"] / prev[2] - 1.0) <= self.tol)
            out["cut"] = steady and len(self.rate_cuts) < self.rate_checks
            if out["cut"]:
                out["reason"] += f"; cutting the rate {RATE_CUT:.0f}× to settle it"
        else:
            out["flat"] = True
            self._rate_verdict(out, frozen)
        return out

    def _window(self, lo: float, hi: float) -> tuple[float, float, float] | None:
        """``(drift, spread, level)`` of the points in (lo, hi], split into two halves (module docstring); ``None``
        with fewer than two points in a half or a non-positive value."""
        mid = (lo + hi) / 2
        early = [v for s, v in zip(self.steps, self.values) if lo < s <= mid]
        late = [v for s, v in zip(self.steps, self.values) if mid < s <= hi]
        if len(early) < 2 or len(late) < 2:
            return None
        b = sum(late) / len(late)
        if not (b > 0 and math.isfinite(b) and min(early + late) > 0):
            return None
        both = early + late
        return (sum(early) / len(early)) / b - 1.0, max(both) / min(both) - 1.0, sum(both) / len(both)

    def _rate_verdict(self, out: dict[str, Any], frozen: int) -> None:
        """The rate check's part of the verdict on a flat trace (module docstring)."""
        cuts, left = self.rate_cuts, self.rate_checks - len(self.rate_cuts)
        if self.rate_checks == 0:
            out["converged"], out["reason"] = True, "converged"
            return
        out["cut"] = left > 0  # pending below unless the last cut's change is within tol
        if not cuts:
            out["reason"] = f"flat at this rate; checking that a {RATE_CUT:.0f}× smaller rate does not lower it"
            return
        if cuts[-1][0] < frozen:
            out["reason"] = f"λ was re-estimated after the last rate check (step {int(cuts[-1][0])})"
        else:
            out["rate_change"] = change = out["level"] / cuts[-1][1] - 1.0
            if abs(change) <= self.tol:
                out["converged"], out["cut"], out["reason"] = True, False, "converged"
                return
            out["reason"] = (f"a {RATE_CUT:.0f}× smaller rate (step {int(cuts[-1][0])}) moved held-out normalized "
                             f"loss {100 * change:+.1f}% (tolerance {100 * self.tol:.0f}%)")
        if left <= 0:
            out["reason"] += f"; all {self.rate_checks} rate checks spent"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConvergenceTrace):
            return NotImplemented
        return vars(self) == vars(other)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "values": list(self.values), "lam_frozen_at": self.lam_frozen_at,
                "lam_checks": [list(c) for c in self.lam_checks], "rate_cuts": [list(c) for c in self.rate_cuts]}

    def load_state(self, state: dict[str, Any]) -> None:
        steps, values = [int(s) for s in state["steps"]], [float(v) for v in state["values"]]
        if len(steps) != len(values) or steps != sorted(set(steps)) or len(steps) > self.max_points:
            raise ValueError("a convergence trace needs as many steps as values, steps strictly increasing, "
                             f"at most {self.max_points} points.")
        self.steps, self.values = steps, values
        frozen = state.get("lam_frozen_at")
        self.lam_frozen_at = None if frozen is None else int(frozen)
        checks = state.get("lam_checks", [])  # files from before λ was checked after convergence have none
        if any(len(c) != 3 for c in checks):
            raise ValueError("a convergence trace's λ checks are [step, λ before, λ after] triples.")
        self.lam_checks = [[int(c[0]), float(c[1]), float(c[2])] for c in checks]
        cuts = state.get("rate_cuts", [])  # files from before the rate check have none
        if any(len(c) != 2 for c in cuts) or len(cuts) > self.rate_checks:
            raise ValueError(f"a convergence trace's rate cuts are [step, level] pairs, at most rate_checks = "
                             f"{self.rate_checks}.")
        self.rate_cuts = [[int(c[0]), float(c[1])] for c in cuts]
