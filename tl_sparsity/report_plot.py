""":meth:`SparsityReport.plot <tl_sparsity.report.SparsityReport.plot>`: a report's column by layer, one line per
site, with integer layer ticks (a two-layer report shows 0 and 1, not 0.2, 0.4, …); and how every view of a report
reads a row's flag and numbers (:func:`late`, :func:`num`). Below :mod:`tl_sparsity.report`, which draws with it."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["plot", "late", "num"]


def late(row: dict[str, Any]) -> bool:
    """Whether the row's learner has not converged (a missing or None ``converged`` is unknown: False here)."""
    v = row.get("converged")
    return v is not None and not v


def num(v: Any) -> float:
    """A cell as a float (None → NaN)."""
    return float("nan") if v is None else float(v)


def plot(report: Any, column: str = "normalized_loss", ax: Any = None, title: str | None = None) -> Any:
    """Draw the :class:`~tl_sparsity.report.SparsityReport` ``report``'s ``column`` by layer on ``ax`` (a new figure
    when None); see ``SparsityReport.plot``."""
    if not report.rows:
        raise ValueError("this report has no rows to plot.")
    if all(column not in r for r in report.rows):
        raise KeyError(f"no column {column!r} in this report; columns: {sorted(report.rows[0])}.")
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    by_site: dict[str, list[dict[str, Any]]] = {}
    for r in report.rows:
        by_site.setdefault(r.get("site") or r["hook"], []).append(r)
    layers, ringed = set(), []
    for site, rows in by_site.items():
        rows = sorted(rows, key=lambda r: -1 if r.get("layer") is None else r["layer"])
        xs = [-1 if r.get("layer") is None else r["layer"] for r in rows]
        layers.update(xs)
        ys = [num(r.get(column)) for r in rows]
        ringed += [(x, y) for x, y, r in zip(xs, ys, rows) if late(r) and not math.isnan(y)]
        se = [num(r.get(f"{column}_se")) for r in rows]
        yerr = se if any(not math.isnan(v) for v in se) else None
        line = ax.errorbar(xs, ys, yerr=yerr, marker="o", ms=4, capsize=2, label=site)
        ctrl = [num(r.get(f"control_{column}")) for r in rows]
        if any(not math.isnan(v) for v in ctrl):
            ax.plot(xs, ctrl, ls="--", color=line.lines[0].get_color(), label=f"{site}: Gaussian control")
    if ringed:
        ax.scatter(*zip(*ringed), s=90, facecolors="none", edgecolors="red", linewidths=1.5, zorder=3,
                   label="not converged")
    ax.set_xlabel("layer")
    ax.set_ylabel(column.replace("_", " "))
    _layer_ticks(ax, sorted(layers))
    m = report.meta.get("model", {})
    name = str(m.get("model_name") or m.get("model_class") or "model").split(" (")[0]  # drop provenance
    ax.set_title(title if title is not None else f"{name}: {column.replace('_', ' ')} by layer", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def _layer_ticks(ax: Any, layers: list[int]) -> None:
    """Integer ticks at layers only (every layer when few, else matplotlib's integer choice); ``emb`` at −1."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = min(layers), max(layers)
    blocks = list(range(max(lo, 0), hi + 1))
    if len(blocks) <= 12:
        ticks = blocks
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ticks = [int(t) for t in ax.get_xticks() if float(t).is_integer() and max(lo, 0) <= t <= hi]
    ax.set_xticks([-1, *ticks] if -1 in layers else ticks,
                  ["emb", *map(str, ticks)] if -1 in layers else [str(t) for t in ticks])
    ax.set_xlim(lo - 0.5, hi + 0.5)
