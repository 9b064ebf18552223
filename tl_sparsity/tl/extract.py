"""The rows a hook keeps from an activation ``[batch, pos, ...]``: the attended positions minus BOS, flattened to
``[kept positions, features]`` and copied as float32 (``SparsityCollector.keep_mask`` and ``.rows``); and which
activations a hook may measure (:func:`check_shape`): per-token ``[batch, pos, d]`` ones, and per-head ones
``[batch, pos, head, d_head]``, measured flattened to ``[batch, pos, head·d_head]``."""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

__all__ = ["check_shape", "check_width", "keep_mask", "own_copy", "rows"]

ATTENTION_MAPS = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]
PER_HEAD = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k", "hook_q_input",
            "hook_k_input", "hook_v_input", "hook_attn_in")  # [batch, pos, head, d]


def check_shape(name: str, activation: Tensor, tokens: Any = None) -> None:
    """Raise a :class:`ValueError` naming hook ``name``, the activation's shape and what to measure instead unless
    ``activation`` is ``[batch, pos, d]`` or, at a per-head site (:data:`PER_HEAD`), ``[batch, pos, head, d_head]``
    — whose ``pos`` must then be the length of ``tokens`` (the forward's token ids ``[batch, pos]``) when given.
    (A ``[batch, pos, d]`` activation's tokens are checked where they are used, by the neuron statistics.)"""
    shape, site = tuple(activation.shape), name.rsplit(".", 1)[-1]
    if site in ATTENTION_MAPS:
        raise ValueError(f"hook {name}: {site} is [batch, head, query, key] (here {shape}), an attention map, not a "
                         "per-token activation; measure hook_z or hook_result (per head, flattened) instead.")
    if not (activation.ndim == 3 or (activation.ndim == 4 and site in PER_HEAD)):
        raise ValueError(f"hook {name}: its activation has shape {shape}, neither [batch, pos, d] nor, at a per-head "
                         f"site ({', '.join(PER_HEAD[:5])}), [batch, pos, head, d_head]; measure a per-token hook "
                         "such as resid_post, mlp_post or attn_out instead.")
    t_shape = tuple(getattr(tokens, "shape", ()))
    if activation.ndim == 4 and t_shape and shape[1] != t_shape[-1]:
        raise ValueError(f"hook {name}: its activation {shape} has {shape[1]} positions but the tokens of this "
                         f"forward have shape {t_shape}: not a [batch, pos, ...] activation of these tokens (or "
                         "tokens of another forward were given).")


def keep_mask(activation: Tensor, attention_mask: Tensor | None, skip_bos: bool) -> Bool[Tensor, "batch pos"]:
    """The positions of ``activation`` attended (``attention_mask``), minus the first attended one when
    ``skip_bos``; a new tensor, on the activation's device."""
    if activation.ndim < 2:
        raise ValueError(f"expected an activation [batch, pos, ...], got shape {tuple(activation.shape)}.")
    (b, p), dev = activation.shape[:2], activation.device
    with torch.inference_mode(False):  # usable outside inference mode too
        keep = torch.ones(b, p, dtype=torch.bool, device=dev)
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).to(dev)
            if tuple(mask.shape) != (b, p):
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)} but the activation is [batch={b}, pos={p}, "
                    "...]; pass the mask of the tokens of this forward."
                )
            keep &= mask.bool()
        if skip_bos and p > 0:
            first = keep.int().argmax(dim=1) if attention_mask is not None else torch.zeros(b, dtype=torch.long)
            keep[torch.arange(b, device=dev), first.to(dev)] = False
    return keep


def rows(activation: Tensor, skip_bos: bool, attention_mask: Tensor | None = None,
         keep: Bool[Tensor, "batch pos"] | None = None) -> Tensor:
    """A float32 copy ``[n_kept, features]`` of the positions of ``keep`` (default :func:`keep_mask`) of
    ``activation``; without a mask and ``keep``, a slice (no boolean indexing, so no wait for the device)."""
    act = activation.detach()
    feats = act.reshape(*act.shape[:2], math.prod(act.shape[2:]))  # not -1: ambiguous for empty batches
    with torch.inference_mode(False):  # state built here must be usable outside inference mode too
        if attention_mask is None and keep is None and act.ndim >= 2:  # every position, or all but BOS
            first = int(skip_bos and act.shape[1] > 0)
            return feats[:, first:].reshape(-1, feats.shape[2]).to(torch.float32, copy=True)
        keep = keep_mask(act, attention_mask, skip_bos) if keep is None else keep
        return feats[keep].to(torch.float32).clone()


def check_width(name: str, rows: Tensor, d_in: int | None) -> None:
    """Raise if hook ``name``'s learner, of width ``d_in`` (None: not yet known), cannot take ``rows``."""
    if d_in is not None and rows.shape[0] and rows.shape[1] != d_in:
        raise ValueError(f"hook {name}: its learner has d_in={d_in} but this activation has {rows.shape[1]} "
                         "features per position (a different model or hook?).")


def own_copy(tensor: Tensor | None) -> Tensor | None:
    """A copy of ``tensor`` (None stays None) usable outside inference mode, sharing no storage with the model's."""
    if tensor is None:
        return None
    with torch.inference_mode(False):
        return tensor.clone()
