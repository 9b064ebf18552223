"""What writing and reading collector checkpoints share (the layout is described in
:mod:`tl_sparsity.tl.checkpoint`): the numbering of ``ckpt-*`` folders, whether a folder holds a checkpoint, how the
manifest records options and side statistics, and the fingerprint of a batch."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["exists", "fingerprint", "options", "seq", "side_config"]


def seq(p: Path) -> int:
    """The sequence number of checkpoint folder ``p`` (``ckpt-000007`` → 7; -1 for another name)."""
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def exists(root: str | Path) -> bool:
    """Whether ``root`` holds a collector checkpoint (a root with checkpoints, or one checkpoint folder)."""
    root = Path(root)
    return (root / "manifest.json").is_file() or (root / "LATEST").is_file() or any(root.glob("ckpt-*"))


def fingerprint(tokens: Any, mask: Any = None) -> str:
    """sha256 of a batch (tokens and mask), to check a resumed stream is the one the checkpoint saw."""
    h = hashlib.sha256()
    for part in (tokens, mask):
        if isinstance(part, Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def options(opts: dict[str, Any]) -> dict[str, Any]:
    """Options as the manifest records them (a device as its name)."""
    return {k: (str(v) if k == "device" and v is not None else v) for k, v in opts.items()}


def side_config(col: Any) -> dict[str, Any]:
    """What a collector keeps beside its learners, as the manifest records it."""
    return {"controls": col.controls, "neurons": list(col.neuron_hooks), "neuron_options": options(col.neuron_options)}
