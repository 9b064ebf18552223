"""Moving rows without waiting for the device: host-built indices, copied through pinned memory."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_device", "split_rows"]


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor ``t`` on ``device``; to a CUDA device through pinned memory without waiting (no host sync)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def split_rows(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(x[mask], x[~mask])`` for a CPU bool ``mask`` [n], in order, by one ``index_select`` with a host-built
    index: no device sync (boolean indexing of a CUDA tensor waits for the device to count the rows). The two parts
    are views of one gathered tensor."""
    m = mask.numpy()
    picked = np.flatnonzero(m)
    both = x.index_select(0, to_device(torch.from_numpy(np.concatenate([picked, np.flatnonzero(~m)])), x.device))
    return both[: picked.size], both[picked.size :]
