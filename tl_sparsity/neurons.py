"""Streaming neuron statistics of one hook: dead neurons, firing rates, token/trigram detectors, positional neurons.

Definitions (Voita, Ferrando, Nalmpantis 2023, arXiv 2309.04827), over the counted positions (``mask``; the collector
drops BOS and padding through it; a position is the column index in the row):

* **active**: ``value > threshold`` (``|value| > threshold`` with ``absolute=True``). Default 0: Voita's "non-zero" for
  ReLU; GELU and SiLU are positive exactly where their input is, so 0 means "pre-activation > 0", the region in which a
  ReLU would fire (a positive threshold would make the verdict depend on the activation scale). Gated MLPs (SwiGLU):
  ``hook_post = silu(gate)·up`` takes the sign of ``up``, so feed ``mlp.hook_pre`` (the gate) with threshold 0, or use
  ``absolute=True`` with a small threshold.
* **dead**: never active over the ``n_tokens`` seen. The verdict rests on that count: a neuron of firing rate p stays
  silent over n tokens with probability (1−p)^n, so "dead" means p < 3/n at 95 % confidence (``dead_rate_bound``).
* **token detector**: token t *covers* a neuron if it fires on ≥ ``coverage`` (95 %) of t's occurrences; the neuron is
  a detector if the fewest covering tokens that together hold ≥ ``mass`` (95 %) of its activations number 1–5 (our
  reading of "covered by 1–5 tokens": rare tokens covered by chance do not count against it).
* **trigram detector**: the same with trigrams (the token and the two before it in its row; a missing token at the
  start of a row is a token of its own), 1–50 of them; only for neurons that are not token detectors (a token detector
  of a rare token is trivially one).
* **positional**: mutual information, in **nats**, between "active" and position > 0.05. Voita et al. average over
  full-length sequences (uniform positions) and, in the text we could reach, name no log base; we take the natural log
  and the empirical distribution of counted positions (equal to theirs for full-length rows). The plug-in estimate is
  biased upward by about (P−1)/(2N) nats for P positions and N tokens. ``kind`` is the first of dead, token, trigram,
  positional that holds, else "other"; the boolean columns give all of them.

Memory is bounded, independent of the number of tokens: for n neurons, P ≤ ``max_positions`` positions, vocabulary V,
K slots: 8·(P·n + P + n + V) bytes of exact counts, 8·n·(3·K_tok + 3·K_tri + 2) of heavy hitters and 4·depth·width of
trigram sketch (int32: ≤ 2^31 tokens). d_mlp = 1536, P = 1024, V = 49 152, K = 64/128, sketch 4 × 2^20: 13.0 + 7.1 +
16.8 ≈ 37 MB (6.3 MB of positions at P = 512 without tokens). An update also holds ~4·n·(N + u) bytes of temporaries
for N positions with u distinct items in the batch.

Heavy hitters instead of exact (token, neuron) counts (V·n of them, 75 M at 49 152 × 1536): each neuron keeps K
(item, cnt, err) slots — a space-saving summary fed per batch. Tracked items get their exact batch counts; the batch's
K heaviest untracked items enter with cnt = batch count + ``floor`` and err = ``floor``; the K largest cnt stay.
``floor`` (per neuron) bounds the count of every untracked item (it grows by the (K+1)-th largest untracked batch count
and to the cnt of evicted items), so ``cnt − err ≤ true ≤ cnt`` always. Everything is exact while a neuron fires on
≤ K distinct items (``floor`` = 0); with 1 M Zipf tokens and random neurons (the worst case), floor/activations had
median 0.3 % (tokens) and 0.15 % (trigrams). Trigram occurrences come from a count-min sketch (over-counts only).
Verdicts use the lower bounds, so a detector can be missed, never invented; ``n_covering_*`` is then an upper bound of
the exact count (exact when the counts are). "Not a token detector" is certified with the upper bounds (tracked cnt;
≤ ``floor`` for an untracked token, which can only cover if it occurs ≤ floor/coverage times): ``token_verdict`` is
"exact" (floor = 0), "bounded" (inexact, verdict certified) or "uncertain"; ``n_covering_tokens_min`` is a lower bound
(``max_token_items`` + 1: more than allowed). A trigram detector of uncertain token verdict is not claimed:
``kind = "undetermined"``. ``exact`` marks neurons whose heavy-hitter counts are exact.
"""

from __future__ import annotations

import logging
import math

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["HeavyHitters", "NeuronStats"]
log = logging.getLogger(__name__)
_BITS, _P31 = 21, 2**31 - 1  # trigram key = (t[-2]+1) << 42 | (t[-1]+1) << 21 | t; sketch hash modulus
_CONFIG = ("n_neurons", "threshold", "absolute", "max_positions", "vocab_size", "token_slots", "trigram_slots",
           "sketch_width", "sketch_depth", "coverage", "mass", "max_token_items", "max_trigram_items", "mi_threshold")
_HH = ("ids", "cnt", "err", "floor")


class HeavyHitters:
    """Per-row (neuron) space-saving summaries of weighted item counts: ``ids``/``cnt``/``err`` [n, k], ``floor`` [n].

    Invariants: ``cnt − err ≤ true count ≤ cnt`` for tracked items; true count ≤ ``floor`` for untracked ones.
    """

    def __init__(self, n: int, k: int, device: str | torch.device = "cpu"):
        self.n, self.k = n, k
        self.ids = torch.full((n, k), -1, dtype=torch.long, device=device)
        self.cnt, self.err = torch.zeros_like(self.ids), torch.zeros_like(self.ids)
        self.floor = torch.zeros(n, dtype=torch.long, device=device)

    def update(self, keys: Int[Tensor, " N"], hits: Float[Tensor, "n N"]) -> None:
        """Add ``hits[i, j]`` (0/1) to the count of item ``keys[j]`` in row i."""
        uniq, inv = torch.unique(keys, return_inverse=True)
        u = uniq.numel()
        counts = torch.zeros(self.n, u + 1, dtype=hits.dtype, device=hits.device).index_add_(1, inv, hits)
        pos = torch.searchsorted(uniq, self.ids).clamp_(max=max(u - 1, 0))
        present = (self.ids >= 0) & (uniq[pos] == self.ids) if u else torch.zeros_like(self.ids, dtype=torch.bool)
        col = torch.where(present, pos, u)  # column u is an all-zero dummy
        self.cnt += counts.gather(1, col).long()  # tracked items: exact batch counts
        counts.scatter_(1, col, 0.0)
        vals, idx, spill = _top(counts, self.k, wide=True)  # the batch's heaviest untracked items enter
        new = vals > 0
        fl = self.floor[:, None].expand_as(idx)
        new_ids = torch.where(new, torch.cat([uniq, uniq.new_full((1,), -1)])[idx], -1)
        new_cnt, new_err = torch.where(new, vals.long() + fl, -1), torch.where(new, fl, 0)
        self._select(torch.cat([self.ids, new_ids], 1), torch.cat([self.cnt, new_cnt], 1),
                     torch.cat([self.err, new_err], 1), self.floor + spill.long().clamp(min=0))

    def state(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}_{k}": getattr(self, k) for k in _HH}

    @classmethod
    def from_state(cls, sd: dict, prefix: str, device: str | torch.device = "cpu") -> HeavyHitters:
        ids = sd[f"{prefix}_ids"]
        out = cls(*ids.shape, device)
        for k in _HH:
            setattr(out, k, sd[f"{prefix}_{k}"].to(device, copy=True))
        return out

    def merge(self, other: HeavyHitters) -> HeavyHitters:
        """The summary of both streams (items in one summary only get the other's ``floor`` added to cnt and err)."""
        out = HeavyHitters(self.n, self.k, self.ids.device)
        fa, fb = self.floor[:, None], other.floor[:, None]
        ids = torch.cat([self.ids, other.ids], 1)
        ids, order = ids.sort(dim=1)
        cnt = torch.cat([self.cnt + fb, other.cnt + fa], 1).gather(1, order)
        err = torch.cat([self.err + fb, other.err + fa], 1).gather(1, order)
        dup = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)  # the same item in both (ids unique within one)
        zero = torch.zeros_like(fa)
        cnt = cnt + torch.cat([torch.where(dup, cnt[:, 1:] - fa - fb, 0), zero], 1)
        err = err + torch.cat([torch.where(dup, err[:, 1:] - fa - fb, 0), zero], 1)
        ids = torch.cat([ids[:, :1], torch.where(dup, -1, ids[:, 1:])], 1)
        out._select(ids, cnt, err, self.floor + other.floor)
        return out

    def _select(self, ids: Tensor, cnt: Tensor, err: Tensor, floor: Tensor) -> None:
        vals, keep, evicted = _top(torch.where(ids >= 0, cnt, -1), self.k)
        ok = vals >= 0
        self.ids = torch.where(ok, ids.gather(1, keep), -1)
        self.cnt = torch.where(ok, cnt.gather(1, keep), 0)
        self.err = torch.where(ok, err.gather(1, keep), 0)
        self.floor = torch.maximum(floor, evicted.clamp(min=0))  # evicted items' counts


def _top(x: Tensor, k: int, wide: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``x`` [n, w]: the k largest values and their columns [n, min(k, w)] (any order) and the (k+1)-th
    largest value [n] (-1 when w ≤ k). ``wide`` picks the selection measured faster on long rows."""
    n, w = x.shape
    if w <= k:
        return x, torch.arange(w, device=x.device).expand(n, w), x.new_full((n,), -1)
    if wide:
        vals, idx = x.topk(k + 1, dim=1)
        return vals[:, :k], idx[:, :k], vals[:, k]
    vals, idx = x.topk(k + 1, dim=1, sorted=False)  # short rows: unsorted, then move the smallest to the end
    drop = vals.argmin(1, keepdim=True)
    spill = vals.gather(1, drop)[:, 0]
    return vals.scatter(1, drop, vals[:, k:])[:, :k], idx.scatter(1, drop, idx[:, k:])[:, :k], spill


class NeuronStats:
    """Mergeable streaming statistics of the n neurons of one hook (see the module docstring for every definition).

    ``max_positions`` caps the position counts (later positions are pooled into the last one); ``vocab_size``
    preallocates the token counts (else they grow); ``token_slots``/``trigram_slots`` are K of the heavy hitters
    (``trigram_slots=0`` skips trigrams: half the cost); ``sketch_width``/``sketch_depth`` shape the
    trigram-occurrence count-min sketch; ``device`` holds the state (``"cuda"`` keeps the work on the GPU;
    ``state_dict`` is always on the CPU). Measured at d_mlp = 1536, 4096-token batches: ~22 k tokens/s on one CPU thread
    with token and trigram detectors, 39 k without trigrams, 135 k without tokens; 0.7 M / 4 M on an H100.
    """

    def __init__(self, n_neurons: int, *, threshold: float = 0.0, absolute: bool = False, max_positions: int = 2048,
                 vocab_size: int | None = None, token_slots: int = 64, trigram_slots: int = 128,
                 sketch_width: int = 2**20, sketch_depth: int = 4, coverage: float = 0.95, mass: float = 0.95,
                 max_token_items: int = 5, max_trigram_items: int = 50, mi_threshold: float = 0.05,
                 device: str | torch.device = "cpu"):
        if min(n_neurons, max_positions, token_slots, sketch_width, sketch_depth) < 1 or trigram_slots < 0:
            raise ValueError("n_neurons, max_positions, token_slots and sketch_* must be positive integers.")
        if max_token_items > token_slots or 0 < trigram_slots < max_trigram_items:
            raise ValueError(f"token_slots ({token_slots}) / trigram_slots ({trigram_slots}) must be at least "
                             f"max_token_items ({max_token_items}) / max_trigram_items ({max_trigram_items}).")
        if vocab_size is not None and not 0 < vocab_size < 2**_BITS - 1:
            raise ValueError(f"vocab_size must be in [1, {2**_BITS - 2}], got {vocab_size}.")
        self.n_neurons, self.threshold, self.absolute, self.max_positions = n_neurons, threshold, absolute, max_positions
        self.vocab_size, self.token_slots, self.trigram_slots = vocab_size, token_slots, trigram_slots
        self.sketch_width, self.sketch_depth, self.coverage, self.mass = sketch_width, sketch_depth, coverage, mass
        self.max_token_items, self.max_trigram_items, self.mi_threshold = max_token_items, max_trigram_items, mi_threshold
        self.device = torch.device(device)
        self.n_tokens, self.track_tokens = 0, None  # track_tokens: fixed by the first update (tokens given or not)
        self.fire_count = torch.zeros(n_neurons, dtype=torch.long, device=self.device)
        self.pos_count = torch.zeros(0, dtype=torch.long, device=self.device)  # [P] counted tokens per position
        self.pos_fire = torch.zeros(n_neurons, 0, dtype=torch.long, device=self.device)  # [n, P]
        g = torch.Generator().manual_seed(0)  # fixed hash constants: sketches of separate streams merge
        self._hash = torch.randint(1, _P31, (2, sketch_depth), generator=g, dtype=torch.long).to(self.device)
        self._warned = False

    def config(self) -> dict:
        return {k: getattr(self, k) for k in _CONFIG}

    def _start_tokens(self) -> None:
        n, dev = self.n_neurons, self.device
        self.track_tokens = True
        self.token_occ = torch.zeros(self.vocab_size or 0, dtype=torch.long, device=dev)
        self._hh = {"tok": HeavyHitters(n, self.token_slots, dev)}
        if self.trigram_slots:
            self._hh["tri"] = HeavyHitters(n, self.trigram_slots, dev)
            self.sketch = torch.zeros(self.sketch_depth, self.sketch_width, dtype=torch.int32, device=dev)

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def update(self, acts: Float[Tensor, "batch pos n"], tokens: Int[Tensor, "batch pos"] | None = None,
               mask: Bool[Tensor, "batch pos"] | None = None) -> NeuronStats:
        """Count one batch. ``mask`` marks the positions to count (default all); ``tokens`` (given with every update,
        or never) enable the token/trigram detectors. Thresholding runs on ``acts``'s device, the rest on ``device``."""
        self.check_update(tuple(acts.shape), tokens, mask)
        b, t, n = acts.shape
        if self.track_tokens is None:
            self.track_tokens = False
            if tokens is not None:
                self._start_tokens()
        active = (acts.abs() if self.absolute else acts) > self.threshold
        hits = torch.empty(n, b * t, device=self.device).copy_(active.reshape(b * t, n).T)  # [n, N] 0/1
        mask = torch.ones(b, t, dtype=torch.bool, device=self.device) if mask is None else mask.to(self.device).bool()
        m = mask.view(-1)
        if not m.all():
            hits[:, ~m] = 0  # masked positions add nothing below
        self._count_positions(hits.view(n, b, t).sum(1), mask.sum(0))
        if self.track_tokens:
            tokens = tokens.to(self.device).long()
            occ = torch.bincount(tokens.view(-1)[m], minlength=self.token_occ.numel())
            self.token_occ = occ + torch.nn.functional.pad(self.token_occ, (0, occ.numel() - self.token_occ.numel()))
            self._hh["tok"].update(tokens.view(-1), hits)
            if self.trigram_slots:
                keys = _trigram_keys(tokens).view(-1)
                cols = self._buckets(keys[m]) + torch.arange(self.sketch_depth, device=self.device)[:, None] * \
                    self.sketch_width
                self.sketch.view(-1).index_add_(0, cols.view(-1), torch.ones_like(cols.view(-1), dtype=torch.int32))
                self._hh["tri"].update(keys, hits)
        return self

    def check_update(self, shape: tuple[int, ...], tokens: Tensor | None = None, mask: Tensor | None = None) -> None:
        """Raise the ``ValueError`` that :meth:`update` would raise for acts of ``shape`` with these ``tokens`` and
        ``mask``, changing nothing (callers that must update several statistics all-or-nothing check first)."""
        if len(shape) != 3 or shape[-1] != self.n_neurons:
            raise ValueError(f"acts must be [batch, pos, {self.n_neurons}], got {tuple(shape)}.")
        b, t = shape[:2]
        for name, x in (("tokens", tokens), ("mask", mask)):
            if x is not None and tuple(x.shape) != (b, t):
                raise ValueError(f"{name} must be [batch, pos] = {(b, t)} like acts, got {tuple(x.shape)}.")
        if tokens is not None and (tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool
                                   or (tokens.numel() and (tokens.min() < 0 or tokens.max() >= 2**_BITS - 1))):
            raise ValueError(f"tokens must be integer ids in [0, {2**_BITS - 2}].")
        if self.vocab_size is not None and tokens is not None and tokens.numel() and tokens.max() >= self.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} ≥ vocab_size {self.vocab_size}.")
        if self.track_tokens is not None and self.track_tokens != (tokens is not None):
            raise ValueError("pass tokens with every update or with none: this NeuronStats was started "
                             f"{'with' if self.track_tokens else 'without'} tokens.")

    def _count_positions(self, per_fire: Tensor, per_pos: Tensor) -> None:  # [n, t], [t]
        p = self.max_positions
        if per_pos.numel() > p:
            if not self._warned:
                log.warning("positions ≥ max_positions=%d are pooled into position %d.", p, p - 1)
                self._warned = True
            per_fire = torch.cat([per_fire[:, : p - 1], per_fire[:, p - 1:].sum(1, keepdim=True)], 1)
            per_pos = torch.cat([per_pos[: p - 1], per_pos[p - 1:].sum(0, keepdim=True)])
        self._add_positions(per_fire.long(), per_pos)
        self.fire_count += per_fire.sum(1).long()
        self.n_tokens += int(per_pos.sum())

    def _add_positions(self, per_fire: Tensor, per_pos: Tensor) -> None:
        rows, pad = per_pos.numel(), torch.nn.functional.pad
        if rows > self.pos_count.numel():
            self.pos_count = pad(self.pos_count, (0, rows - self.pos_count.numel()))
            self.pos_fire = pad(self.pos_fire, (0, rows - self.pos_fire.shape[1]))
        self.pos_fire[:, :rows] += per_fire
        self.pos_count[:rows] += per_pos

    def _buckets(self, keys: Tensor) -> Tensor:  # [depth, N] sketch columns; (a·x + b) mod p mod width
        a, b = self._hash
        return ((keys[None] % _P31) * a[:, None] + b[:, None]) % _P31 % self.sketch_width

    def merge(self, other: NeuronStats) -> NeuronStats:
        """Statistics of both streams (a new object); equal to one stream's while the heavy hitters are exact."""
        if other.config() != self.config():
            raise ValueError(f"cannot merge NeuronStats with different settings: {self.config()} vs {other.config()}.")
        if None not in (self.track_tokens, other.track_tokens) and self.n_tokens and other.n_tokens and \
                self.track_tokens != other.track_tokens:
            raise ValueError("cannot merge statistics gathered with tokens and without.")
        out, b = NeuronStats.from_state_dict(self.state_dict(), self.device), other.state_dict()
        dev, pad = out.device, torch.nn.functional.pad
        out._add_positions(b["pos_fire"].to(dev), b["pos_count"].to(dev))
        out.fire_count += b["fire_count"].to(dev)
        out.n_tokens += other.n_tokens
        if other.track_tokens:
            if not out.track_tokens:
                out._start_tokens()
            m = max(out.token_occ.numel(), b["token_occ"].numel())
            out.token_occ = pad(out.token_occ, (0, m - out.token_occ.numel())) + pad(
                b["token_occ"], (0, m - b["token_occ"].numel())).to(dev)
            if self.trigram_slots:
                out.sketch += b["sketch"].to(dev)
            out._hh = {p: hh.merge(HeavyHitters.from_state(b, p, dev)) for p, hh in out._hh.items()}
        return out

    # ------------------------------------------------------------------ results
    def position_mi(self) -> Float[Tensor, " n"]:
        """I(active; position) per neuron in nats, over the empirical distribution of counted positions."""
        if self.n_tokens == 0:
            return torch.zeros(self.n_neurons, dtype=torch.float64)
        n_pos, fire = self.pos_count.double().cpu(), self.pos_fire.double().cpu()
        seen = n_pos > 0
        p_pos, q_pos = n_pos[seen] / self.n_tokens, fire[:, seen] / n_pos[seen]  # [P'], [n, P']
        q = (self.fire_count.double().cpu() / self.n_tokens)[:, None]

        def term(x: Tensor, y: Tensor) -> Tensor:  # x·log(x/y) with 0·log 0 = 0
            return torch.where(x > 0, x * torch.log(x / y.clamp(min=1e-300)), 0.0)

        return ((term(q_pos, q) + term(1 - q_pos, 1 - q)) * p_pos).sum(1).clamp(min=0)

    def result(self) -> pd.DataFrame:
        """One row per neuron: ``neuron, n_active, frequency, kind, dead, position_mi, positional, token_detector,
        trigram_detector`` and, with tokens, ``n_covering_tokens`` (upper bound), ``covering_tokens`` (ids),
        ``covering_token_share, n_covering_tokens_min`` (lower bound), ``token_verdict, n_covering_trigrams,
        covering_trigrams`` (id triples, None = before the row start), ``covering_trigram_share, exact`` (heavy-hitter
        counts exact for this neuron); see the module docstring. ``df.attrs`` holds ``n_tokens`` and the settings."""
        if self.device.type != "cpu":
            return NeuronStats.from_state_dict(self.state_dict()).result()
        fire, n = self.fire_count, self.n_tokens
        mi = self.position_mi()
        df = pd.DataFrame({"neuron": range(self.n_neurons), "n_active": fire.numpy(),
                           "frequency": (fire.double() / max(n, 1)).numpy(), "dead": (fire == 0).numpy() & (n > 0),
                           "position_mi": mi.numpy(), "positional": (mi > self.mi_threshold).numpy()})
        df["token_detector"] = df["trigram_detector"] = False
        und = False  # a trigram detector whose token verdict is uncertain: no label is claimed
        if self.track_tokens:
            tok_hh = self._hh["tok"]
            tok = _detect(tok_hh, self.token_occ[tok_hh.ids.clamp(min=0)], fire, self.coverage, self.mass,
                          self.max_token_items)
            df["token_detector"], df["n_covering_tokens"] = tok["det"], tok["k"]
            df["covering_tokens"], df["covering_token_share"] = tok["items"], tok["share"]
            exact, m = tok_hh.floor == 0, self.max_token_items
            k_min = _fewest_possible(tok_hh, self.token_occ, fire, self.coverage, self.mass, m)
            certain = torch.from_numpy(tok["det"]) | (k_min > m) | (fire == 0)  # token verdict certified by bounds
            df["n_covering_tokens_min"] = k_min.numpy()
            df["token_verdict"] = pd.Series(["uncertain", "bounded", "exact"]).iloc[
                (certain.long() + (exact & certain).long()).numpy()].to_numpy()
            if self.trigram_slots:
                tri_hh = self._hh["tri"]
                cols = self._buckets(tri_hh.ids.clamp(min=0).view(-1))
                tri_occ = self.sketch.gather(1, cols).min(0).values.long().view_as(tri_hh.ids)
                tri = _detect(tri_hh, tri_occ, fire, self.coverage, self.mass, self.max_trigram_items)
                df["trigram_detector"] = tri["det"] & certain.numpy() & ~tok["det"]  # only where no token may cover it
                und = tri["det"] & ~certain.numpy()
                df["n_covering_trigrams"], df["covering_trigrams"] = tri["k"], [[_decode(x) for x in r] for r in
                                                                                tri["items"]]
                df["covering_trigram_share"] = tri["share"]
                exact &= tri_hh.floor == 0
            df["exact"] = exact.numpy()
        kind = pd.Series("other", index=df.index)
        for mask, name in [(df["positional"], "positional"), (df["trigram_detector"], "trigram"), (und, "undetermined"),
                           (df["token_detector"], "token"), (df["dead"], "dead")]:  # the first in Voita's order wins
            kind[pd.Series(mask, index=df.index).astype(bool)] = name
        df.insert(3, "kind", kind)
        df.attrs = {"n_tokens": n, "dead_rate_bound": 3.0 / n if n else math.inf, **self.config()}
        return df

    def summary(self) -> dict:
        """Hook-level numbers (JSON-able). ``dead_rate_bound`` = 3/n_tokens: the 95 % upper bound on a dead neuron's
        firing rate — the "dead" verdict rests on ``n_tokens_seen`` tokens."""
        df, n = self.result(), self.n_tokens
        return {"n_neurons": self.n_neurons, "n_tokens_seen": n, "n_dead": int(df["dead"].sum()),
                "dead_frac": float(df["dead"].mean()), "dead_rate_bound": 3.0 / n if n else math.inf,
                "firing_rate_median": float(df["frequency"].median()),
                "firing_rate_mean": float(df["frequency"].mean()),
                "n_token_detectors": int(df["token_detector"].sum()),
                "n_trigram_detectors": int(df["trigram_detector"].sum()), "n_positional": int(df["positional"].sum()),
                "threshold": self.threshold, "tokens_tracked": bool(self.track_tokens),
                "exact": bool(df["exact"].all()) if "exact" in df else True}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain CPU tensors plus JSON-able scalars (tensors → safetensors, the rest → its JSON metadata)."""
        sd = {**self.config(), "n_tokens": self.n_tokens, "track_tokens": self.track_tokens,
              "fire_count": self.fire_count, "pos_count": self.pos_count, "pos_fire": self.pos_fire}
        if self.track_tokens:
            sd["token_occ"] = self.token_occ
            if self.trigram_slots:
                sd["sketch"] = self.sketch
            for p, hh in self._hh.items():
                sd.update(hh.state(p))
        return {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v for k, v in sd.items()}

    def load_state_dict(self, sd: dict) -> NeuronStats:
        bad = {k: (sd.get(k), v) for k, v in self.config().items() if k in sd and sd[k] != v}
        if bad:
            raise ValueError(f"state_dict settings differ from this NeuronStats' (saved, here): {bad}.")
        self.n_tokens, self.track_tokens = int(sd["n_tokens"]), sd["track_tokens"]
        for k in ("fire_count", "pos_count", "pos_fire") + (("token_occ",) if self.track_tokens else ()):
            setattr(self, k, sd[k].to(self.device, copy=True))
        if self.track_tokens:
            self._hh = {p: HeavyHitters.from_state(sd, p, self.device) for p in ("tok", "tri")[: 1 + bool(
                self.trigram_slots)]}
            if self.trigram_slots:
                self.sketch = sd["sketch"].to(self.device, copy=True)
        return self

    @classmethod
    def from_state_dict(cls, sd: dict, device: str | torch.device = "cpu") -> NeuronStats:
        return cls(**{k: sd[k] for k in _CONFIG}, device=device).load_state_dict(sd)

    def state_bytes(self) -> int:
        """Bytes held in state tensors (bounded: see the module docstring)."""
        return sum(v.numel() * v.element_size() for v in self.state_dict().values() if isinstance(v, Tensor))

    def __repr__(self) -> str:
        return f"NeuronStats(n_neurons={self.n_neurons}, n_tokens={self.n_tokens}, threshold={self.threshold})"


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
