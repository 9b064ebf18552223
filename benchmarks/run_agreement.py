"""How far two runs of the same hooks agree: per column, the ratio b / a per hook (median, smallest, largest) and
the rank correlation across hooks (Spearman, no ties expected), from two saved reports.

    python benchmarks/run_agreement.py docs/smollm2_report_adam_decay.json docs/smollm2_report.json
    python benchmarks/run_agreement.py docs/smollm2_report_adam_decay.json docs/smollm2_report.json --converged

``--converged`` keeps only the hooks both runs call converged.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tl_sparsity import SparsityReport


def _ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).argsort().argsort().double()


def agreement(a: SparsityReport, b: SparsityReport, column: str, converged: bool = False) -> dict[str, float]:
    rows_b = {r["hook"]: r for r in b.rows}
    both = [(r, rows_b[r["hook"]]) for r in a.rows if r["hook"] in rows_b]
    if converged:
        both = [(x, y) for x, y in both if x.get("converged") and y.get("converged")]
    pairs = [(x[column], y[column]) for x, y in both]
    ratios = [y / x - 1 for x, y in pairs]
    ra, rb = _ranks([x for x, _ in pairs]), _ranks([y for _, y in pairs])
    rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]) if len(pairs) > 1 else float("nan")  # one hook: none
    return {"hooks": len(pairs), "median": statistics.median(ratios), "median_abs": statistics.median(map(abs, ratios)),
            "min": min(ratios), "max": max(ratios), "spearman": rho}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--columns", default="normalized_loss,n_active")
    p.add_argument("--converged", action="store_true", help="only the hooks both runs call converged")
    args = p.parse_args(argv)
    a, b = SparsityReport.load(args.a), SparsityReport.load(args.b)
    print("column           hooks  median b/a-1  median |b/a-1|     min     max  spearman")
    for col in args.columns.split(","):
        s = agreement(a, b, col, args.converged)
        print(f"{col:16s} {s['hooks']:5d} {s['median']:+13.3f} {s['median_abs']:15.3f} {s['min']:+7.3f} "
              f"{s['max']:+7.3f} {s['spearman']:9.3f}")


if __name__ == "__main__":
    main()
