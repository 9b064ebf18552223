"""A model's token-embedding matrix, the rows of the paper's "token embeddings" measurement (one row per vocabulary
entry). ``W_E`` is where every TransformerLens generation keeps it: ``HookedTransformer``, ``HookedEncoder`` and
``TransformerBridge`` (2.x–4.x)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["token_embeddings"]


def token_embeddings(model: Any) -> Float[Tensor, "vocab d"]:
    """The token-embedding matrix ``[d_vocab, d_model]`` of ``model`` as a detached float32 CPU tensor (a copy)."""
    try:
        w = model.W_E
    except AttributeError as e:
        raise TypeError(f"{type(model).__name__} has no token-embedding matrix W_E: pass a TransformerLens "
                        "HookedTransformer, HookedEncoder or TransformerBridge.") from e
    if not isinstance(w, Tensor) or w.ndim != 2:
        raise TypeError(f"{type(model).__name__}.W_E is not a [d_vocab, d_model] tensor "
                        f"(got {type(w).__name__} {tuple(getattr(w, 'shape', ()))}).")
    return w.detach().to("cpu", torch.float32).clone()
