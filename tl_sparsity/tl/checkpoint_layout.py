"""What writing and reading collector checkpoints share (the layout is described in
:mod:`tl_sparsity.tl.checkpoint`): the numbering of ``ckpt-*`` folders, whether a folder holds a checkpoint, how the
manifest records options and side statistics, the fingerprint of a batch, and the shapes of ``LATEST`` and of the
manifest (checked before either is used)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..coding.state_io import CheckpointError

__all__ = ["exists", "fingerprint", "options", "seq", "side_config", "check_latest", "check_manifest"]

_CKPT, _FILE = re.compile(r"ckpt-\d+"), re.compile(r"[\w.-]+\.safetensors")
#: The manifest's keys and their JSON types (those after ``fit`` may be missing in older checkpoints).
_MANIFEST = {"format": str, "version": int, "model": dict, "hooks": list, "d_in": dict, "skip_bos": bool,
             "options": dict, "files": dict, "fit": (dict, type(None)), "extras": dict, "controls": bool,
             "neurons": list, "neuron_options": dict}
_REQUIRED = ("format", "version", "model", "hooks", "d_in", "skip_bos", "options", "files")


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


def check_latest(data: Any, path: Path) -> dict[str, Any]:
    """``data``, the parsed ``LATEST`` file at ``path``, if it is ``{"checkpoint": "ckpt-N", "manifest_sha256":
    str}`` (the sha optional); else :class:`CheckpointError` naming the file."""
    if not isinstance(data, dict) or not isinstance(data.get("checkpoint"), str) or not _CKPT.fullmatch(
            data["checkpoint"]) or not isinstance(data.get("manifest_sha256", ""), str):
        raise CheckpointError(f"{path} is damaged: expected {{\"checkpoint\": \"ckpt-NNNNNN\", \"manifest_sha256\": "
                              f"\"...\"}}, found {str(data)[:120]!r}.")
    return data


def check_manifest(m: Any, path: Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the key unless manifest ``m`` has the keys and JSON types a
    checkpoint's manifest has (format and version are checked by the reader, after this)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is damaged or not a collector manifest: {what}.")

    if not isinstance(m, dict):
        raise bad(f"a JSON {type(m).__name__}, not an object")
    for k, kind in _MANIFEST.items():
        if (k in m or k in _REQUIRED) and (not isinstance(m.get(k), kind) or isinstance(m.get(k), bool) != (
                kind is bool)):
            raise bad(f"{k!r} is {str(m.get(k))[:60]!r}, expected a {getattr(kind, '__name__', 'dict or null')}")
    hooks = m["hooks"]
    if not all(isinstance(h, str) for h in hooks) or len(set(hooks)) != len(hooks):
        raise bad(f"'hooks' must be distinct hook names, found {str(hooks)[:120]}")
    if set(m["files"]) != set(hooks) or set(m["d_in"]) != set(hooks) or not set(m.get("extras", {})) <= set(hooks):
        raise bad("'files', 'd_in' and 'extras' must name the hooks of 'hooks'")
    for n, d in m["d_in"].items():
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise bad(f"'d_in' of hook {n} is {d!r}, expected a positive integer or null")
    for n, f in [*m["files"].items(), *m.get("extras", {}).items()]:
        if not (isinstance(f, dict) and isinstance(f.get("file"), str) and _FILE.fullmatch(f["file"])
                and isinstance(f.get("sha256"), str) and isinstance(f.get("bytes"), int)):
            raise bad(f"the file entry of hook {n} is {str(f)[:120]!r}, expected {{\"file\": \"<name>.safetensors\", "
                      "\"sha256\": str, \"bytes\": int}")
