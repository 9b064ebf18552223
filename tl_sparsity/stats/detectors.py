"""Token and trigram detector verdicts from the bounds of heavy-hitter counts, and the trigram keys they count.

A neuron's (item, count) summaries (:class:`~tl_sparsity.stats.heavy_hitters.HeavyHitters`) bound every count:
``cnt − err ≤ true ≤ cnt`` for tracked items, ``true ≤ floor`` for the rest. Token occurrences are exact; trigram
occurrences come from a count-min sketch (over-counts only). Verdicts use the lower bounds, so a detector can be
missed, never invented; ``n_covering_*`` is then an upper bound of the exact count (exact when the counts are). "Not a
token detector" is certified with the upper bounds (tracked cnt; ≤ ``floor`` for an untracked token, which can only
cover if it occurs ≤ floor/coverage times): ``token_verdict`` is "exact" (floor = 0), "bounded" (inexact, verdict
certified) or "uncertain"; ``n_covering_tokens_min`` is a lower bound (``max_token_items`` + 1: more than allowed). A
trigram detector of uncertain token verdict is not claimed (the caller labels it "undetermined"). ``exact`` marks
neurons whose heavy-hitter counts are exact.

A trigram is the token and the two before it in its row, keyed ``(t[-2]+1) << 42 | (t[-1]+1) << 21 | t`` (0: no
token, before the row start), so token ids must be below 2^21 − 1.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .heavy_hitters import HeavyHitters

_BITS = 21  # bits per token of a trigram key


def covering_columns(hh: dict[str, HeavyHitters], token_occ: Tensor, tri_occ: Tensor | None, fire: Tensor,
                     coverage: float, mass: float, max_token_items: int, max_trigram_items: int) -> tuple[dict, Any]:
    """The token (and, given ``tri_occ``, trigram) columns of :meth:`NeuronStats.result`, in column order, and the
    rows whose trigram verdict stands on an uncertain token verdict (``False`` without trigrams).

    ``hh``: the ``"tok"`` (and ``"tri"``) summaries; ``token_occ``: every token's occurrences; ``tri_occ``: the
    sketched occurrences of the tracked trigrams [n, K]; ``fire``: each neuron's number of activations."""
    tok_hh = hh["tok"]
    tok = _detect(tok_hh, token_occ[tok_hh.ids.clamp(min=0)], fire, coverage, mass, max_token_items)
    cols: dict[str, Any] = {"token_detector": tok["det"], "n_covering_tokens": tok["k"],
                            "covering_tokens": tok["items"], "covering_token_share": tok["share"]}
    exact, m = tok_hh.floor == 0, max_token_items
    k_min = _fewest_possible(tok_hh, token_occ, fire, coverage, mass, m)
    certain = torch.from_numpy(tok["det"]) | (k_min > m) | (fire == 0)  # token verdict certified by bounds
    cols["n_covering_tokens_min"] = k_min.numpy()
    cols["token_verdict"] = pd.Series(["uncertain", "bounded", "exact"]).iloc[
        (certain.long() + (exact & certain).long()).numpy()].to_numpy()
    und: Any = False
    if tri_occ is not None:
        tri_hh = hh["tri"]
        tri = _detect(tri_hh, tri_occ, fire, coverage, mass, max_trigram_items)
        cols["trigram_detector"] = tri["det"] & certain.numpy() & ~tok["det"]  # only where no token may cover it
        und = tri["det"] & ~certain.numpy()
        cols["n_covering_trigrams"] = tri["k"]
        cols["covering_trigrams"] = [[_decode(x) for x in r] for r in tri["items"]]
        cols["covering_trigram_share"] = tri["share"]
        exact &= tri_hh.floor == 0
    cols["exact"] = exact.numpy()
    return cols, und


def _trigram_keys(tokens: Tensor) -> Tensor:
    prev = torch.nn.functional.pad(tokens + 1, (1, 0))[:, :-1]  # 0 = no token (row start)
    prev2 = torch.nn.functional.pad(tokens + 1, (2, 0))[:, :-2]
    return (prev2 << 2 * _BITS) | (prev << _BITS) | tokens


def _decode(key: int) -> tuple:
    m = (1 << _BITS) - 1
    a, b = key >> 2 * _BITS, (key >> _BITS) & m
    return (a - 1 if a else None, b - 1 if b else None, key & m)


def _fewest_possible(hh: HeavyHitters, occ: Tensor, fire: Tensor, coverage: float, mass: float, m: int) -> Tensor:
    """Lower bound on the fewest covering items holding ≥ mass of each row's activations (m + 1: more than m, or
    none), from upper bounds: min(cnt, occ) of tracked items, min(floor, occ) of the m most frequent items that could
    be covered at ≤ floor (every item counted there: bounds only loosen). ``occ``: every item's occurrences."""
    tocc = occ[hh.ids.clamp(min=0)].double()
    hi = torch.minimum(hh.cnt.double(), tocc)
    hi = torch.where((hh.ids >= 0) & (hi > 0) & (hi >= coverage * tocc - 1e-9), hi, 0.0)
    srt, f = occ.double().sort().values, hh.floor.double()
    top = torch.searchsorted(srt, f / coverage + 1e-9, right=True)[:, None] - torch.arange(1, m + 1)
    un = torch.where((top >= 0) & (f[:, None] > 0), srt[top.clamp(min=0)].minimum(f[:, None]), 0.0)
    csum = torch.cat([hi, un], 1).sort(dim=1, descending=True).values[:, :m].cumsum(1)
    k = (csum < mass * fire.double()[:, None] - 1e-9).sum(1) + 1  # m + 1 when the m largest cannot reach
    return torch.where(fire > 0, k, 0)


def _detect(hh: HeavyHitters, occ: Tensor, fire: Tensor, coverage: float, mass: float, max_items: int) -> dict:
    """Fewest covering items (lower-bound counts ≥ coverage·occurrences) holding ≥ mass of each row's activations."""
    ids, by_id = hh.ids.sort(dim=1)  # ties below are broken by item id: results do not depend on slot order
    lo, occ = (hh.cnt - hh.err).gather(1, by_id).double(), occ.gather(1, by_id).double()
    covered = (ids >= 0) & (lo > 0) & (lo >= coverage * occ - 1e-9)
    score, order = torch.where(covered, lo, 0.0).sort(dim=1, descending=True, stable=True)
    csum, need = score.cumsum(1), mass * fire.double()
    found = (fire > 0) & (csum[:, -1] >= need - 1e-9)
    k = torch.where(found, (csum < need[:, None] - 1e-9).sum(1) + 1, 0)
    share = csum.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0] / fire.double().clamp(min=1)
    ids = ids.gather(1, order)
    return {"det": (found & (k <= max_items)).numpy(), "k": k.numpy(), "share": torch.where(found, share, 0.0).numpy(),
            "items": [ids[i, : k[i]].tolist() for i in range(ids.shape[0])]}
