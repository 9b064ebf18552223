"""Replay the convergence rule on a saved report's traces: where the rule as it is now would cut a hook's rate.

    python benchmarks/replay_rule.py docs/smollm2_report.json

For each hook, the trace points (``tables["trace/<hook>"]``) are fed one by one to a fresh
:class:`~tl_sparsity.coding.convergence.ConvergenceTrace` with the report's ``tol``, ``min_steps`` and
``rate_checks`` (the default where the run had none or none is recorded: the rule as it is now); the verdict is
read at each point. A cut of a *flat* trace is applied (the points after it are what the run recorded after its own
cut, if it made one there); a cut of a trendless but *swinging* trace is only noted, as the run may not have made
it. Prints, per hook, the steps of the flat cuts, the first step at which a swinging
trace would have been cut, and the first at which it would have been cut on its last window alone (the rule without
its condition on the window before).

An approximation: reports keep neither the steps at which λ was re-estimated nor those of the run's own cuts, so λ is
taken as frozen from the first trace point on — in the run, each re-estimate that moved λ delayed every verdict
(and so every cut) to twice its step. Read the output as "where the rule would look", not as what a run would do.
"""

from __future__ import annotations

import argparse

from tl_sparsity import LearnerOptions, SparsityReport
from tl_sparsity.coding.convergence import ConvergenceTrace
from tl_sparsity.coding.options import rule_steps


def replay(points: list[dict], tol: float, min_steps: int,
           rate_checks: int) -> tuple[list[int], list[int], list[int]]:
    """(steps of flat cuts, steps at which a swinging trace would be cut, steps at which it would be cut on its last
    window alone — without the rule's condition on the window before it)."""
    trace = ConvergenceTrace(tol=tol, min_steps=min_steps, rate_checks=rate_checks)
    trace.lam_frozen_at = int(points[0]["step"]) if points else 0
    flat, swinging, one_window = [], [], []
    for p in points:
        step = int(p["step"])
        trace.add(step, float(p["normalized_loss"]))
        v = trace.verdict(step)
        if v["cut"] and v["flat"]:
            flat.append(step)
            trace.cut(step, v["level"])
        elif v["cut"]:
            swinging.append(step)
        if not v["flat"] and "swings by" in v["reason"] and len(trace.rate_cuts) < rate_checks:
            one_window.append(step)  # the swinging branch is reached only with |drift| ≤ tol
    return flat, swinging, one_window


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+", help="report.json files with trace tables")
    args = p.parse_args()
    defaults = LearnerOptions()
    for path in args.reports:
        report = SparsityReport.load(path)
        opts = report.meta.get("options", {})
        tol, min_steps = float(opts.get("tol", defaults.tol)), opts.get("min_steps", defaults.min_steps)
        checks = int(opts.get("rate_checks") or defaults.rate_checks)  # a run without checks: the rule as it is now
        batch = int(opts.get("batch_size", defaults.batch_size))
        print(f"{path}: tol {tol}, min_steps {min_steps}, rate_checks {checks}")
        print("| hook | flat cuts at | a swinging trace cut first at | on its last window alone, first at |")
        print("|---|---|---|---|")
        for row in report.rows:
            steps = rule_steps(min_steps, batch, row.get("n_atoms"))
            flat, swinging, one = replay(report.tables.get(f"trace/{row['hook']}", []), tol, steps, checks)
            first = [str(x[0]) if x else "—" for x in (swinging, one)]
            print(f"| {row['hook']} | {', '.join(map(str, flat)) or '—'} | {first[0]} | {first[1]} |")


if __name__ == "__main__":
    main()
