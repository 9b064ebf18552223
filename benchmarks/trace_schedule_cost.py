"""Host time the convergence trace's schedule costs a learner per dictionary step: finding the next trace point by a
walk over every step (before 2026-12-07) vs by jumps (``ConvergenceTrace.next_due``).

    PYTHONPATH=$PWD python benchmarks/trace_schedule_cost.py --steps 27080

A learner asks for the next point after every dictionary step once λ froze (``Tracking._track``). The walk's cost
grows with the spacing of the points (1/16 of the steps so far), so over a run it grows with the square of the steps.
Prints the total and per-step host time of each over steps 1 … ``--steps``, with the points the schedule takes.
"""

from __future__ import annotations

import argparse
import platform
import time

from tl_sparsity.coding.convergence import ConvergenceTrace


def walk(after: int, origin: int = 0) -> int:
    """The schedule's next point after ``after``, as found before: one ``due`` test per step."""
    s = after + 1
    while not ConvergenceTrace.due(s, origin):
        s += 1
    return s


def cost(find, steps: int) -> tuple[float, int]:
    """Seconds to ask ``find`` for the next point after every step 1 … ``steps`` (the last point moving as a learner's
    does), and the points taken."""
    last, points = 1, 1
    t = time.perf_counter()
    for step in range(2, steps + 1):
        if step >= find(last):
            last, points = step, points + 1
    return time.perf_counter() - t, points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=27_080, help="dictionary steps of one learner (default: the most any "
                   "SmolLM2 resid_post hook took in docs/smollm2_resid_longtext_report.json)")
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; steps 1 … {args.steps}")
    for name, find in (("walk (before)", walk), ("jumps (next_due)", ConvergenceTrace.next_due)):
        total, points = cost(find, args.steps)
        print(f"{name:17s}: {total:8.3f} s in all, {total / args.steps * 1e3:7.4f} ms per step ({points} points)")


if __name__ == "__main__":
    main()
