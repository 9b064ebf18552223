"""The rows a hook keeps from an activation ``[batch, pos, ...]``: the attended positions minus BOS, flattened to
``[kept positions, features]`` and copied as float32 (``SparsityCollector.keep_mask`` and ``.rows``)."""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool
from torch import Tensor

__all__ = ["keep_mask", "rows"]


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
