"""The only module that knows TransformerLens: the duck-typed model surface, hook-name resolution, attach/detach.

Works with ``HookedTransformer`` (TL 2.x/3.x) and ``TransformerBridge`` (TL 3.x/4.x, with or without compatibility
mode) through what both share: ``hook_dict``, ``cfg``, ``run_with_hooks`` and HookPoints with ``add_hook`` /
``fwd_hooks``. TransformerLens itself is never imported here: models arrive already built, and its version is read
from package metadata, so ``import tl_sparsity`` stays fast.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

__all__ = ["HookModel", "ALIASES", "resolve_hooks", "add_hook", "remove_hook", "model_info", "parse_hook_name",
           "split_batch", "neuron_hooks", "point", "SAE_INPUT", "sae_sites"]

#: the hook point of an SAE (SAELens ``add_sae``) that sees the activation the model computed where it is attached
SAE_INPUT = "hook_sae_input"


@runtime_checkable
class HookModel(Protocol):
    """What tl_sparsity needs of a model: TransformerLens' hook surface."""

    cfg: Any

    @property
    def hook_dict(self) -> dict[str, Any]: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...


#: alias → HT-style name template; ``{L}`` runs over every layer.
ALIASES: dict[str, str] = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "mlp_pre": "blocks.{L}.mlp.hook_pre",
    "mlp_post": "blocks.{L}.mlp.hook_post",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "attn_out": "blocks.{L}.hook_attn_out",
    "embed": "hook_embed",
}

# HT-style names, preferred as the result key when a glob reaches one HookPoint under several names (bridges).
_HT_STYLE = re.compile(
    r"^(hook_(embed|pos_embed|tokens)|ln_final\.hook_(scale|normalized)|blocks\.\d+\.("
    r"hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out|attn_in|mlp_in|q_input|k_input|v_input)"
    r"|attn\.hook_(q|k|v|z|attn_scores|pattern|result|rot_q|rot_k)"
    r"|mlp\.hook_(pre|post|pre_linear)|ln[12]\.hook_(scale|normalized)))$"
)
_SITE = {v.split("{L}.")[-1]: k for k, v in ALIASES.items()}

HookSpec = str | Callable[[str], bool] | Iterable[str | Callable[[str], bool]]


def parse_hook_name(name: str) -> tuple[int | None, str]:
    """``"blocks.3.mlp.hook_post"`` → ``(3, "mlp_post")``; names outside a block get layer ``None``."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m is None:
        return None, _SITE.get(name, "embed" if name == "hook_embed" else name)
    rest = m.group(2)
    return int(m.group(1)), _SITE.get(rest, rest)


def _n_layers(model: Any) -> int:
    n = getattr(getattr(model, "cfg", None), "n_layers", None)
    if n is None:
        raise TypeError("the model's cfg has no n_layers; pass exact hook names or globs instead of aliases.")
    return int(n)


def _check_model(model: Any) -> dict[str, Any]:
    if not hasattr(model, "hook_dict") or not hasattr(model, "run_with_hooks"):
        raise TypeError(
            f"expected a TransformerLens model (HookedTransformer or TransformerBridge) with hook_dict and "
            f"run_with_hooks; got {type(model).__name__}."
        )
    return dict(model.hook_dict)  # bridges rebuild it on each access: take it once


def point(hook_dict: dict[str, Any], name: str) -> tuple[str, Any] | None:
    """``(name measured, HookPoint)`` that measures ``name`` in ``hook_dict`` now: its own HookPoint, or, where an SAE
    (SAELens ``add_sae``, ``run_with_saes``) has replaced it, the SAE's input hook point ``name.hook_sae_input`` —
    the same activation, as the model computed it. None when neither is there."""
    if name in hook_dict:  # hook_dict holds HookPoints only: an SAE in their place is not there
        return name, hook_dict[name]
    alt = f"{name}.{SAE_INPUT}"
    return (alt, hook_dict[alt]) if alt in hook_dict else None


def sae_sites(hook_dict: dict[str, Any]) -> list[str]:
    """The names where an SAE is attached now (``X`` for every ``X.hook_sae_input`` of ``hook_dict``)."""
    tail = f".{SAE_INPUT}"
    return [n[: -len(tail)] for n in hook_dict if n.endswith(tail)]


def _same_site(name: str, names: list[str]) -> list[str]:
    """Names at ``name``'s layer whose words contain its words (``blocks.0.hook_mlp_post`` → ``blocks.0.mlp.hook_post``),
    with the alias of that site first; at most 5."""
    block = re.match(r"blocks\.(\d+)\.(.+)$", name)
    prefix, rest = (f"blocks.{block.group(1)}.", block.group(2)) if block else ("", name)
    words = set(re.split(r"[._]", rest)) - {"hook", ""}
    close = [n for n in names if n.startswith(prefix) and (block or "." not in n) and words
             and words <= set(re.split(r"[._]", n[len(prefix):])) - {"hook", ""}]
    template = ALIASES.get(rest.removeprefix("hook_"))
    if template is not None and block:
        close.insert(0, template.format(L=block.group(1)))
    return list(dict.fromkeys(close))[:5]


def _unknown(name: str, names: list[str], hook_dict: dict[str, Any] | None = None) -> KeyError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    site = _same_site(name, names)
    hint += f" Same site, this model's name: {', '.join(site)}." if site else ""
    saes = sae_sites(hook_dict or {})
    if saes:  # SAELens: the SAE replaced the hook point, its own hook points carry the name further
        x = saes[0]
        hint += (f" SAEs are attached at {', '.join(saes)}; their hook points are named like {x}.hook_sae_input (the "
                 f"model's activation, the SAE's input), {x}.hook_sae_acts_post (its latents), {x}.hook_sae_recons, "
                 f"{x}.hook_sae_error, {x}.hook_sae_output.")
    elif ".hook_sae_" in name:
        hint += (f" {name.rsplit('.', 1)[0]!r} has no SAE attached now: attach it first (SAELens model.add_sae(sae)), "
                 "or measure the plain hook point.")
    return KeyError(
        f"no hook point named {name!r} in this model.{hint} Aliases: {', '.join(ALIASES)}; globs like "
        f"'blocks.*.hook_resid_post' and filter functions also work."
    )


def resolve_hooks(model: Any, spec: HookSpec) -> dict[str, Any]:
    """Resolve a hook spec to ``{HT-style name: HookPoint}``, one entry per distinct HookPoint, in model order.

    ``spec`` is an alias (``"resid_post"`` → every layer; see :data:`ALIASES`), an exact name, a glob (``*?[``), a
    filter function ``name -> bool``, a comma-separated string of these, or a list of them.
    """
    hook_dict = _check_model(model)
    names = list(hook_dict) + [n for n in sae_sites(hook_dict) if n not in hook_dict]  # SAE sites: by their names
    if isinstance(spec, str):
        items: list[Any] = [s.strip() for s in spec.split(",") if s.strip()]
    elif callable(spec):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise ValueError("no hooks requested: pass an alias such as 'resid_post', a hook name, a glob or a function.")
    wanted: list[str] = []
    for item in items:
        if callable(item):
            hits = [n for n in names if item(n)]
            if not hits:
                raise ValueError(f"the filter function {getattr(item, '__name__', item)!r} matched no hook point.")
            wanted += _prefer_ht(hits, hook_dict)
        elif not isinstance(item, str):
            raise TypeError(f"hook specs are strings or functions, got {type(item).__name__}: {item!r}.")
        elif item in ALIASES:
            tmpl = ALIASES[item]
            alias_names = [tmpl.format(L=i) for i in range(_n_layers(model))] if "{L}" in tmpl else [tmpl]
            for n in alias_names:
                if point(hook_dict, n) is None:
                    raise _unknown(n, names, hook_dict)
            wanted += alias_names
        elif any(ch in item for ch in "*?["):
            hits = fnmatch.filter(names, item)
            if not hits:
                raise _unknown(item, names, hook_dict)
            wanted += _prefer_ht(hits, hook_dict)
        elif point(hook_dict, item) is not None:
            wanted.append(item)
        else:
            raise _unknown(item, names, hook_dict)
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for n in wanted:
        hp = point(hook_dict, n)[1]  # type: ignore[index]
        if id(hp) not in seen:
            seen.add(id(hp))
            out[n] = hp
    order = {id(hp): i for i, hp in enumerate(hook_dict.values())}
    return dict(sorted(out.items(), key=lambda kv: order.get(id(kv[1]), 0)))


def _prefer_ht(hits: list[str], hook_dict: dict[str, Any]) -> list[str]:
    """Among names that reach the same HookPoint, keep the HT-style one (else the first)."""
    best: dict[int, str] = {}
    for n in hits:
        k = id(point(hook_dict, n)[1])  # type: ignore[index]
        if k not in best or (_HT_STYLE.match(n) and not _HT_STYLE.match(best[k])):
            best[k] = n
    return list(best.values())


def add_hook(hook_point: Any, fn: Callable, permanent: bool) -> list[Any]:
    """Add a forward hook and return exactly the handles it created (``add_hook`` returns None on TL 2/3)."""
    before = {id(h) for h in hook_point.fwd_hooks}
    hook_point.add_hook(fn, dir="fwd", is_permanent=permanent)
    return [h for h in hook_point.fwd_hooks if id(h) not in before]


def remove_hook(hook_point: Any, handles: list[Any]) -> None:
    """Remove exactly ``handles`` from ``hook_point``, leaving every other tool's hooks in place."""
    ids = {id(h) for h in handles}
    for h in handles:
        h.hook.remove()
    hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if id(h) not in ids]


def model_info(model: Any) -> dict[str, Any]:
    """Metadata for reports: model class and name, TL version, bridge/compat mode, dtype, n_layers, d_model."""
    cfg = getattr(model, "cfg", None)
    try:
        version = metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        version = None
    dtype = getattr(cfg, "dtype", None)
    if dtype is None:
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        dtype = None if p is None else p.dtype
    cls = type(model).__name__
    return {
        "model_class": cls,
        "model_name": getattr(cfg, "model_name", None),
        "transformer_lens": version,
        "bridge": "Bridge" in cls,
        "compatibility_mode": bool(getattr(model, "compatibility_mode", False)),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "n_layers": getattr(cfg, "n_layers", None),
        "d_model": getattr(cfg, "d_model", None),
    }


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(tokens, attention_mask or None)`` of a batch: a tensor, a ``(tokens, mask)`` pair, or a dict with
    ``input_ids`` (and optionally ``attention_mask``)."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"a dict batch needs 'input_ids' (and optionally 'attention_mask'); got {list(batch)}.")
        return batch["input_ids"], batch.get("attention_mask")
    from torch import Tensor

    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor):
        return batch[0], batch[1]
    return batch, None


def neuron_hooks(model: Any, hook_points: dict[str, Any], spec: Any) -> list[str]:
    """The collector hooks that get neuron statistics: ``None`` → those whose site is ``mlp_post``, ``False`` → none,
    ``True`` → all, else names / aliases / globs / functions (a comma-separated string or a list), each of which
    must reach at least one of ``hook_points``."""
    if spec is None:
        return [n for n in hook_points if parse_hook_name(n)[1] == "mlp_post"]
    if spec is False:
        return []
    if spec is True:
        return list(hook_points)
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else (
        [spec] if callable(spec) else list(spec))
    wanted: set[int] = set()
    for item in items:
        ids = {id(hp) for hp in resolve_hooks(model, item).values()}
        if not ids & {id(hp) for hp in hook_points.values()}:
            raise ValueError(f"neurons: {item!r} is none of this collector's hooks {list(hook_points)}; add it to "
                             "hooks= as well, or pass neurons=True for every hook.")
        wanted |= ids
    return [n for n, hp in hook_points.items() if id(hp) in wanted]
