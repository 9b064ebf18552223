"""Parameter activation per layer (Wang et al. 2024, *Exploring Activation Patterns of Parameters in Language
Models*, arXiv 2405.17799).

For sample s and scalar parameter w, A(s, w) = |w · ∂D_s/∂w| where D_s is the largest next-token logit at the last
position of s. Per layer, the attention (Q, K, V, O) and MLP (in, gate, out) matrices are pooled; norms, embeddings
and the unembedding are skipped. A is averaged over the samples and a layer's *share* is the fraction of its pooled
parameters whose mean A exceeds ``threshold`` (the paper: 2e-5 over 64 samples).

Our choices where the paper is silent: biases are left out by default (``include_biases=True`` adds those of the same
modules); per-sample gradients come from one forward and backward per sample (exact, simple; A takes an absolute
value, so samples cannot share a backward pass); a parameter the forward does not use (no gradient — e.g. the fused
``qkv`` copy that GPT-2 bridges keep beside the ``q``/``k``/``v`` they run) is not counted. A depends on the
parametrisation: HookedTransformer's default weight processing (LayerNorm folding, centring) and bridges'
compatibility mode change the numbers; use unprocessed weights to measure the model as trained.

Parameter names are matched by pattern (no TransformerLens import): HookedTransformer (``blocks.L.attn.W_Q``,
``blocks.L.mlp.W_in``, …), TransformerBridge native (``layers.L.attn.q``, ``layers.L.mlp.fc_in``; gated:
``mlp.gate``/``mlp.in``/``mlp.out``; inside an MLP also ``up``/``down``, ``w1``/``w2``/``w3``, T5 ``wi``) and bridges of
Hugging Face models (GPT-2 ``transformer.h.L.attn.q``/``mlp.c_fc``, Llama ``model.layers.L.self_attn.q_proj``/
``mlp.gate_proj``, OPT ``fc1``, GPT-NeoX ``query_key_value``, BERT ``attention.self.query``/``intermediate.dense``).
Any other weight matrix inside a layer (a router, an adapter, an unknown naming) is left out with a warning naming it.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["parameter_activation", "parameter_groups", "parameter_scores", "plot_parameter_activation"]
KINDS = ("Q", "K", "V", "QKV", "O", "MLP_in", "MLP_gate", "MLP_out")
_LAYER_LISTS = {"blocks", "layers", "h", "layer", "block"}
_NORM = re.compile(r"(^|_)(ln\d*|norm|layernorm|layer_norm|rmsnorm)(_|$)|norm$", re.IGNORECASE)
_ATTN_CTX = {"attn", "attention", "self_attn", "self_attention", "self", "selfattention"}
_HT = {"W_Q": "Q", "W_K": "K", "_W_K": "K", "W_V": "V", "_W_V": "V", "W_O": "O", "W_in": "MLP_in",
       "W_gate": "MLP_gate", "W_out": "MLP_out"}
_HT.update({"b" + k[1:] if k[0] == "W" else "_b" + k[2:]: v for k, v in list(_HT.items())})
_MODULES = {"q": "Q", "q_proj": "Q", "query": "Q", "k": "K", "k_proj": "K", "key": "K", "v": "V", "v_proj": "V",
            "value": "V", "qkv": "QKV", "c_attn": "QKV", "query_key_value": "QKV", "qkv_proj": "QKV", "Wqkv": "QKV",
            "o": "O", "o_proj": "O", "out_proj": "O", "fc_in": "MLP_in", "c_fc": "MLP_in", "up_proj": "MLP_in",
            "fc1": "MLP_in", "dense_h_to_4h": "MLP_in", "gate_up_proj": "MLP_in", "gate_proj": "MLP_gate",
            "fc_out": "MLP_out", "down_proj": "MLP_out", "fc2": "MLP_out", "dense_4h_to_h": "MLP_out",
            "wi": "MLP_in", "wi_1": "MLP_in", "wi_0": "MLP_gate"}
_MLP_CTX = {"mlp", "feed_forward", "ffn", "ff", "feedforward"}
_IN_MLP = {"in": "MLP_in", "up": "MLP_in", "w3": "MLP_in", "input": "MLP_in", "gate": "MLP_gate", "w1": "MLP_gate",
           "out": "MLP_out", "down": "MLP_out", "w2": "MLP_out", "output": "MLP_out"}  # native bridges: mlp.gate/in/out


def _segments(name: str) -> list[str]:
    return [s for s in name.split(".") if s not in ("_original_component", "original_component")]


def _layer_part(name: str) -> list[str] | None:
    """The segments after ``<layer list>.<index>`` (None outside the layers)."""
    segs = _segments(name)
    at = next((i for i in range(1, len(segs)) if segs[i].isdigit() and segs[i - 1] in _LAYER_LISTS), None)
    return None if at is None else segs[at + 1:]


def _classify(name: str) -> tuple[int, str, bool] | None:
    """(layer, kind, is_bias) of a parameter name, or None for norms, embeddings, unembedding and unknown names."""
    segs, rest = _segments(name), _layer_part(name)
    if rest is None:
        return None
    at = len(segs) - len(rest) - 1
    if not rest or any(_NORM.search(s) for s in rest):
        return None
    if rest[-1] in _HT:  # HookedTransformer: blocks.L.attn.W_Q, blocks.L.mlp.b_in
        return int(segs[at]), _HT[rest[-1]], rest[-1].lstrip("_").startswith("b")
    if rest[-1] not in ("weight", "bias") or len(rest) < 2:
        return None
    module, ctx = rest[-2], set(rest[:-2])
    kind = _MODULES.get(module) or (_IN_MLP.get(module) if ctx & _MLP_CTX else None)
    if module in ("c_proj", "dense", "wo"):  # context decides: attention output, or the MLP's in/out
        kind = "O" if ctx & _ATTN_CTX else "MLP_in" if "intermediate" in ctx else "MLP_out"
    return None if kind is None else (int(segs[at]), kind, rest[-1] == "bias")


def _grouping(model: torch.nn.Module, include_biases: bool) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """(pooled parameters as in :func:`parameter_groups`, weight matrices of a layer left out)."""
    out, left = {}, []
    for name, p in model.named_parameters():
        hit = _classify(name)
        if hit is not None and (include_biases or not hit[2]):
            out[name] = hit[:2]
        elif hit is None and p.ndim >= 2 and _layer_part(name) is not None and not any(
                _NORM.search(s) for s in _layer_part(name)):
            left.append(name)
    if not out:
        names = [n for n, _ in model.named_parameters()][:8]
        raise ValueError(f"no attention/MLP parameters recognised in {type(model).__name__} (first names: {names}); "
                         "expected HookedTransformer, TransformerBridge or Hugging Face-style layer names "
                         "(e.g. 'blocks.0.attn.W_Q', 'model.layers.0.self_attn.q_proj.weight').")
    return out, left


def _warn_left_out(left: list[str]) -> None:
    if left:
        warnings.warn(f"{len(left)} weight matrices of the layers are not recognised as attention or MLP and are left "
                      f"out of parameter activation: {left}", stacklevel=3)


def parameter_groups(model: torch.nn.Module, *, include_biases: bool = False) -> dict[str, tuple[int, str]]:
    """``{parameter name: (layer, kind)}`` of the pooled matrices (kinds: ``KINDS``). Raises if none is recognised;
    warns, naming them, if weight matrices of a layer are recognised as neither attention nor MLP."""
    out, left = _grouping(model, include_biases)
    _warn_left_out(left)
    return out


@contextlib.contextmanager
def _grad_mode(model: torch.nn.Module, wanted: set[int]) -> Iterator[None]:
    """Autograd on (also under no_grad/inference_mode), eval mode, requires_grad only on ``wanted``; all restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    try:
        for p in flags:
            p.requires_grad_(id(p) in wanted)
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)


def parameter_scores(model: torch.nn.Module, tokens: Int[Tensor, "batch pos"], *, include_biases: bool = False,
                     lengths: Int[Tensor, " batch"] | None = None) -> dict[str, Tensor]:
    """Mean over samples of A(s, w) = |w · ∂D_s/∂w|: ``{name: tensor shaped like the parameter}`` for every pooled
    parameter the forward uses. Row s is run alone (``tokens[s, :lengths[s]]``; no padding inside a row); D_s is the
    largest logit at its last position. The model's ``.grad``, ``requires_grad`` and train/eval mode are left as
    found."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.is_floating_point():
        raise ValueError(f"tokens must be integer ids [batch, pos] with batch ≥ 1, got {tuple(tokens.shape)} "
                         f"{tokens.dtype}.")
    if lengths is not None and (lengths.shape != tokens.shape[:1] or lengths.min() < 1 or lengths.max() > tokens.shape[1]):
        raise ValueError(f"lengths must be [batch] = {tokens.shape[:1]} with values in [1, {tokens.shape[1]}].")
    groups = parameter_groups(model, include_biases=include_biases)
    named = [(n, p) for n, p in model.named_parameters() if n in groups]
    sums: list[Tensor | None] = [None] * len(named)
    device = named[0][1].device
    with _grad_mode(model, {id(p) for _, p in named}):
        for s in range(tokens.shape[0]):
            row = tokens[s: s + 1, : int(lengths[s]) if lengths is not None else tokens.shape[1]].to(device)
            logits = model(row)
            grads = torch.autograd.grad(logits[0, -1].max(), [p for _, p in named], allow_unused=True)
            for i, ((_, p), g) in enumerate(zip(named, grads)):
                if g is not None:
                    dt = torch.promote_types(p.dtype, torch.float32)
                    a = (p.detach().to(dt) * g.to(dt)).abs()
                    sums[i] = a if sums[i] is None else sums[i].add_(a)
    return {n: acc / tokens.shape[0] for (n, _), acc in zip(named, sums) if acc is not None}


def parameter_activation(model: torch.nn.Module, tokens: Int[Tensor, "batch pos"], *, threshold: float = 2e-5,
                         by_kind: bool = False, include_biases: bool = False,
                         lengths: Int[Tensor, " batch"] | None = None) -> pd.DataFrame:
    """One row per layer (``by_kind=True``: per layer and kind): ``layer, [kind,] n_params, n_active, share,
    mean_activation, max_activation`` where ``n_active`` counts parameters whose mean A (over the ``batch`` samples)
    exceeds ``threshold``. ``df.attrs``: threshold, n_samples, include_biases, and ``unused``: the pooled parameters
    the forward did not use, then the layers' weight matrices left out as neither attention nor MLP (also warned
    about). See :func:`parameter_scores` for A."""
    groups, left = _grouping(model, include_biases)
    _warn_left_out(left)
    with warnings.catch_warnings():  # warned once, above
        warnings.filterwarnings("ignore", message=".*left out of parameter activation")
        scores = parameter_scores(model, tokens, include_biases=include_biases, lengths=lengths)
    rows: dict[tuple, list[Tensor]] = {}
    for name, a in scores.items():
        layer, kind = groups[name]
        rows.setdefault((layer, kind) if by_kind else (layer,), []).append(a.reshape(-1))
    records = []
    for key in sorted(rows, key=lambda k: (k[0], KINDS.index(k[1])) if by_kind else k):
        a = torch.cat(rows[key]).double()
        n_active = int((a > threshold).sum())
        records.append({"layer": key[0], **({"kind": key[1]} if by_kind else {}), "n_params": a.numel(),
                        "n_active": n_active, "share": n_active / a.numel(), "mean_activation": float(a.mean()),
                        "max_activation": float(a.max())})
    df = pd.DataFrame.from_records(records)
    df.attrs = {"threshold": threshold, "n_samples": int(tokens.shape[0]), "include_biases": include_biases,
                "unused": sorted(set(groups) - set(scores)) + left}
    return df


def plot_parameter_activation(df: pd.DataFrame, ax=None, *, label: str | None = None):
    """Share of activated parameters by layer (one line per kind if ``df`` has a ``kind`` column); returns the axes."""
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6, 3.5))
    missing = {"layer", "share"} - set(df.columns)
    if missing:
        raise ValueError(f"df lacks columns {sorted(missing)}: pass the frame parameter_activation returned.")
    parts = df.groupby("kind", sort=False) if "kind" in df else [(label, df)]
    for kind, part in parts:
        ax.plot(part["layer"], part["share"], marker="o", label=kind)
    thr = df.attrs.get("threshold")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"share of parameters with mean A > {thr:g}" if thr is not None else "share of activated parameters")
    ax.set_ylim(0, 1.02)
    if "kind" in df or label:
        ax.legend()
    return ax
