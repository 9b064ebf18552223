"""How many model tokens the old and the new learner need to reach their long-run held-out normalized loss, and
whether the new convergence rule (``coder.converged_``, :mod:`tl_sparsity.coding.convergence`) says so in time.

    python benchmarks/convergence.py                                   # 6 sources × 2 learners to 2 M tokens (GPU)
    python benchmarks/convergence.py --device cuda
    python benchmarks/convergence.py --sources 'sparse-d64-*,gauss-d64' --max-tokens 200000   # medium, CPU
    python benchmarks/convergence.py --quick                           # d = 32, ≤ 30 k tokens, < 1 min on 2 CPUs

Learners (both seeded with ``--seed``):

* ``old``: ``OnlineSparseCoder(batch_size=4096, replay=0, warmup_tokens=1_048_576)`` — the learner before replay,
  λ warm-up by steps and the convergence rule (λ adapts during the first 2^20 training rows);
* ``new``: ``OnlineSparseCoder()`` — batch 1024, a buffer of max(8 192 rows, 16 MiB), 15 replay steps where it
  holds ≥ 32 batches (d = 64) else 7 (d = 256), ``warmup_steps=100``, up to three rate checks, none before 768 rows
  per atom (400 steps at d = 64, 1 536 at d = 256).
* ``r15-min400``: the defaults of 2026-12-07 before that — 15 replay steps at every width, the rule from step 400
  (at d = 64 the same as ``new``);
* ``prev``: the defaults before 2026-12-07 — ``replay=7`` from a buffer of 8 192 rows (``replay_size=8192``), the
  rule from step 400;
* ``new-lam0``: the same without the λ check at convergence (``lam_rounds=0``);
* ``new-rate0``: the same without the rate check (``rate_checks=0``: a flat trace at the first rate is converged);
* ``new-replay64``: the same with a replay buffer of 65 536 rows (the default at d = 64; 4× it at d = 256);
* ``adam-decay``: ``new`` with ``phi_optimizer="adam-decay"`` (Adam's rate ∝ 1/√t after λ first froze);
* ``bcd``: ``new`` with ``phi_optimizer="bcd"`` (Mairal's block-coordinate descent on the sufficient statistics).
* ``new-replay15``, ``new-bs512``, ``new-lr2x``, ``new-warm50``, ``new-r15-buf64``: ``new`` with 15 replay steps
  (now the default); learner batches of 512 rows; twice the rate; λ frozen after 50 steps; 15 replay steps from a
  buffer of 65 536 rows — the settings screened against the d = 64 target (``--sources sparse-d64-a16 --max-tokens
  100000``) when the default was ``prev``.

The Φ-step comparison (``--learners new,adam-decay,bcd``) also reads the late-trace jitter: the rule's ``spread``
(largest / smallest probe value in the last half of the steps − 1) at the last budget, and the first budget the
rule said converged.

Sources: ``SparseLinear(d, a, sigma=0.1)`` for d ∈ {64, 256}, a ∈ {8, 16} (``sparse-d{d}-a{a}``), and
``CovarianceMatchedGaussian`` with mean 0 and the covariance of 65 536 rows of ``SparseLinear(d, 8)``
(``gauss-d{d}``: same second moments as the sparse source, no sparse structure).

Each (source, learner) streams one seeded source (the same rows for both learners) in chunks of at most 4096 rows
and is evaluated only at the model-token budgets B (rows handed to ``partial_fit``, held-out rows included):
5k 10k 20k 50k 100k 200k 500k 1M 2M, cut at ``--max-tokens``. At each budget: the held-out normalized loss
(``evaluate()``, on the learner's reservoir of rows it never trained on) and its s.e.; the normalized loss on a
fixed fresh test set of 4096 rows of the same distribution drawn by an independent generator (a deep copy of the
source — same features, shift and scale — with its own ``torch.Generator``); dictionary steps; λ; the rule's
verdict and drift.

Summary per source: the long-run value (the held-out value at the largest budget run), "tokens to 5 %" (the
smallest budget from which every later held-out value is within 5 % of the long-run value; equal to the largest
budget means "not before the end"), the old/new ratio of those, the first budget at which each learner's rule said
converged, and how far the value at that budget was from the long-run value (the rule's promise: a few per cent).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import math
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding.synthetic import CovarianceMatchedGaussian, SparseLinear

BUDGETS = (5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000)
QUICK_BUDGETS = (5_000, 10_000, 20_000, 30_000)
CHUNK = 4096
N_FRESH = 4096
N_COV = 65_536
FRESH_SEED_OFFSET = 1_000_003  # the fresh test set's generator: seed + this (the stream's is seed)
TOL = 0.05
LEARNERS = {
    "old": dict(batch_size=4096, replay=0, warmup_tokens=1_048_576),
    "new": dict(),
    "prev": dict(replay=7, replay_size=8192, min_steps=400),  # the defaults before 2026-12-07
    "r15-min400": dict(replay=15, min_steps=400),  # the defaults of 2026-12-07, before the rule's 768 rows per atom
    "new-lam0": dict(lam_rounds=0),  # without the λ check at convergence
    "new-rate0": dict(rate_checks=0),  # without the rate check: a flat trace at the first rate is converged
    "new-replay64": dict(replay_size=65_536),  # a replay buffer of 65 536 rows
    "adam-decay": dict(phi_optimizer="adam-decay"),  # Adam's rate ∝ 1/√t once λ froze
    "bcd": dict(phi_optimizer="bcd"),  # Mairal's block-coordinate descent on A = Σαᵀα, B = Σαᵀx
    # more progress per model token, screened against the d = 64 target (docs/convergence.md)
    "new-replay15": dict(replay=15),  # twice the dictionary steps per token
    "new-bs512": dict(batch_size=512),  # learner batches of 512 rows: twice the steps per token
    "new-bs2048": dict(batch_size=2048),  # learner batches of 2 048 rows: half the steps per token
    "new-bs4096": dict(batch_size=4096),  # learner batches of 4 096 rows: a quarter of the steps per token
    "new-lr2x": dict(lr_scale=2.0),  # twice the default rate 0.05/√d
    "new-warm50": dict(warmup_steps=50),  # λ freezes after 50 steps instead of 100
    "new-r15-buf64": dict(replay=15, replay_size=65_536),  # twice the steps per token, from an 8× buffer
    "new-r15-buf8": dict(replay=15, replay_size=8192),  # twice the steps per token, from the earlier buffer
}


def source_specs(quick: bool) -> list[tuple[str, int, float | None]]:
    """``(name, d, a)``; ``a`` is None for the covariance-matched Gaussian."""
    if quick:
        return [("sparse-d32-a8", 32, 8.0), ("gauss-d32", 32, None)]
    return [(f"sparse-d{d}-a{a}", d, float(a)) for d in (64, 256) for a in (8, 16)] + \
           [(f"gauss-d{d}", d, None) for d in (64, 256)]


def make_source(d: int, a: float | None, seed: int):
    if a is not None:
        return SparseLinear(d, a, sigma=0.1, seed=seed)
    ref = SparseLinear(d, 8, sigma=0.1, seed=seed).sample(N_COV).double()
    return CovarianceMatchedGaussian(torch.zeros(d), torch.cov(ref.T), seed=seed)


def fresh_rows(src, n: int) -> torch.Tensor:
    """``n`` rows of ``src``'s distribution from an independent generator, leaving ``src``'s stream untouched."""
    twin = copy.deepcopy(src)
    twin._gen = torch.Generator().manual_seed(src.seed + FRESH_SEED_OFFSET)
    return twin.sample(n)


def _f(x: float) -> float:
    return float(x) if x is not None else float("nan")


def run_one(src_factory, learner: str, budgets: Sequence[int], seed: int, device: str,
            fresh: torch.Tensor) -> tuple[list[dict], float]:
    """Stream one source through one learner, evaluating at each budget; returns the per-budget records and the
    wall time."""
    src = src_factory()
    opts = dict(LEARNERS[learner])
    if "lr_scale" in opts:  # a multiple of the default rate 0.05/√d
        opts["lr"] = opts.pop("lr_scale") * 0.05 / src.d**0.5
    coder = OnlineSparseCoder(seed=seed, **opts)
    fresh = fresh.to(device)
    out, done, t0 = [], 0, time.perf_counter()
    for budget in budgets:
        while done < budget:
            k = min(CHUNK, budget - done)
            coder.partial_fit(src.sample(k).to(device))
            done += k
        rec = {"learner": learner, "budget": budget, "n_tokens": coder.n_tokens_, "n_steps": coder.n_steps_}
        if coder.initialized:
            ev, evf, conv = coder.evaluate(), coder.evaluate(fresh), coder.convergence_
            rec.update(heldout=_f(ev["normalized_loss"]), heldout_se=_f(ev["normalized_loss_se"]),
                       fresh=_f(evf["normalized_loss"]), fresh_se=_f(evf["normalized_loss_se"]),
                       lam=float(coder.lam_), converged=bool(conv["converged"]), drift=_f(conv["drift"]),
                       spread=_f(conv["spread"]),
                       reason=str(conv["reason"]), lam_frozen_at=conv["lam_frozen_at"])
        else:
            nan = float("nan")
            rec.update(heldout=nan, heldout_se=nan, fresh=nan, fresh_se=nan, lam=nan, converged=False, drift=nan,
                       spread=nan,
                       reason="no dictionary yet", lam_frozen_at=None)
        out.append(rec)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def tokens_to_tol(budgets: Sequence[int], values: Sequence[float], tol: float = TOL) -> int | None:
    """The smallest budget from which every later value is within ``tol`` (relative) of the last one."""
    if not values or not math.isfinite(values[-1]) or values[-1] == 0:
        return None
    last, first = values[-1], None
    for b, v in zip(budgets, values):
        ok = math.isfinite(v) and abs(v / last - 1) <= tol
        if ok and first is None:
            first = b
        elif not ok:
            first = None
    return first


def summarize(name: str, recs: dict[str, list[dict]]) -> dict:
    row: dict = {"source": name}
    for lr, rs in recs.items():
        budgets = [r["budget"] for r in rs]
        vals = [r["heldout"] for r in rs]
        row[f"{lr}_longrun"] = vals[-1]
        row[f"{lr}_longrun_fresh"] = rs[-1]["fresh"]
        row[f"{lr}_tok5"] = tokens_to_tol(budgets, vals)
        first = next((r for r in rs if r["converged"]), None)
        row[f"{lr}_tok_verdict"] = None if first is None else first["budget"]
        row[f"{lr}_verdict_err"] = (float("nan") if first is None or not math.isfinite(vals[-1])
                                    else first["heldout"] / vals[-1] - 1)
        row[f"{lr}_converged_end"] = rs[-1]["converged"]
        row[f"{lr}_spread"] = rs[-1]["spread"]
    o, n = row.get("old_tok5"), row.get("new_tok5")
    row["ratio"] = o / n if o and n else float("nan")
    return row


def _tok(b: int | None) -> str:
    if b is None:
        return "—"
    return f"{b // 1_000_000}M" if b >= 1_000_000 and b % 1_000_000 == 0 else (
        f"{b / 1e6:g}M" if b >= 1_000_000 else f"{b // 1000}k" if b % 1000 == 0 else str(b))


def _num(x: float, fmt: str = ".3f") -> str:
    return "nan" if x is None or not math.isfinite(x) else format(x, fmt)


def print_source_table(name: str, recs: dict[str, list[dict]], times: dict[str, float]) -> None:
    print(f"\n## {name}   (wall: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) + ")")
    cols = ("L_ho ± se", "L_fresh", "steps", "λ", "conv", "drift")
    head = f"{'B':>6} | " + " | ".join(" ".join(f"{lr}:{c:>{w}}" if i == 0 else f"{c:>{w}}"
                                                for i, (c, w) in enumerate(zip(cols, (13, 7, 6, 7, 4, 7))))
                                       for lr in recs)
    print(head)
    print("-" * len(head))
    for i, b in enumerate(recs[next(iter(recs))]):
        parts = []
        for lr, rs in recs.items():
            r = rs[i]
            parts.append(f"{'':>{len(lr) + 1}}{_num(r['heldout']):>6} ± {_num(r['heldout_se'], '.3f'):<5}"
                         f" {_num(r['fresh']):>7} {r['n_steps']:>6} {_num(r['lam'], '.4f'):>7}"
                         f" {'yes' if r['converged'] else 'no':>4} {_num(r['drift'], '+.3f'):>7}")
        print(f"{_tok(b['budget']):>6} | " + " | ".join(parts))


def print_summary(rows: list[dict], max_budget: int) -> None:
    print(f"\n## summary (long run = held-out L_norm at {_tok(max_budget)}; tok5 = first budget from which every "
          f"later held-out value is within {TOL:.0%} of it; verdict = first budget the rule said converged, "
          "err = held-out value there / long run − 1)")
    head = (f"{'source':<16} | {'old L∞':>7} {'new L∞':>7} | {'old fresh':>9} {'new fresh':>9} | "
            f"{'old tok5':>8} {'new tok5':>8} {'old/new':>7} | {'new verdict':>11} {'err':>7} | "
            f"{'old verdict':>11} {'err':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        g = r.get
        print(f"{r['source']:<16} | {_num(g('old_longrun')):>7} {_num(g('new_longrun')):>7} | "
              f"{_num(g('old_longrun_fresh')):>9} {_num(g('new_longrun_fresh')):>9} | "
              f"{_tok(g('old_tok5')):>8} {_tok(g('new_tok5')):>8} {_num(g('ratio'), '.2f'):>7} | "
              f"{_tok(g('new_tok_verdict')):>11} {_num(g('new_verdict_err'), '+.3f'):>7} | "
              f"{_tok(g('old_tok_verdict')):>11} {_num(g('old_verdict_err'), '+.3f'):>7}")


def print_long_runs(rows: list[dict], learners: Sequence[str], max_budget: int) -> None:
    """Every learner's long-run value and first converged budget, side by side (the summary above shows old/new),
    then per learner: tokens to 5 %, the verdict's budget and error, and the late-trace spread at the end."""
    print(f"\n## every learner at {_tok(max_budget)} (held-out L_norm; first budget the rule said converged)")
    print(f"{'source':<16} | " + " | ".join(f"{lr:>20}" for lr in learners))
    for r in rows:
        print(f"{r['source']:<16} | " + " | ".join(
            f"{_num(r.get(f'{lr}_longrun')):>8} ({_tok(r.get(f'{lr}_tok_verdict')):>4}){'':>5}" for lr in learners))
    print(f"\n## per learner (L∞ = held-out L_norm at {_tok(max_budget)}; tok5 as above; verdict, err as above; "
          "spread = largest / smallest probe value in the last half of the steps − 1, at the end)")
    print(f"{'source':<16} {'learner':<13} | {'L∞':>7} {'fresh':>7} | {'tok5':>5} | {'verdict':>7} {'err':>7} | "
          f"{'spread':>7}")
    for r in rows:
        for lr in learners:
            g = r.get
            print(f"{r['source']:<16} {lr:<13} | {_num(g(f'{lr}_longrun')):>7} {_num(g(f'{lr}_longrun_fresh')):>7} | "
                  f"{_tok(g(f'{lr}_tok5')):>5} | {_tok(g(f'{lr}_tok_verdict')):>7} "
                  f"{_num(g(f'{lr}_verdict_err'), '+.3f'):>7} | {_num(g(f'{lr}_spread'), '.3f'):>7}")


def _revision() -> str:
    """The checkout's commit, and whether tl_sparsity/ differs from it (the numbers depend on the package's code)."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tl_sparsity"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + (" (tl_sparsity/ modified)" if dirty else "")


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark and print it. Returns ``{"header": [lines], "rows": [per-budget records, each with
    "source"], "summary": [per-source rows]}`` — what was printed, as data."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d = 32 sources, budgets to 30k (a test, < 1 min on CPU)")
    p.add_argument("--max-tokens", type=int, default=2_000_000, help="largest budget (default 2M)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--sources", default="*", help="comma-separated names or globs, e.g. 'sparse-d64-*,gauss-d64'")
    p.add_argument("--learners", default="old,new", help="comma-separated subset of " + ",".join(LEARNERS))
    p.add_argument("--seed", type=int, default=0, help="source and learner seed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 on cpu (OpenMP spin-waits on 2 shared cores cost ~10x), "
                        "torch's own on cuda")
    args = p.parse_args(argv)
    if args.threads or torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads or 1)
    budgets = [b for b in (QUICK_BUDGETS if args.quick else BUDGETS) if b <= args.max_tokens]
    if not budgets:
        p.error(f"--max-tokens {args.max_tokens} is below the smallest budget.")
    learners = [s.strip() for s in args.learners.split(",") if s.strip()]
    if not learners or any(lr not in LEARNERS for lr in learners):
        p.error(f"--learners must be a subset of {','.join(LEARNERS)}.")
    pats = [s.strip() for s in args.sources.split(",") if s.strip()]
    specs = [s for s in source_specs(args.quick) if any(fnmatch.fnmatch(s[0], pt) for pt in pats)]
    if not specs:
        p.error(f"--sources {args.sources!r} matches none of {[s[0] for s in source_specs(args.quick)]}.")
    dev = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    header = [
        "command: " + " ".join(sys.argv if argv is None else ["benchmarks/convergence.py", *argv]),
        f"device: {dev_name}",
        f"torch: {torch.__version__}",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"revision: {_revision()}",
        "learners: " + "; ".join(f"{k} = OnlineSparseCoder({', '.join(f'{a}={v}' for a, v in LEARNERS[k].items())})"
                                  for k in learners),
        "rule (defaults): " + ", ".join(f"{k}={v}" for k, v in OnlineSparseCoder().get_params().items()
                                        if k in ("tol", "min_steps", "warmup_steps", "probe_size", "replay")),
        f"budgets: {' '.join(_tok(b) for b in budgets)}; seed {args.seed}; fresh set {N_FRESH} rows",
    ]
    for line in header:
        print(line)
    all_rows, summary = [], []
    for name, d, a in specs:
        src0 = make_source(d, a, args.seed)
        fresh = fresh_rows(src0, N_FRESH)
        recs, times = {}, {}
        for lr in learners:
            recs[lr], times[lr] = run_one(lambda: copy.deepcopy(src0), lr, budgets, args.seed, args.device, fresh)
            for r in recs[lr]:
                all_rows.append({"source": name, **r})
        print_source_table(name, recs, times)
        summary.append({**summarize(name, recs), "wall_s": times})
        sys.stdout.flush()
    print_summary(summary, budgets[-1])
    if set(learners) - {"old", "new"}:
        print_long_runs(summary, learners, budgets[-1])
    return {"header": header, "rows": all_rows, "summary": summary}


if __name__ == "__main__":
    main()
