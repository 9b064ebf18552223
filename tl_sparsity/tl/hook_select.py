"""Choosing a collector's hook points: :func:`tl_sparsity.tl.hooks.resolve_hooks` (whose errors suggest names), then
``layers=`` (as the command line's ``--layers``)."""

from __future__ import annotations

from typing import Any

from . import hooks as _hooks

__all__ = ["parse_layers", "select_hooks"]


def parse_layers(spec: Any, n_layers: int, max_layers: int | None = None, name: str = "layers") -> list[int]:
    """``"0,5,10"``, ``"0:30:5"`` (Python slice syntax), an int, a list / range of ints → sorted layer indices,
    checked against ``n_layers`` and cut at ``max_layers``; None → every layer."""
    if max_layers is not None and max_layers < 1:
        raise ValueError(f"--max-layers must be >= 1, got {max_layers}.")
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        layers = list(range(n_layers))
    elif isinstance(spec, str) and ":" in spec:
        try:
            layers = list(range(n_layers))[slice(*[int(v) if v.strip() else None for v in spec.split(":")])]
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name} {spec!r} is not start:stop[:step] (e.g. 0:30:5).") from e
    else:
        items = spec.split(",") if isinstance(spec, str) else [spec] if isinstance(spec, int) else spec
        try:
            layers = sorted({int(v) for v in items if not isinstance(v, str) or v.strip()})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name} {spec!r} is not a comma-separated list of integers (e.g. 0,5,10).") from e
        bad = [v for v in layers if not 0 <= v < n_layers]
        if bad:
            raise ValueError(f"{name} {bad} out of range: this model has layers 0..{n_layers - 1}.")
    layers = [v for v in layers if max_layers is None or v < max_layers]
    if not layers:
        raise ValueError(f"{name} {spec!r} / --max-layers {max_layers} select no layer of 0..{n_layers - 1}.")
    return layers


def select_hooks(model: Any, hooks: _hooks.HookSpec, layers: Any = None) -> dict[str, Any]:
    """``{name: HookPoint}`` of ``hooks`` (see ``resolve_hooks``), kept to the hooks in ``layers`` (hooks outside
    any block, e.g. ``hook_embed``, stay); unknown names raise ``resolve_hooks``' ``KeyError``."""
    points = _hooks.resolve_hooks(model, hooks)
    if layers is None:
        return points
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if n_layers is None:
        raise TypeError("layers= needs the model's cfg.n_layers; pass hook names or globs instead.")
    chosen = set(parse_layers(layers, int(n_layers)))
    kept = {n: hp for n, hp in points.items() if _hooks.parse_hook_name(n)[0] in chosen | {None}}
    if not kept:
        raise ValueError(f"layers={layers!r} keeps none of the hooks {list(points)}; pick layers they are in.")
    return kept

