"""Exact-reference check of the streamed neuron statistics (:class:`tl_sparsity.stats.neurons.NeuronStats`) on SmolLM2-135M.

Streams real text (pydoc) through the built-in SmolLM2-135M and feeds each chosen layer's ``blocks.L.mlp.hook_pre``
(the SwiGLU gate, the site ``examples/neuron_profile.py`` uses; "active" = gate > threshold) to ``NeuronStats`` exactly
as the collector does (raw ``[batch, pos, d]`` activation, token ids, keep-mask with BOS dropped). It also keeps every
kept position's "active" bits and token ids in memory and computes Voita et al.'s definitions directly, with the
thresholds read from the ``NeuronStats`` object (coverage, mass, max_token_items, max_trigram_items, threshold):

* token t covers a neuron if the neuron fires on ≥ coverage of t's occurrences; the neuron is a token detector if the
  fewest covering tokens holding ≥ mass of its activations number 1..max_token_items;
* trigram detector: the same with (t-2, t-1, t) trigrams of the row (BOS counts as context; a missing token before
  the row start is its own token), 1..max_trigram_items, and not a token detector;
* dead: never active.

Per layer it prints exact and streamed counts, INVENTED labels (streamed token/trigram detector where the exact
definition says not, or streamed trigram where exact says token — the documented guarantee says 0), MISSES (exact
detector not labelled so by the stream, 'undetermined' included) and whether the bounds hold:
``n_covering_tokens`` ≥ exact and ``n_covering_tokens_min`` ≤ exact where ``token_verdict != "exact"`` (equality
where it is "exact"), ``n_covering_trigrams`` ≥ exact.

    python benchmarks/neurons_exact.py                      # layers 0,10,20,29; 10 k tokens
    python benchmarks/neurons_exact.py --loose              # coverage = mass = 0.5, up to 50 tokens
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from tl_sparsity.tl.models import load_model
from tl_sparsity.stats.neurons import NeuronStats, _trigram_keys
from tl_sparsity.text import load_texts, token_windows


def fewest_covering(active: torch.Tensor, keys: torch.Tensor, coverage: float, mass: float) -> np.ndarray:
    """Exact fewest covering items per neuron (inf where the covering items never reach ``mass``; 0 for silent
    neurons). ``active`` [N, n] bool over kept positions, ``keys`` [N] item ids."""
    uniq, inv = torch.unique(keys, return_inverse=True)
    n = active.shape[1]
    occ = torch.bincount(inv, minlength=uniq.numel()).double()  # [u]
    counts = torch.zeros(n, uniq.numel(), dtype=torch.float64).index_add_(1, inv, active.T.double())  # [n, u]
    fire = active.sum(0).double()
    covered = (counts > 0) & (counts >= coverage * occ[None] - 1e-9)
    score = torch.where(covered, counts, 0.0).sort(dim=1, descending=True).values
    csum, need = score.cumsum(1), mass * fire
    found = (fire > 0) & (csum[:, -1] >= need - 1e-9)
    k = ((csum < need[:, None] - 1e-9).sum(1) + 1).double()
    k = torch.where(found, k, torch.where(fire > 0, math.inf, 0.0))
    return k.numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--text", default="pydoc")
    ap.add_argument("--loose", action="store_true", help="coverage = mass = 0.5, max_token_items = 50")
    ap.add_argument("--token-slots", type=int, default=None)
    ap.add_argument("--trigram-slots", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    opts: dict = {}
    if args.loose:
        opts.update(coverage=0.5, mass=0.5, max_token_items=50)
    if args.token_slots is not None:
        opts["token_slots"] = args.token_slots
    if args.trigram_slots is not None:
        opts["trigram_slots"] = args.trigram_slots

    print("command: python " + " ".join(["benchmarks/neurons_exact.py", *(sys.argv[1:] if argv is None else argv)]))
    print(f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}), torch {torch.__version__}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")

    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    batches = list(token_windows(tok, load_texts(args.text), ctx_len=args.ctx_len, batch_size=args.batch_size,
                                 max_tokens=args.tokens, seed=0))
    names = {f"blocks.{layer}.mlp.hook_pre": layer for layer in layers}
    stats: dict[str, NeuronStats] = {}
    kept_active: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    kept_tok, kept_tri = [], []
    cur: dict = {}
    stream_s = 0.0

    def make_hook(name: str):
        def hook(act: torch.Tensor, hook=None) -> None:
            nonlocal stream_s
            if name not in stats:  # as SideStats._new_neurons: NeuronStats(width, device=..., **neuron_options)
                stats[name] = NeuronStats(act.shape[-1], **{"device": act.device, **opts})
            s = stats[name]
            t = time.perf_counter()
            s.update(act.detach(), cur["tokens"], cur["keep"])
            stream_s += time.perf_counter() - t
            a = act.detach()
            active = (a.abs() if s.absolute else a) > s.threshold
            kept_active[name].append(active[cur["keep"]].cpu())  # [n_kept, d] bool
        return hook

    with torch.no_grad():
        for tokens in batches:
            keep = torch.ones_like(tokens, dtype=torch.bool)
            keep[:, 0] = False  # the collector's skip_bos: every window starts with BOS, no padding
            cur.update(tokens=tokens, keep=keep)
            kept_tok.append(tokens[keep])
            kept_tri.append(_trigram_keys(tokens)[keep])
            model.run_with_hooks(tokens, fwd_hooks=[(n, make_hook(n)) for n in names], return_type=None)
    toks, tris = torch.cat(kept_tok), torch.cat(kept_tri)
    s0 = next(iter(stats.values()))
    cfg = s0.config()
    print(f"model: SmolLM2-135M, text {args.text}: {toks.numel()} kept tokens ({len(batches)} batches, ctx_len "
          f"{args.ctx_len}, BOS dropped), {toks.unique().numel()} distinct tokens, {tris.unique().numel()} distinct "
          f"trigrams; forward+stream {time.perf_counter() - t0:.0f} s (NeuronStats.update {stream_s:.1f} s)")
    print("NeuronStats settings: " + ", ".join(f"{k}={cfg[k]}" for k in (
        "threshold", "absolute", "coverage", "mass", "max_token_items", "max_trigram_items", "token_slots",
        "trigram_slots", "sketch_width", "sketch_depth")))
    print()
    print("| layer | neurons | exact token / trigram / dead | streamed token / trigram / dead / undetermined | "
          "invented | missed token / trigram (of which undetermined) | verdict exact / bounded / uncertain | "
          "n_cov_tok ≥ exact | n_cov_tok_min ≤ exact | n_cov_tri ≥ exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    total_inv = 0
    for name, layer in names.items():
        s = stats[name]
        df = s.result()
        active = torch.cat(kept_active[name])
        assert active.shape[0] == s.n_tokens == toks.numel()
        fire = active.sum(0).numpy()
        assert (fire == df["n_active"].to_numpy()).all(), "firing counts differ"
        m_tok, m_tri = s.max_token_items, s.max_trigram_items
        k_tok = fewest_covering(active, toks, s.coverage, s.mass)
        ex_tok = (fire > 0) & (k_tok <= m_tok)
        ex_dead = fire == 0
        has_tri = bool(s.trigram_slots)
        if has_tri:
            k_tri = fewest_covering(active, tris, s.coverage, s.mass)
            ex_tri = (fire > 0) & (k_tri <= m_tri) & ~ex_tok
        else:
            ex_tri = np.zeros_like(ex_tok)
        st_tok, st_tri = df["token_detector"].to_numpy(bool), df["trigram_detector"].to_numpy(bool)
        st_dead, verdict = df["dead"].to_numpy(bool), df["token_verdict"].to_numpy()
        if has_tri:
            nct = df["n_covering_trigrams"].to_numpy()
            st_und = (nct >= 1) & (nct <= m_tri) & (verdict == "uncertain")
        else:
            st_und = np.zeros_like(st_tok)
        invented = (st_tok & ~ex_tok) | (st_tri & ~ex_tri) | (st_dead & ~ex_dead)
        total_inv += int(invented.sum())
        miss_tok, miss_tri = ex_tok & ~st_tok, ex_tri & ~st_tri
        miss_und = (miss_tok | miss_tri) & st_und
        # bounds: stream k (0 = no covering set found, i.e. +inf) ≥ exact; k_min (m+1 = more than m) ≤ exact
        ks = df["n_covering_tokens"].to_numpy().astype(float)
        ks = np.where((ks == 0) & (fire > 0), np.inf, ks)
        kmin = df["n_covering_tokens_min"].to_numpy().astype(float)
        inexact, exv = verdict != "exact", verdict == "exact"
        up_ok = bool((ks[inexact] >= k_tok[inexact]).all()) and bool((ks[exv] == k_tok[exv]).all())
        lo_ok = bool((kmin[inexact] <= np.minimum(k_tok[inexact], m_tok + 1)).all()) and \
            bool((kmin[exv] == np.minimum(k_tok[exv], m_tok + 1)).all())
        if has_tri:
            kt = nct.astype(float)
            kt = np.where((kt == 0) & (fire > 0), np.inf, kt)
            tri_ok = "yes" if (kt >= k_tri).all() else f"NO ({int((kt < k_tri).sum())})"
        else:
            tri_ok = "-"
        vc = {v: int((verdict == v).sum()) for v in ("exact", "bounded", "uncertain")}
        print(f"| {layer} | {s.n_neurons} | {int(ex_tok.sum())} / {int(ex_tri.sum())} / {int(ex_dead.sum())} | "
              f"{int(st_tok.sum())} / {int(st_tri.sum())} / {int(st_dead.sum())} / {int(st_und.sum())} | "
              f"{int(invented.sum())} | {int(miss_tok.sum())} / {int(miss_tri.sum())} ({int(miss_und.sum())}) | "
              f"{vc['exact']} / {vc['bounded']} / {vc['uncertain']} | "
              f"{'yes' if up_ok else 'NO'} | {'yes' if lo_ok else 'NO'} | {tri_ok} |")
    print()
    print(f"invented labels in total: {total_inv}; total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
