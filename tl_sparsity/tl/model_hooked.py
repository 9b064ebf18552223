"""``backend="hooked"`` from a local Hugging Face folder: a ``HookedTransformer`` (``HookedEncoder`` for BERT) whose
weights are loaded without processing (no LayerNorm folding or centring), so its activations equal Hugging Face's.

Llama and BERT are converted here (GQA, llama3 rope scaling); other architectures go through TransformerLens' own
converters. Needs TransformerLens < 4 (4 removed ``HookedTransformer``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


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
