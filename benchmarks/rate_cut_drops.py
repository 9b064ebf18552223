"""How much each cut of the dictionary's rate lowered the held-out normalized loss, read from saved reports' traces
(the table "What a passed rate check certifies" in ``docs/convergence.md``).

    python benchmarks/rate_cut_drops.py docs/smollm2_report.json docs/minilm_report.json docs/minilm_mlp_report.json

For each hook's ``trace/<hook>`` table, a cut of the rate at step o is where the trace's points fall back to every
step (the schedule restarts at each cut: points at o + 1, o + 2, … after a spacing > 1). The drop of that cut is
the trace's value at step 1.5·o (the last point at or before it; the rule judges a cut from there) over its value at
o, minus 1. Per report and cut number: median, smallest and largest drop over the hooks whose trace reached 1.5·o.
"""

from __future__ import annotations

import argparse
import bisect
import statistics

from tl_sparsity import SparsityReport


def cut_steps(steps: list[int]) -> list[int]:
    """The steps o at which the rate was cut: the point before each run of consecutive steps that follows a gap."""
    return [steps[i] - 1 for i in range(2, len(steps))
            if steps[i] - steps[i - 1] == 1 and steps[i - 1] - steps[i - 2] > 1]


def drops(steps: list[int], values: list[float]) -> list[float]:
    """Each cut's relative drop, value at 1.5·o / value at o − 1, for the cuts whose 1.5·o the trace reached."""
    def at(s: int) -> float:
        return values[max(bisect.bisect_right(steps, s) - 1, 0)]

    return [at(o + o // 2) / at(o) - 1 for o in cut_steps(steps) if o + o // 2 <= steps[-1]]


def by_cut(report: SparsityReport) -> dict[int, list[float]]:
    """Cut number (0 = first) → the drops of the report's hooks."""
    out: dict[int, list[float]] = {}
    for name, table in report.tables.items():
        if name.startswith("trace/"):
            for k, d in enumerate(drops([r["step"] for r in table], [r["normalized_loss"] for r in table])):
                out.setdefault(k, []).append(d)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+")
    args = p.parse_args(argv)
    for path in args.reports:
        cells = [f"cut {k + 1}: {100 * statistics.median(v):+.2f} % ({100 * min(v):+.2f} to {100 * max(v):+.2f}), "
                 f"{len(v)} hooks" for k, v in sorted(by_cut(SparsityReport.load(path)).items())]
        print(f"{path}: " + ("; ".join(cells) or "no cut reached 1.5·o"))


if __name__ == "__main__":
    main()
