"""benchmarks/convergence.py --quick runs end to end and returns (and prints) the tables it promises."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import load_script


def _load():
    return load_script("benchmarks/convergence.py", "convergence_bench")


def test_fresh_rows_come_from_the_same_distribution_by_another_generator():
    bench = _load()
    src = bench.make_source(16, 4.0, seed=3)
    state = src._gen.get_state()
    fresh = bench.fresh_rows(src, 256)
    assert torch.equal(src._gen.get_state(), state)  # the training stream is untouched
    assert fresh.shape == (256, 16) and not torch.equal(fresh, src.sample(256))
    twin = bench.make_source(16, 4.0, seed=3)
    assert torch.equal(twin.features, src.features) and twin.scale == src.scale


def test_tokens_to_tol():
    bench = _load()
    b = [1, 2, 3, 4]
    assert bench.tokens_to_tol(b, [2.0, 1.0, 1.2, 1.0]) == 4  # 1.2 is 20 % off: only the last budget counts
    assert bench.tokens_to_tol(b, [2.0, 1.04, 1.01, 1.0]) == 2
    assert bench.tokens_to_tol(b, [1.0, 1.0, 1.0, float("nan")]) is None


def test_quick_mode_structure(capsys):
    bench = _load()
    out = bench.main(["--quick"])
    printed = capsys.readouterr().out
    assert printed.startswith("command:") and "device:" in printed and "torch:" in printed and "date:" in printed
    assert "## summary" in printed and "verdict" in printed
    assert out["summary"], "no source ran"
    sources = {r["source"] for r in out["summary"]}
    for name in sources:
        rows = [r for r in out["rows"] if r["source"] == name]
        assert {r["learner"] for r in rows} == {"old", "new"}
        for lr in ("old", "new"):
            budgets = [r["budget"] for r in rows if r["learner"] == lr]
            assert budgets == sorted(budgets) and budgets[-1] <= 30_000
            for r in rows:
                assert isinstance(r["converged"], bool) and "drift" in r and "reason" in r
                assert math.isfinite(r["heldout"]) and math.isfinite(r["fresh"]) and r["n_steps"] >= 1
    for s in out["summary"]:
        for lr in ("old", "new"):
            assert math.isfinite(s[f"{lr}_longrun"]) and math.isfinite(s[f"{lr}_longrun_fresh"])
            assert s[f"{lr}_tok5"] is not None
            assert f"{lr}_tok_verdict" in s  # the verdict column (None: never converged within the budgets)


def test_run_agreement_by_hand():
    """benchmarks/run_agreement.py on two small reports: ratios and rank correlation computed by hand."""
    from tl_sparsity import SparsityReport

    mod = load_script("benchmarks/run_agreement.py", "run_agreement")
    rows = lambda vals: [{"hook": f"h{i}", "normalized_loss": v} for i, v in enumerate(vals)]  # noqa: E731
    a, b = SparsityReport(rows([1.0, 2.0, 4.0]), {}, {}), SparsityReport(rows([0.9, 2.2, 3.0]), {}, {})
    got = mod.agreement(a, b, "normalized_loss")
    assert got["hooks"] == 3
    assert (got["min"], got["median"], got["max"]) == pytest.approx((-0.25, -0.1, 0.1))
    assert got["median_abs"] == pytest.approx(0.1) and got["spearman"] == pytest.approx(1.0)
    swapped = mod.agreement(a, SparsityReport(rows([3.0, 2.0, 1.0]), {}, {}), "normalized_loss")
    assert swapped["spearman"] == pytest.approx(-1.0)
    a.rows[2]["converged"], b.rows[0]["converged"] = False, False  # --converged: hooks both runs call converged
    for r in a.rows[:2] + b.rows[1:]:
        r.setdefault("converged", True)
    only = mod.agreement(a, b, "normalized_loss", converged=True)
    assert only["hooks"] == 1 and only["median"] == pytest.approx(0.1) and math.isnan(only["spearman"])


def test_rate_cut_drops_by_hand():
    """benchmarks/rate_cut_drops.py finds the cuts where a learner's trace schedule restarts, and each cut's drop."""
    from tl_sparsity import SparsityReport
    from tl_sparsity.coding.convergence import ConvergenceTrace

    mod = load_script("benchmarks/rate_cut_drops.py", "rate_cut_drops")
    t = ConvergenceTrace(rate_checks=2)
    level = {0: 4.0, 400: 3.0, 600: 2.9}  # the value from each cut on: the first cut drops 25 %, the second 3.3 %
    for s in range(1, 1000):  # as a learner does: the point at step s, then (at 400 and 600) the cut
        if ConvergenceTrace.due(s, t.origin):
            t.add(s, level[max(o for o in level if o < s)])
        if s in (400, 600):
            t.cut(s, level[0 if s == 400 else 400])
    assert [c[0] for c in t.rate_cuts] == mod.cut_steps(t.steps) == [400, 600]
    assert mod.drops(t.steps, t.values) == pytest.approx([3.0 / 4.0 - 1, 2.9 / 3.0 - 1])
    table = [{"step": s, "normalized_loss": v} for s, v in zip(t.steps, t.values)]
    report = SparsityReport([{"hook": "h"}], {}, {"trace/h": table, "trace/g": table[:5]})
    assert mod.by_cut(report) == {0: pytest.approx([-0.25]), 1: pytest.approx([2.9 / 3.0 - 1])}


def test_replay_rule_by_hand():
    """benchmarks/replay_rule.py: a flat trace is cut where the rule cuts it; a trace that fell, then swings with no
    trend, is cut once two windows are trendless at one level, and on its last window alone one doubling earlier."""
    from tl_sparsity.coding.convergence import ConvergenceTrace

    mod = load_script("benchmarks/replay_rule.py", "replay_rule")
    steps = [s for s in range(100, 1601) if ConvergenceTrace.due(s)]
    flat = [{"step": s, "normalized_loss": 3.0} for s in steps]
    assert mod.replay(flat, 0.02, 400, 3)[0][0] == 400
    swing = [{"step": s, "normalized_loss": (3.0 + 0.6 * max(0, 400 - s) / 400) * (1 + 0.04 * (-1) ** (i // 2))}
             for i, s in enumerate(steps)]
    _, two, one = mod.replay(swing, 0.02, 400, 3)
    assert one and two and one[0] < two[0] and two[0] >= 2 * 400


def test_rule_history_by_hand(tmp_path, capsys):
    """benchmarks/rule_history.py: values at fixed steps (blank after a run's end), the rate cuts a report names,
    and the short/long and long/long comparisons of final values, on two planted reports."""
    from tl_sparsity import SparsityReport

    mod = load_script("benchmarks/rule_history.py", "rule_history")
    trace = [{"step": s, "normalized_loss": 10.0 / (1 + s / 1000)} for s in range(100, 12001, 100)]
    assert mod.value_at(trace, 800) == pytest.approx(10.0 / 1.8) and mod.value_at(trace, 50) is None
    assert mod.value_at(trace[:10], 1600) is None  # the run had stopped at step 1 000
    a = SparsityReport([{"hook": "blocks.0.h", "layer": 0, "normalized_loss": 6.0, "n_steps": 2000, "converged": True},
                        {"hook": "blocks.1.h", "layer": 1, "normalized_loss": 4.0, "n_steps": 12000,
                         "converged": True}], {},
                       {"trace/blocks.0.h": trace[:20], "trace/blocks.1.h": trace,
                        "rule/blocks.1.h": [{"step": 3200, "event": "rate cut", "level": 4.5}]})
    b = SparsityReport([{"hook": "blocks.0.h", "layer": 0, "normalized_loss": 5.0, "n_steps": 11000, "converged": True},
                        {"hook": "blocks.1.h", "layer": 1, "normalized_loss": 4.1, "n_steps": 11000,
                         "converged": False}], {}, {"trace/blocks.0.h": trace, "trace/blocks.1.h": trace})
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    mod.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--steps", "800,1600,3200"])
    out = capsys.readouterr().out
    assert "3200: 4.500" in out and "(not in this report)" in out
    assert "both ≥ 10000 steps, run 1 / run 0 − 1: median +0.025, +0.025 to +0.025 (1)" in out
    assert "short / long − 1: median +0.200, +0.200 to +0.200 (1)" in out
    line = [ln for ln in out.splitlines() if ln.startswith("blocks.0.h (0)")][0]
    assert line.split()[2:4] == [f"{10 / 1.8:.3f}", f"{10 / 2.6:.3f}"] and " no " not in line  # 3200: blank
