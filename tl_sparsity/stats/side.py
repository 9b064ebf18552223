"""Side statistics a :class:`~tl_sparsity.tl.collector.SparsityCollector` keeps per hook beside its learner: the streamed
mean and covariance (for the covariance-matched Gaussian control, ``controls=True``) and neuron statistics
(:class:`~tl_sparsity.stats.neurons.NeuronStats`, ``neurons=...``).

Both see exactly what the hook's learner sees: the covariance is updated with the learner's rows (BOS and padding
dropped, trained and held out alike, non-finite rows left out as the learner leaves them out); the neuron statistics get the raw activation ``[batch, pos, n]`` with the same
keep-mask as ``mask``, and the batch's token ids when known. Each hook's state is created on its first update (the
width is that of the first activation) and lives on that activation's device unless ``neuron_options`` names one.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .controls import StreamingCovariance, control_metrics
from .neurons import NeuronStats

__all__ = ["CONTROL_COLUMNS", "CONTROL_NOTE", "NEURON_COLUMNS", "SideStats", "check_neuron_options", "decode_tokens"]
log = logging.getLogger(__name__)

NEURON_COLUMNS = ("dead_frac", "n_dead", "firing_rate_median", "n_token_detectors", "n_trigram_detectors",
                  "n_positional")
CONTROL_COLUMNS = ("control_normalized_loss", "control_normalized_loss_se", "sparsity_ratio")
CONTROL_NOTE = ("per hook, a fresh learner with the hook's learner options and seed, trained and evaluated on as many "
                "rows (trained + held out) of a Gaussian with the hook's streamed mean and covariance (float64, over "
                "every row its learner received) as the hook's learner saw; sparsity_ratio = "
                "control_normalized_loss / normalized_loss (> 1: sparser than the Gaussian)")
TOKENS_HINT = "pass tokens= to fwd_hooks/attach, or set col.tokens, on every call, or on none (fit passes its batches')"


def check_neuron_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``options`` after checking that ``NeuronStats(n, **options)`` accepts them."""
    options = dict(options or {})
    if "n_neurons" in options:
        raise ValueError("neuron_options must not set n_neurons: it is the width of each hook's activation.")
    try:
        NeuronStats(1, **{**options, "device": "cpu"})
    except TypeError as e:
        raise ValueError(f"neuron_options: {e}; valid keys are NeuronStats' keyword arguments "
                         "(threshold, absolute, max_positions, vocab_size, token_slots, trigram_slots, ...).") from e
    return options


class SideStats:
    """The side statistics of one hook: ``cov`` (a :class:`StreamingCovariance` when ``covariance``) and ``neurons``
    (a :class:`NeuronStats` when ``neurons``), each None until the hook's first update."""

    def __init__(self, name: str, covariance: bool, neurons: bool, neuron_options: dict[str, Any] | None = None):
        self.name, self.want_cov, self.want_neurons = name, bool(covariance), bool(neurons)
        self.neuron_options = dict(neuron_options or {})
        self.cov: StreamingCovariance | None = None
        self.neurons: NeuronStats | None = None
        self._control: tuple[int, dict[str, float]] | None = None  # (rows, control metrics) of the last report

    def _new_neurons(self, width: int, device: torch.device) -> NeuronStats:
        return NeuronStats(width, **{"device": device, **self.neuron_options})

    def check(self, acts: Float[Tensor, "batch pos n"], tokens: Any, keep: Bool[Tensor, "batch pos"], n_kept: int,
              implicit: bool = False) -> Int[Tensor, "batch pos"] | None:
        """Raise, changing nothing, if :meth:`update` would fail on this activation; returns the tokens to use, as a
        ``[batch, pos]`` tensor (or None). ``implicit`` tokens (``fit``'s) are dropped, with a warning, for
        statistics started without tokens; with no kept position (``n_kept`` = 0) tokens do not matter."""
        b, p, width = acts.shape
        if self.cov is not None and width != self.cov.d:
            raise ValueError(f"hook {self.name}: its covariance has d={self.cov.d} but this activation has {width} "
                             "features per position (a different model or hook?).")
        if not self.want_neurons or not n_kept:  # no kept row: update() counts nothing
            return None
        if tokens is not None:
            tokens = torch.as_tensor(tokens)
            if tokens.ndim == 1 and b == 1:
                tokens = tokens[None]
        stats = self.neurons
        if implicit and tokens is not None and stats is not None and stats.track_tokens is False:
            warnings.warn(f"hook {self.name}: its neuron statistics were started without token ids, so fit goes on "
                          "without them too (token and trigram detectors stay off).", stacklevel=2)
            tokens = None
        if stats is not None and stats.track_tokens is not None and stats.track_tokens != (tokens is not None):
            started = "with" if stats.track_tokens else "without"
            raise ValueError(f"hook {self.name}: its neuron statistics were started {started} token ids and this "
                             f"forward {'has none' if tokens is None else 'passes some'}: {TOKENS_HINT}.")
        try:
            (stats or self._new_neurons(width, acts.device)).check_update((b, p, width), tokens, keep)
        except ValueError as e:
            raise ValueError(f"hook {self.name}: neuron statistics: {e}") from None
        return tokens

    def update(self, rows: Float[Tensor, "n_kept d"], acts: Float[Tensor, "batch pos d"] | None,
               tokens: Int[Tensor, "batch pos"] | None, keep: Bool[Tensor, "batch pos"]) -> None:
        """Add one forward's rows (those the learner got) and activation ``[batch, pos, d]`` (None when this hook
        keeps no neuron statistics) with its token ids and keep-mask. Nothing changes when no row was kept."""
        if not rows.shape[0]:
            return
        if self.want_cov:
            if self.cov is None:
                self.cov = StreamingCovariance(rows.shape[1], device=rows.device)
            finite = torch.isfinite(rows).all(dim=1)
            self.cov.update(rows if bool(finite.all()) else rows[finite])  # the learner drops the others too
        if self.want_neurons and acts is not None:
            if self.neurons is None:
                self.neurons = self._new_neurons(acts.shape[-1], acts.device)
            self.neurons.update(acts, tokens, keep)

    # ------------------------------------------------------------------ report
    def control_row(self, learner: Any, actual: float) -> dict[str, float]:
        """``control_normalized_loss(_se)`` and ``sparsity_ratio`` (NaN while the hook's learner cannot be evaluated);
        the control is trained once per row count."""
        row = dict.fromkeys(CONTROL_COLUMNS, math.nan)
        n_rows = learner.n_tokens_ + learner.n_heldout_
        if self.cov is None or self.cov.n < 2 or not math.isfinite(actual):
            return row
        if self._control is None or self._control[0] != n_rows:
            params = learner.get_params()
            if learner.device is not None:
                params["device"] = learner.device
            self._control = (n_rows, control_metrics(self.cov, params, n_rows=n_rows, seed=learner.seed))
        ctrl = self._control[1]
        row["control_normalized_loss"] = float(ctrl["normalized_loss"])
        row["control_normalized_loss_se"] = float(ctrl["normalized_loss_se"])
        row["sparsity_ratio"] = row["control_normalized_loss"] / actual if actual else math.nan
        return row

    def neuron_row(self) -> dict[str, Any]:
        """The report's neuron columns (:data:`NEURON_COLUMNS`): NaN / None without statistics."""
        stats = self.neurons if self.want_neurons else None
        if stats is None or stats.n_tokens == 0:
            return {c: (math.nan if c in ("dead_frac", "firing_rate_median") else None) for c in NEURON_COLUMNS}
        s = stats.summary()
        return {c: s[c] for c in NEURON_COLUMNS}

    def neuron_table(self, tokenizer: Any = None) -> list[dict[str, Any]]:
        """``NeuronStats.result()`` as JSON-able records; with a ``tokenizer``, ``covering_token_strings`` (and
        ``covering_trigram_strings``) hold each covering id decoded on its own."""
        assert self.neurons is not None
        records = [{k: _plain(v) for k, v in r.items()} for r in self.neurons.result().to_dict("records")]
        if tokenizer is None or not self.neurons.track_tokens:
            return records
        ids = {i for r in records for i in r.get("covering_tokens", [])}
        ids |= {i for r in records for tri in r.get("covering_trigrams", []) for i in tri if i is not None}
        text = decode_tokens(tokenizer, sorted(ids))
        if text is None:
            return records
        for r in records:
            r["covering_token_strings"] = [text[i] for i in r["covering_tokens"]]
            if "covering_trigrams" in r:
                r["covering_trigram_strings"] = [[None if i is None else text[i] for i in tri]
                                                 for tri in r["covering_trigrams"]]
        return records

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)`` (CPU tensors, JSON-able meta) of the statistics held; see :meth:`restore`."""
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"hook": self.name, "covariance": None, "neurons": None}
        if self.cov is not None:
            sd = self.cov.state_dict()
            tensors.update({"cov.mean": sd["mean"], "cov.scatter": sd["scatter"]})
            meta["covariance"] = {"d": self.cov.d, "n": sd["n"], "device": str(self.cov.device)}
        if self.neurons is not None:
            sd = self.neurons.state_dict()
            tensors.update({f"neurons.{k}": v for k, v in sd.items() if isinstance(v, Tensor)})
            meta["neurons"] = {**{k: v for k, v in sd.items() if not isinstance(v, Tensor)},
                               "device": str(self.neurons.device)}
        return tensors, meta

    def loaded(self, tensors: dict[str, Tensor], meta: dict[str, Any] | None,
               device: str | torch.device | None = None) -> tuple[StreamingCovariance | None, NeuronStats | None]:
        """``(cov, neurons)`` rebuilt from a saved :meth:`state` (None: none collected) on ``device`` (default: the
        saved one), changing nothing; :meth:`restore` installs them."""
        cov = neurons = None
        if meta is not None and meta["covariance"] is not None:
            c = meta["covariance"]
            cov = StreamingCovariance(c["d"], device=_device(device, c["device"]))
            cov.load_state_dict({"n": c["n"], "mean": tensors["cov.mean"], "scatter": tensors["cov.scatter"]})
        if meta is not None and meta["neurons"] is not None:
            sd = {**{k: v for k, v in meta["neurons"].items() if k != "device"},
                  **{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("neurons.")}}
            dev = _device(device or self.neuron_options.get("device"), meta["neurons"]["device"])
            neurons = NeuronStats.from_state_dict(sd, dev)
        return cov, neurons

    def restore(self, loaded: tuple[StreamingCovariance | None, NeuronStats | None]) -> None:
        """Replace the statistics by :meth:`loaded`'s (in place: hooks already attached keep feeding this object)."""
        self.cov, self.neurons = loaded
        self._control = None

    def config_diff(self, meta: dict[str, Any]) -> list[str]:
        """Differences between a saved :meth:`state`'s neuron settings and this hook's ``neuron_options``."""
        saved = meta.get("neurons")
        if saved is None:
            return []
        mine = self._new_neurons(int(saved["n_neurons"]), torch.device("cpu")).config()
        return [f"{k}: saved {saved.get(k)!r}, here {v!r}" for k, v in mine.items() if saved.get(k) != v]


def decode_tokens(tokenizer: Any, ids: Iterable[int]) -> dict[int, str] | None:
    """``{id: string}``, each id decoded on its own (``convert_ids_to_tokens``, else ``decode([id])``); None when
    ``tokenizer`` can do neither or fails."""
    ids = list(ids)
    try:
        if hasattr(tokenizer, "convert_ids_to_tokens"):
            text = list(tokenizer.convert_ids_to_tokens(ids))
        elif hasattr(tokenizer, "decode"):
            text = [tokenizer.decode([i]) for i in ids]
        else:
            return None
    except Exception as e:  # noqa: BLE001 — strings are a convenience; the ids are still reported
        log.warning("could not decode covering token ids with %s: %s", type(tokenizer).__name__, e)
        return None
    return {i: (None if s is None else str(s)) for i, s in zip(ids, text)}


def _device(explicit: str | torch.device | None, saved: str) -> torch.device:
    dev = torch.device(explicit or saved)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"statistics saved on {dev} and CUDA is not available: load with device='cpu'.")
    return dev


def _plain(v: Any) -> Any:
    """numpy scalars → Python scalars, tuples → lists, recursively (JSON-able, equal after a JSON round trip)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v
