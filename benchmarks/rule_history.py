"""What saved reports' convergence traces say about where their rule stopped: per hook, each run's held-out value at
fixed dictionary steps (the trace's last point at or before the step; blank once the run had stopped), its final
value and step count, and its rate cuts where the report names them (the ``rule/<hook>`` tables; older reports have
none); then, over the hooks of every pair of runs, how far their final values differ by how long each ran.

    python benchmarks/rule_history.py docs/smollm2_r15_report.json docs/smollm2_r15_report_replay7.json
    python benchmarks/rule_history.py docs/smollm2_r15_report.json docs/smollm2_layers8_17_report.json --hooks 8:18

Prints, per pair (a, b): the ratio b / a − 1 of the final values (median, smallest, largest) over the hooks where
both ran at least ``--long`` steps, and over those where one ran fewer than ``--short`` and the other at least
``--long``, oriented as short / long − 1; and, per run, the change per doubling of the steps between ``--steps``
points while the run was still going (median, smallest, largest over hooks and doublings).
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from tl_sparsity import SparsityReport


def value_at(trace: list[dict], step: int) -> float | None:
    """The trace's value at its last point at or before ``step``; None before the first or after the run's end."""
    if not trace or step > trace[-1]["step"]:
        return None
    before = [p for p in trace if p["step"] <= step]
    return before[-1]["normalized_loss"] if before else None


def spread(values: list[float]) -> str:
    if not values:
        return "—"
    return f"median {statistics.median(values):+.3f}, {min(values):+.3f} to {max(values):+.3f} ({len(values)})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+")
    p.add_argument("--steps", default="400,800,1600,3200,6400,12800")
    p.add_argument("--short", type=int, default=3000, help="a run shorter than this many steps is 'short'")
    p.add_argument("--long", type=int, default=10000, help="a run of at least this many steps is 'long'")
    p.add_argument("--hooks", default=None, help="layers start:stop (default: every hook of the first report)")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    reps = [SparsityReport.load(f) for f in args.reports]
    names = [r["hook"] for r in reps[0].rows]
    if args.hooks:
        lo, hi = (int(v) for v in args.hooks.split(":"))
        names = [n for n, r in zip(names, reps[0].rows) if lo <= r["layer"] < hi]
    rows = [{r["hook"]: r for r in rep.rows} for rep in reps]
    for i, f in enumerate(args.reports):
        print(f"run {i}: {f}")
    print("hook (run)".ljust(30) + "".join(f"{s:>8d}" for s in steps) + "   final  steps conv  rate cuts (step: level)")
    per_doubling: list[list[float]] = [[] for _ in reps]
    for name in names:
        for i, (rep, rs) in enumerate(zip(reps, rows)):
            if name not in rs:
                continue
            trace = rep.tables.get(f"trace/{name}", [])
            vals = [value_at(trace, s) for s in steps]
            for v0, v1 in zip(vals, vals[1:]):
                if v0 is not None and v1 is not None:
                    per_doubling[i].append(v1 / v0 - 1)
            cuts = [e for e in rep.tables.get(f"rule/{name}", []) if e["event"] == "rate cut"]
            cut_txt = ", ".join(f"{e['step']}: {e['level']:.3f}" for e in cuts) if f"rule/{name}" in rep.tables \
                else "(not in this report)"
            r = rs[name]
            conv = "yes" if r["converged"] else "no "
            print(f"{name} ({i})".ljust(30) + "".join("        " if v is None else f"{v:8.3f}" for v in vals)
                  + f" {r['normalized_loss']:7.3f} {r['n_steps']:6d} {conv:>4s}  {cut_txt}")
    for i, f in enumerate(args.reports):
        print(f"run {i}: change per doubling of the steps, {steps[0]}–{steps[-1]}: {spread(per_doubling[i])}")
    for i, j in itertools.combinations(range(len(reps)), 2):
        both_long, short_long = [], []
        for name in names:
            if name not in rows[i] or name not in rows[j]:
                continue
            a, b = rows[i][name], rows[j][name]
            if a["n_steps"] >= args.long and b["n_steps"] >= args.long:
                both_long.append(b["normalized_loss"] / a["normalized_loss"] - 1)
            for s, lg in ((a, b), (b, a)):
                if s["n_steps"] < args.short and lg["n_steps"] >= args.long:
                    short_long.append(s["normalized_loss"] / lg["normalized_loss"] - 1)
        print(f"runs {i}, {j}: both ≥ {args.long} steps, run {j} / run {i} − 1: {spread(both_long)}")
        print(f"runs {i}, {j}: one < {args.short} steps and the other ≥ {args.long}, short / long − 1: "
              f"{spread(short_long)}")


if __name__ == "__main__":
    main()
