"""What ``tl-sparsity show`` and ``tl-sparsity compare`` print besides the tables: a saved report's metadata in a few
lines (model, hooks, tokens, device, the options that differ from the defaults, how many hooks converged), and the
differences in budget and learner options between two runs that make their numbers not directly comparable."""

from __future__ import annotations

from typing import Any

from .report import SparsityReport

__all__ = ["describe", "differences"]

#: The run's budget as ``tl-sparsity run`` records it (``report.meta["run"]``).
_BUDGET = ("tokens_requested", "until", "max_minutes")
_NOT_OPTIONS = ("d_in", "device")  # per hook or per machine: not a choice that changes the method


def _default_options() -> dict[str, Any]:
    from .coding.options import LearnerOptions

    return {k: v for k, v in LearnerOptions().as_dict().items() if k not in _NOT_OPTIONS}


def _recorded(opts: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """A report's options with those it does not record filled in: the value a run made before the option existed
    had (e.g. ``rate_checks`` 0), else today's default. Empty when the report records no options at all."""
    from .coding.state_io import IMPLIED_PARAMS

    return {k: opts[k] if k in opts else IMPLIED_PARAMS.get(k, v) for k, v in default.items()} if opts else {}


def describe(report: SparsityReport) -> list[str]:
    """The metadata lines ``show`` prints before the table."""
    meta, rows = report.meta, report.rows
    m, run = meta.get("model", {}), meta.get("run", {})
    mode = ", compatibility mode" if m.get("compatibility_mode") else ""
    lines = [f"model: {m.get('model_class', '?')} {m.get('model_name') or ''} (TransformerLens "
             f"{m.get('transformer_lens', '?')}, dtype {m.get('dtype', '?')}{mode})"]
    sites: dict[str, list[str]] = {}
    for r in rows:
        sites.setdefault(r.get("site") or r["hook"], []).append("emb" if r.get("layer") is None else str(r["layer"]))
    lines.append(f"hooks: {len(rows)} — " + "; ".join(f"{s} at layers {_ranges(ls)}" if ls != ["emb"] else s
                                                      for s, ls in sites.items()))
    counts = sorted(int(r["n_rows"]) if r.get("n_rows") is not None else int(r["n_tokens"]) + int(r["n_heldout"])
                    for r in rows if r.get("n_rows") is not None or None not in (r.get("n_tokens"), r.get("n_heldout")))
    have = f"{counts[0]}" if counts and counts[0] == counts[-1] else f"{counts[0]} to {counts[-1]}" if counts else "?"
    budget = (f"; budget --tokens {run['tokens_requested']}, until {run.get('until')}, text {run.get('text')}, "
              f"windows of {run.get('ctx_len')} tokens, {run.get('batch_size')} per forward"
              if "tokens_requested" in run else "")
    lines.append(f"tokens: {have} rows per hook (n_rows){budget}")
    opts = meta.get("options", {})
    lines.append(f"device: {run.get('device') or opts.get('device') or 'not recorded'}")
    default = _default_options()
    full = _recorded(opts, default)
    changed = [f"{k}={full[k]!r}" + ("" if k in opts else " (not recorded: made before the option existed)")
               for k in full if full[k] != default[k]]
    lines.append("options differing from the defaults: " + (", ".join(changed) if changed else "none") + (
        "" if opts else " (not recorded)"))
    known = [r for r in rows if r.get("converged") is not None]
    n_conv = sum(bool(r["converged"]) for r in known)
    lines.append(f"converged: {n_conv} of {len(rows)} hooks" + (
        f" ({len(rows) - len(known)} without a verdict)" if len(known) < len(rows) else ""))
    return lines


def _ranges(layers: list[str]) -> str:
    """``["emb", "0", "1", "2", "5"]`` → ``"emb, 0–2, 5"``."""
    out: list[list[str]] = []
    for x in layers:
        if out and x.isdigit() and out[-1][-1].isdigit() and int(x) == int(out[-1][-1]) + 1:
            out[-1] = [out[-1][0], x]
        else:
            out.append([x])
    return ", ".join("–".join(r) if len(r) == 1 or int(r[1]) > int(r[0]) + 1 else ", ".join(r) for r in out)


def differences(a: SparsityReport, b: SparsityReport, labels: tuple[str, str] = ("a", "b")) -> list[str]:
    """``"<what>: <value> (a), <value> (b)"`` for each budget setting and learner option in which the runs differ
    (an option a report does not record counts as the value runs made before it existed had, else the default)."""
    out = []
    ra, rb = a.meta.get("run", {}), b.meta.get("run", {})
    for k in _BUDGET:
        if (k in ra or k in rb) and ra.get(k) != rb.get(k):
            out.append(f"{k}: {ra.get(k, 'not recorded')} ({labels[0]}), {rb.get(k, 'not recorded')} ({labels[1]})")
    default = _default_options()
    oa, ob = _recorded(a.meta.get("options", {}), default), _recorded(b.meta.get("options", {}), default)
    for k in dict.fromkeys([*oa, *ob]):
        va, vb = oa.get(k, default.get(k)), ob.get(k, default.get(k))
        if va != vb:
            out.append(f"{k}: {va!r} ({labels[0]}), {vb!r} ({labels[1]})")
    return out
