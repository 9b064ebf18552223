"""Whether a learner's number has converged: a bounded trace of its held-out normalized loss along training, and the
rule that reads it.

The trace holds ``(step, value)`` points, where ``step`` counts dictionary updates and ``value`` is the normalized loss
of a fixed probe of held-out rows (rows never trained on, the same rows at every point, so two points differ only
by what the dictionary learned). Points are taken on a geometric schedule — every step at first, then every
2^k steps with about :data:`POINTS_PER_DOUBLING` points per doubling of the step count — and at most
``max_points`` are kept, so the trace stays small however long a run goes.

The rule (:meth:`ConvergenceTrace.verdict`), at step t, with λ frozen since step t_λ:

* ``drift`` = (mean of the points in (t/2, 3t/4]) / (mean of the points in (3t/4, t]) − 1, the relative change of
  the held-out normalized loss over the last half of training;
* ``spread`` = (largest / smallest point in (t/2, t]) − 1, how far the trace swings within the last half;
* converged ⇔ |drift| ≤ ``tol``, spread ≤ 2.5·``tol``, t ≥ ``min_steps``, t/2 ≥ t_λ (the whole window has λ
  frozen), and each half-window holds at least two points.

The spread condition was added by measurement: on SmolLM2-135M's middle residual layers (heavy-tailed activations)
the probe's trace swings by 10–50 % from point to point, and the drift test alone passed on a lucky pair of windows
with values 13–30 % away from where 3 900 steps ended (``docs/convergence.md``).

A learning curve that still falls by more than ``tol`` over the last half of its steps is not at its long-run
value; one that moves less has, on the synthetic sources of ``benchmarks/convergence.py``, come within a few per
cent of the value a run ten times longer reaches.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ConvergenceTrace", "POINTS_PER_DOUBLING"]

#: Trace points per doubling of the number of dictionary steps (once past the first 2·POINTS_PER_DOUBLING steps).
POINTS_PER_DOUBLING = 16


class ConvergenceTrace:
    """Held-out normalized loss along training (bounded) and the convergence rule (module docstring)."""

    def __init__(self, tol: float = 0.02, min_steps: int = 100, max_points: int = 512) -> None:
        if not 0 < tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol!r}.")
        if int(min_steps) < 1 or int(max_points) < 8:
            raise ValueError("min_steps must be ≥ 1 and max_points ≥ 8.")
        self.tol, self.min_steps, self.max_points = float(tol), int(min_steps), int(max_points)
        self.steps: list[int] = []
        self.values: list[float] = []
        self.lam_frozen_at: int | None = None  # the dictionary step from which λ no longer changes
        self.lam_checks: list[list[float]] = []  # [step, λ before, λ after] of each check of λ after it froze

    @staticmethod
    def due(step: int) -> bool:
        """Whether a point is taken at dictionary step ``step`` (geometric schedule)."""
        if step < 1:
            return False
        every = 1 << max(0, int(math.log2(max(1, step // POINTS_PER_DOUBLING))))
        return step % every == 0

    def add(self, step: int, value: float) -> None:
        if self.steps and step <= self.steps[-1]:
            return
        self.steps.append(int(step))
        self.values.append(float(value))
        if len(self.steps) > self.max_points:
            del self.steps[0], self.values[0]

    def verdict(self, step: int | None = None) -> dict[str, Any]:
        """``{"converged": bool, "drift": float, "reason": str}`` at ``step`` (default: the last point)."""
        t = step if step is not None else (self.steps[-1] if self.steps else 0)
        out: dict[str, Any] = {"converged": False, "drift": float("nan"), "spread": float("nan")}
        early = [v for s, v in zip(self.steps, self.values) if t / 2 < s <= 3 * t / 4]
        late = [v for s, v in zip(self.steps, self.values) if 3 * t / 4 < s <= t]
        if len(early) >= 2 and len(late) >= 2:
            b = sum(late) / len(late)
            if b > 0 and math.isfinite(b) and min(early + late) > 0:
                out["drift"] = (sum(early) / len(early)) / b - 1.0
                out["spread"] = max(early + late) / min(early + late) - 1.0
        frozen = self.lam_frozen_at
        if t < self.min_steps:
            out["reason"] = f"{t} dictionary steps, fewer than the {self.min_steps} the rule needs"
        elif frozen is None or t < 2 * frozen:
            out["reason"] = (f"λ was still adapting at step {t}" if frozen is None else
                             f"λ froze at step {frozen}, less than half of the {t} steps ago")
        elif math.isnan(out["drift"]):
            out["reason"] = "too few held-out trace points"
        elif abs(out["drift"]) > self.tol:
            out["reason"] = (f"held-out normalized loss moved {100 * out['drift']:+.1f}% over the last half of {t} "
                             f"steps (tolerance {100 * self.tol:.0f}%)")
        elif out["spread"] > 2.5 * self.tol:
            out["reason"] = (f"held-out normalized loss swings by {100 * out['spread']:.0f}% within the last half of "
                             f"{t} steps (tolerance {250 * self.tol:.0f}%)")
        else:
            out["converged"], out["reason"] = True, "converged"
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConvergenceTrace):
            return NotImplemented
        return vars(self) == vars(other)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "values": list(self.values), "lam_frozen_at": self.lam_frozen_at,
                "lam_checks": [list(c) for c in self.lam_checks]}

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
