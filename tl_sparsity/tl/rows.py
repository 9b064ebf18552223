"""A collector's report: one row per hook (the learner's held-out metrics, its convergence verdict and the side
statistics' columns), the metadata, and the tables (neuron tables, each hook's convergence trace)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

from ..coding.bounds import state_problems
from ..coding.convergence import ConvergenceTrace
from ..coding.learner import OnlineSparseCoder
from ..report import SparsityReport
from ..stats.side import CONTROL_NOTE
from . import attach as _attach
from . import hooks as _hooks

__all__ = ["build_report", "hook_rows", "learner_row", "add_to_report", "rule_events"]


def build_report(col: Any, controls: bool | None = None, merge: Any = None) -> SparsityReport:
    """:meth:`SparsityCollector.report`'s work (see there). ``merge(rows)``: a parallel mode's step after the checks
    (collective), completing ``rows`` in place; returns ``(view, meta)``: the collector whose side statistics the
    report reads (its ``extras`` merged over the ranks) and metadata to add (see :mod:`tl_sparsity.scale`)."""
    if controls and not col.controls:
        raise ValueError("this collector keeps no covariances: build it with SparsityCollector(..., "
                         "controls=True) to get control columns.")
    rows = hook_rows(col, col.learners)
    view, more = (col, {}) if merge is None else merge(rows)
    if all(r["status"].startswith("no tokens") for r in rows) and getattr(col, "_fit_forwards", 0):
        raise RuntimeError(
            f"no activations collected: fit ran {col._fit_forwards} forward(s), but no hook kept a row. Each sequence "
            "had only one position, its first (BOS), which skip_bos=True drops: give sequences of at least two tokens "
            "(BOS + text; fit also takes text), or build the collector with skip_bos=False if there is no BOS.")
    if all(r["status"].startswith("no tokens") for r in rows):
        raise RuntimeError(
            "no activations collected yet: run the model with col.fwd_hooks(), inside `with col.attach():`, "
            "after col.start(), or through col.fit(...) first."
        )
    for row in rows:
        if row["status"] != "ok" and row["converged"] is not False:
            warnings.warn(f"{row['hook']}: {row['status']}", stacklevel=3)
    late = [r for r in rows if r["converged"] is False]
    if late:
        warnings.warn(f"{len(late)} of {len(rows)} hooks have not converged; their numbers are not yet the "
                      "method's (feed more tokens, or fit(..., until='converged')): "
                      + "; ".join(f"{r['hook']}: {r['convergence']}" for r in late), stacklevel=3)
    meta: dict[str, Any] = {"model": _hooks.model_info(col.model), "options": col.learners_params(),
                            "skip_bos": col.skip_bos, **more}
    tables = add_to_report(view, rows, meta, col.controls if controls is None else bool(controls))
    for name, lr in col.learners.items():  # the evidence of each verdict: the held-out probe's trace, the rule's steps
        if lr.trace_.steps:
            tables[f"trace/{name}"] = [{"step": s, "normalized_loss": v}
                                       for s, v in zip(lr.trace_.steps, lr.trace_.values)]
            tables[f"rule/{name}"] = rule_events(lr.trace_)
    if view is not col:
        for name, ex in view.extras.items():
            col.extras[name]._control = ex._control  # keep the control cache
    return SparsityReport(rows, meta, tables)


def rule_events(trace: ConvergenceTrace) -> list[dict[str, Any]]:
    """The convergence rule's steps along one learner's training, in step order: each check of λ at its fixed point
    (``lam check``: λ before and after), the step since which λ has not changed (``lam unchanged since``: its
    freeze, or its last move at a check) and each cut of the dictionary's rate (``rate cut``: the probe's level
    before it)."""
    events: list[dict[str, Any]] = [{"step": int(s), "event": "lam check", "lam_before": b, "lam_after": a}
                                    for s, b, a in trace.lam_checks]
    if trace.lam_frozen_at is not None:
        events.append({"step": int(trace.lam_frozen_at), "event": "lam unchanged since"})
    events += [{"step": int(s), "event": "rate cut", "level": v} for s, v in trace.rate_cuts]
    return sorted(events, key=lambda e: e["step"])  # stable: at one step, a check before the window it starts


def hook_rows(col: Any, names: Iterable[str]) -> list[dict[str, Any]]:
    """Report rows (hook, layer, site and :func:`learner_row`) for the learners of ``names``."""
    rows = []
    for name in names:
        layer, site = _hooks.parse_hook_name(name)
        rows.append({"hook": name, "layer": layer, "site": site, **learner_row(col.learners[name]),
                     "measured": _attach.measured_label(col, name)})  # the HookPoint, or an SAE's hook point
    return rows


def learner_row(learner: OnlineSparseCoder) -> dict[str, Any]:
    """One report row's learner columns (metrics on the held-out reservoir) and a status string."""
    row: dict[str, Any] = {
        "d_in": learner.d_in, "n_atoms": None, "n_tokens": learner.n_tokens_, "n_heldout": learner.n_heldout_,
        "n_eval": 0, "lam": None, "normalized_loss": float("nan"), "normalized_loss_se": float("nan"),
        "n_active": float("nan"), "n_active_se": float("nan"), "coef_norm": float("nan"), "nnz": float("nan"),
        "fvu": float("nan"), "capped": learner.capped_,
        "n_dropped": learner.n_dropped_, "n_massive": learner.n_massive_, "converged": None,
        "n_steps": learner.n_steps_, "drift": float("nan"), "rate_change": float("nan"),
        "convergence": "no dictionary yet",
    }
    row["n_rows"] = row_count(row, learner)
    seen = learner.n_tokens_ + learner.n_heldout_ + learner.n_pending_
    if seen == 0:
        row["status"] = "no tokens: this hook never fired (gated hook point, or a layer past stop_at_layer?)"
        return row
    if not learner.initialized:
        row["status"] = (f"warming up: {seen} rows seen, the first batch needs {learner.batch_size}; "
                         "feed more tokens")
        return row
    row["n_atoms"] = learner.dictionary_.shape[0]
    row["lam"] = learner.lam_
    bad_state = state_problems(learner)
    if bad_state:
        row["status"] = (f"state not finite: {', '.join(bad_state)} hold NaN/Inf; this learner's numbers are "
                         "meaningless and it cannot recover (start a new one)")
        return row
    if learner.heldout_.shape[0] < 2:
        row["status"] = "too few held-out rows to evaluate; feed more tokens (or raise holdout_frac)"
        return row
    ev = learner.evaluate()
    row["n_eval"] = int(ev["n_eval"])
    for k in ("normalized_loss", "normalized_loss_se", "n_active", "n_active_se", "coef_norm", "nnz", "fvu"):
        row[k] = ev[k]
    verdict = learner.convergence_
    change = verdict["rate_change"]
    row.update(converged=bool(verdict["converged"]), drift=float(verdict["drift"]),
               rate_change=float("nan") if change is None else float(change), convergence=verdict["reason"])
    problem = _degenerate(learner.heldout_) or _metric_problem(row)
    if problem:
        row["status"] = problem
    else:
        row["status"] = "ok" if row["converged"] else f"not converged: {verdict['reason']}"
    return row


def row_count(row: dict[str, Any], learner: OnlineSparseCoder) -> int:
    """Rows the hook received (``n_rows``): trained on, held out, set aside (massive, dropped) and pending; the same
    for every hook that saw the same forwards, unlike ``n_tokens`` (rows trained on; the held-out split is random)."""
    return int(row["n_tokens"] + row["n_heldout"] + row["n_massive"] + row["n_dropped"] + learner.n_pending_)


def _degenerate(heldout: Any) -> str | None:
    """A status for held-out rows with (numerically) zero variance after centring: all zero, or all one row."""
    h = heldout.double()
    total = float(h.square().sum())
    centred = float((h - h.mean(0)).square().sum())
    if not centred > 1e-12 * total:
        return ("degenerate: the held-out rows have zero variance after centring (all rows equal, e.g. all zero "
                "or constant); nothing to code")
    return None


def _metric_problem(row: dict[str, Any]) -> str | None:
    """A status for metrics outside their possible range (never "ok"): FVU above 1 (the dictionary explains less
    than the rows' mean does), below 0 or not finite; a normalized loss negative or not finite."""
    fvu, loss = row["fvu"], row["normalized_loss"]
    if not math.isfinite(loss) or loss < 0:
        why = " (no held-out row has a nonzero code: λ too large for these rows?)" if math.isnan(loss) else ""
        return f"metrics out of range: normalized_loss = {loss}{why}"
    if not math.isfinite(fvu) or fvu < 0:
        return f"metrics out of range: fvu = {fvu}"
    if fvu > 1:
        return f"metrics out of range: fvu = {fvu:.4g} > 1, the dictionary explains less than the rows' mean does"
    return None


def add_to_report(col: Any, rows: list[dict[str, Any]], meta: dict[str, Any], controls: bool
                  ) -> dict[str, list[dict[str, Any]]]:
    """Add the side statistics of collector ``col`` to its report's ``rows`` (in hook order) and ``meta``: neuron
    columns when any hook has neuron statistics, then control columns when ``controls``; returns the neuron tables."""
    tables, tokenizer = {}, getattr(col.model, "tokenizer", None)
    for row in rows:
        ex = col.extras[row["hook"]]
        if col.neuron_hooks:
            row.update(ex.neuron_row())
        if ex.neurons is not None and ex.neurons.n_tokens:
            tables[f"neurons/{row['hook']}"] = ex.neuron_table(tokenizer)
    if col.neuron_hooks:
        meta["neurons"] = {"hooks": list(col.neuron_hooks), "options": _jsonable_options(col.neuron_options),
                           "tokenizer": None if tokenizer is None else type(tokenizer).__name__,
                           "n_tokens_seen": {n: col.extras[n].neurons.n_tokens if col.extras[n].neurons else 0
                                             for n in col.neuron_hooks}}
    if col.controls:
        meta["controls"] = {"computed": controls, "kind": "covariance-matched Gaussian", "method": CONTROL_NOTE}
        if controls:
            for row in rows:
                row.update(col.extras[row["hook"]].control_row(col.learners[row["hook"]], row["normalized_loss"]))
            meta["controls"]["n_rows"] = {n: lr.n_tokens_ + lr.n_heldout_ for n, lr in col.learners.items()}
    return tables


def _jsonable_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if k == "device" and v is not None else v) for k, v in options.items()}
