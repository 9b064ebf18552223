"""``SparsityReport``: one row per hook of the paper's metrics, with the run's metadata.

Views: ``.df`` (pandas), ``_repr_html_`` (notebooks), :meth:`to_markdown`; storage: :meth:`save` / :meth:`load` as
JSON (floats are written with ``repr``, so the round trip is exact; NaN is kept as JSON ``NaN``).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["SparsityReport"]

COLUMNS = ("hook", "layer", "site", "d_in", "n_atoms", "n_tokens", "n_heldout", "n_eval", "lam", "normalized_loss",
           "normalized_loss_se", "coef_norm", "nnz", "fvu", "capped", "n_dropped", "status")
_FORMAT_VERSION = 1


class SparsityReport:
    """Per-hook sparsity metrics. ``rows`` are dicts with :data:`COLUMNS`; ``meta`` describes the run."""

    def __init__(self, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
        self.rows = [dict(r) for r in rows]
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, hook: str) -> dict[str, Any]:
        for r in self.rows:
            if r["hook"] == hook:
                return dict(r)
        raise KeyError(f"no row for hook {hook!r}; this report has {[r['hook'] for r in self.rows]}.")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparsityReport):
            return NotImplemented
        return _same(self.to_dict(), other.to_dict())

    def __repr__(self) -> str:
        return f"SparsityReport({len(self.rows)} hooks)\n{self.to_markdown()}"

    @property
    def df(self):
        """A pandas DataFrame indexed by hook name."""
        import pandas as pd

        cols = list(COLUMNS) + [c for r in self.rows for c in r if c not in COLUMNS]
        cols = list(dict.fromkeys(cols))
        return pd.DataFrame([{c: r.get(c) for c in cols} for r in self.rows], columns=cols).set_index("hook")

    def to_markdown(self, columns: tuple[str, ...] = ("hook", "layer", "site", "d_in", "n_tokens", "lam",
                                                      "normalized_loss", "coef_norm", "nnz", "fvu")) -> str:
        """A Markdown table; normalized loss is shown as ``value ± se``."""
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in self.rows:
            cells = []
            for c in columns:
                v = r.get(c)
                if c == "normalized_loss" and v is not None and not _isnan(v):
                    cells.append(f"{v:.3f} ± {r.get('normalized_loss_se', float('nan')):.3f}")
                else:
                    cells.append(_fmt(v))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        m = self.meta.get("model", {})
        caption = html.escape(
            f"tl_sparsity — {m.get('model_class', '?')} {m.get('model_name') or ''} · TransformerLens "
            f"{m.get('transformer_lens')} · compat={m.get('compatibility_mode')} · dtype={m.get('dtype')}"
        )
        return f"<div><b>{caption}</b>{self.df.to_html(float_format=lambda v: f'{v:.4g}', na_rep='—')}</div>"

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        return {"format": "tl_sparsity.report", "version": _FORMAT_VERSION, "meta": self.meta, "rows": self.rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsityReport":
        if data.get("format") != "tl_sparsity.report":
            raise ValueError("not a tl_sparsity report (missing format marker 'tl_sparsity.report').")
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"report format version {data.get('version')} is not supported (this is "
                             f"{_FORMAT_VERSION}); upgrade tl_sparsity.")
        return cls(data["rows"], data.get("meta"))

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON to ``path``; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=_jsonable))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SparsityReport":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _fmt(v: Any) -> str:
    if v is None or _isnan(v):
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if _isnan(a) and _isnan(b):
        return True
    return a == b
