"""``SparsityReport``: one row per hook of the paper's metrics, with the run's metadata.

Views: ``.df`` (pandas), ``_repr_html_`` (notebooks), :meth:`to_markdown`, :meth:`plot`; storage: :meth:`save` /
:meth:`load` as JSON (floats are written with ``repr``, so the round trip is exact; NaN is kept as JSON ``NaN``).
Every view flags the rows whose learner has not converged (``converged`` False): their numbers are not yet the
method's. Rows without a ``converged`` key (reports saved before it existed) count as unknown, not as unconverged.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from .report_plot import late, num

__all__ = ["SparsityReport"]

COLUMNS = ("hook", "layer", "site", "d_in", "n_atoms", "n_rows", "n_tokens", "n_heldout", "n_eval", "lam",
           "normalized_loss", "normalized_loss_se", "n_active", "n_active_se", "coef_norm", "nnz", "fvu", "converged",
           "n_steps", "drift", "rate_change", "convergence", "capped", "n_dropped", "n_massive", "status")
_FORMAT_VERSION = 1


class SparsityReport:
    """Per-hook sparsity metrics. ``rows`` are dicts with :data:`COLUMNS`; ``meta`` describes the run.

    ``tables`` holds further named tables as lists of records (JSON-able dicts), e.g. ``"neurons/<hook>"`` (one row
    per neuron, see :meth:`neurons`) or ``"parameter_activation"`` (see :meth:`table`); they round-trip through
    :meth:`save` / :meth:`load` with the rows.
    """

    def __init__(self, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None,
                 tables: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.rows = [dict(r) for r in rows]
        self.meta = dict(meta or {})
        self.tables = {k: [dict(r) for r in v] for k, v in (tables or {}).items()}

    def table(self, name: str):
        """A stored table as a pandas DataFrame (``report.tables`` lists the names)."""
        import pandas as pd

        if name not in self.tables:
            raise KeyError(f"no table {name!r} in this report; it has {sorted(self.tables) or 'none'}.")
        return pd.DataFrame(self.tables[name])

    def neurons(self, hook: str):
        """Per-neuron statistics of ``hook`` (firing frequency, kind, covering tokens), when they were collected
        (``SparsityCollector(..., neurons=...)``)."""
        if f"neurons/{hook}" not in self.tables:
            have = [k.split("/", 1)[1] for k in self.tables if k.startswith("neurons/")]
            raise KeyError(f"no neuron statistics for {hook!r}; this report has them for {have or 'no hook'} "
                           "(collect them with SparsityCollector(..., neurons=True) or on mlp_post hooks).")
        df = self.table(f"neurons/{hook}")
        return df.set_index("neuron") if "neuron" in df.columns else df

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

    def to_markdown(self, columns: tuple[str, ...] | None = None) -> str:
        """A Markdown table; normalized loss is shown as ``value ± se``, with ``⚠`` on unconverged rows, and a line
        after the table lists the unconverged hooks with the reason. Default columns add the control ratio and the
        dead-neuron fraction when the report has them."""
        if columns is None:
            columns = ("hook", "layer", "site", "d_in", "n_rows", "n_tokens", "lam", "normalized_loss", "n_active",
                       "coef_norm", "nnz", "fvu", "converged", "n_steps")
            for extra in ("sparsity_ratio", "dead_frac", "n_token_detectors"):
                if any(_num_or_none(r.get(extra)) is not None for r in self.rows):
                    columns += (extra,)
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in self.rows:
            cells = []
            for c in columns:
                v = r.get(c)
                if c in ("normalized_loss", "n_active") and v is not None and not _isnan(v):
                    cells.append(f"{v:.3f} ± {num(r.get(c + '_se')):.3f}" + (" ⚠" if late(r) else ""))
                elif c == "converged":
                    cells.append("—" if v is None or _isnan(v) else "yes" if v else "NO")
                else:
                    cells.append(_fmt(v))
            lines.append("| " + " | ".join(cells) + " |")
        note = _late_note(self.rows)
        return "\n".join(lines + (["", f"⚠ {note}"] if note else []))

    def _repr_html_(self) -> str:
        m = self.meta.get("model", {})
        caption = html.escape(
            f"tl_sparsity — {m.get('model_class', '?')} {m.get('model_name') or ''} · TransformerLens "
            f"{m.get('transformer_lens')} · compat={m.get('compatibility_mode')} · dtype={m.get('dtype')}"
        )
        table = self.df.to_html(float_format=lambda v: f"{v:.4g}", na_rep="—")
        note = _late_note(self.rows)
        if note:  # mark the body's rows (one <tr> per report row, in order; cell text is escaped, so no stray <tr>)
            head, body, tail = table.partition("<tbody>")
            trs = tail.split("<tr>")
            marked = '<tr class="tl-not-converged" style="background-color:#fde0dc" title="not converged">'
            table = head + body + trs[0] + "".join(
                (marked if late(r) else "<tr>") + t for r, t in zip(self.rows, trs[1:]))
            note = f'<br><span style="color:#b00020">⚠ {html.escape(note)}</span>'
        return f"<div><b>{caption}</b>{note}{table}</div>"

    # ------------------------------------------------------------------ views across hooks and runs
    def plot(self, column: str = "normalized_loss", ax: Any = None, title: str | None = None) -> Any:
        """Profile by layer: ``column`` (default normalized loss; ``"n_active"`` for the active-feature count) on y,
        layer on x (integer ticks), one line per site, ±1 standard error bars when the report has them, and a dashed
        line per site for ``control_<column>`` when present. Hooks outside blocks (``hook_embed``) are drawn at
        x = −1, labelled "emb". Points of unconverged rows are ringed in red (legend "not converged"). Returns the
        matplotlib Axes (:func:`tl_sparsity.report_plot.plot`)."""
        from .report_plot import plot

        return plot(self, column, ax, title)

    def compare(self, other: "SparsityReport", columns: tuple[str, ...] | str = ("normalized_loss", "fvu"),
                labels: tuple[str, str] = ("a", "b")):
        """Side-by-side DataFrame of two runs, indexed by hook (the union; a hook missing from one run gets NaN):
        for each column ``<col>_<label_a>``, ``<col>_<label_b>`` and ``<col>_ratio`` (b / a)."""
        import pandas as pd

        if not isinstance(other, SparsityReport):
            raise TypeError(f"compare() takes another SparsityReport, got {type(other).__name__}.")
        if isinstance(columns, str):
            columns = (columns,)
        if len(labels) != 2 or labels[0] == labels[1]:
            raise ValueError(f"labels must be two different strings, got {labels!r}.")
        a, b = self.df, other.df
        for col in columns:
            if col not in a.columns and col not in b.columns:
                raise KeyError(f"no column {col!r} in either report; columns: {list(a.columns)}.")
        hooks = list(dict.fromkeys([*a.index, *b.index]))
        out = pd.DataFrame(index=pd.Index(hooks, name="hook"))
        for col in columns:
            va = pd.to_numeric(a[col], errors="coerce").reindex(hooks) if col in a else float("nan")
            vb = pd.to_numeric(b[col], errors="coerce").reindex(hooks) if col in b else float("nan")
            out[f"{col}_{labels[0]}"] = va
            out[f"{col}_{labels[1]}"] = vb
            out[f"{col}_ratio"] = out[f"{col}_{labels[1]}"] / out[f"{col}_{labels[0]}"]
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Write ``.df`` as CSV; returns the path."""
        path = Path(path)
        self.df.to_csv(path)
        return path

    def to_html(self) -> str:
        """A standalone HTML page with the table and the run's metadata."""
        meta = html.escape(json.dumps(self.meta, indent=1, default=_jsonable))
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>tl_sparsity report</title></head><body>"
                f"{self._repr_html_()}<h3>metadata</h3><pre>{meta}</pre></body></html>")

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        return {"format": "tl_sparsity.report", "version": _FORMAT_VERSION, "meta": self.meta, "rows": self.rows,
                "tables": self.tables}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsityReport":
        """A report from :meth:`to_dict` output; :class:`ValueError` says what is wrong when it is not one."""
        if not isinstance(data, dict) or data.get("format") != "tl_sparsity.report":
            raise ValueError("not a tl_sparsity report (missing format marker 'tl_sparsity.report').")
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"report format version {data.get('version')} is not supported (this is "
                             f"{_FORMAT_VERSION}); upgrade tl_sparsity.")
        _check_shape(data)
        return cls(data["rows"], data.get("meta"), data.get("tables"))

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON to ``path``; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=_jsonable))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SparsityReport":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ValueError as e:  # bad JSON, bad UTF-8, or not a report's shape
            raise ValueError(f"{path}: {e}") from e


def _check_shape(data: dict[str, Any]) -> None:
    """Raise :class:`ValueError` unless ``data``'s rows, meta and tables have the types a saved report has."""
    rows, meta, tables = data.get("rows"), data.get("meta"), data.get("tables")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"'rows' must be a list of objects, found {str(rows)[:80]!r}.")
    for i, c, v in ((i, c, r.get(c)) for i, r in enumerate(rows) for c in COLUMNS):
        text = c in ("hook", "site", "convergence", "status")
        if (v is None and c == "hook") or v is not None and (not isinstance(v, str) if text else isinstance(
                v, (str, list, dict))):
            raise ValueError(f"row {i}: {c!r} is {v!r}, expected {'a string' if text else 'a number'}.")
    if not isinstance(meta, (dict, type(None))) or not isinstance(tables, (dict, type(None))) or not all(
            isinstance(t, list) and all(isinstance(r, dict) for r in t) for t in (tables or {}).values()):
        raise ValueError("'meta' must be an object and 'tables' map names to lists of objects.")


def _jsonable(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else str(v)


def _num_or_none(v: Any) -> float | None:
    return None if v is None or _isnan(v) else v


def _late_note(rows: list[dict[str, Any]]) -> str:
    """``"not converged (N of M hooks): <hook>: <reason>; ..."``, or ``""`` when no row is unconverged."""
    bad = [r for r in rows if late(r)]
    reasons = "; ".join(f"{r['hook']}: {r.get('convergence') or r.get('status') or '?'}" for r in bad)
    return f"not converged ({len(bad)} of {len(rows)} hooks): {reasons}" if bad else ""


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
