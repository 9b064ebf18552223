"""Checkpoints of learners and collectors — safetensors for tensors, JSON for the rest, no pickle — written
atomically and verified on load. One learner's file is built by :mod:`tl_sparsity.coding.state_io`; crash-safe
writes and :func:`defer_interrupts` (re-exported here), which keeps a Ctrl-C from landing mid-update, are in
:mod:`tl_sparsity.coding.safe_io`.

Learner file (``*.safetensors``): tensors ``dictionary``, ``mean``, ``adam_m``, ``adam_v``, ``reservoir`` (the filled
rows), ``rng_state`` (the learner's CPU generator), ``pending`` (rows of the unfinished batch); the header's metadata
key ``tl_sparsity`` holds JSON: format marker, version, constructor parameters, counters, scalars (scale, λ, Adam
learning rate, step cap) the sha256 of the tensors' bytes, the sha256 of the JSON itself and, in a collector's checkpoint, the hook name.

Collector checkpoint root (the ``dir`` of ``col.save(dir)`` and of ``col.fit(..., checkpoint_dir=dir)``)::

    dir/LATEST                     {"checkpoint": "ckpt-000007", "manifest_sha256": "..."}
    dir/ckpt-000007/manifest.json  model identity, hooks, d_in per hook, options (learner, controls, neurons,
                                   neuron_options), fit progress, sha256 of each file
    dir/ckpt-000007/hook_000.safetensors ...
    dir/ckpt-000007/extra_000.safetensors ...  per hook with side statistics: covariance (``cov.mean``,
                                   ``cov.scatter``) and neuron-statistics tensors (``neurons.*``); JSON as for learners
    dir/ckpt-000006/...            the previous checkpoint

A new checkpoint is written into a temporary folder beside the others, every file fsynced, renamed into place, and
only then does ``LATEST`` (replaced atomically) point to it; the two newest are kept, and temporary files a killed
writer left (``.<name>.tmp-*``, over a minute old) are removed. A crash at any moment leaves
the previous checkpoint loadable, and a damaged file fails its sha256 check with an error that names it.

This module writes checkpoints; :mod:`tl_sparsity.tl.resume` reads, verifies and loads them (its functions are
re-exported here), and :mod:`tl_sparsity.tl.checkpoint_layout` holds what both share.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..coding.safe_io import clean_stale as _clean_stale
from ..coding.safe_io import defer_interrupts
from ..coding.safe_io import fsync_dir as _fsync_dir
from ..coding.safe_io import sha256 as _sha
from ..coding.safe_io import write_atomic as _write_atomic
from ..coding.safe_io import write_synced as _write
from ..coding.state_io import (
    COLLECTOR_FORMAT,
    EXTRAS_FORMAT,
    VERSION,
    CheckpointError,
    _pack,
    learner_bytes,
    learner_state,
    restore_learner,
)
from . import hooks as _hooks
from .checkpoint_layout import exists, fingerprint, options, seq, side_config
from .resume import check_model, load_collector, read_collector, resume_fit

__all__ = ["learner_state", "restore_learner", "save_collector", "read_collector", "load_collector", "resume_fit",
           "check_model", "check_not_a_file", "exists", "defer_interrupts", "fingerprint", "CheckpointError"]


def save_collector(col: Any, root: str | Path, fit: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write a checkpoint of ``col`` under ``root`` (see the module docstring); returns its folder."""
    root = Path(root)
    check_not_a_file(root)
    root.mkdir(parents=True, exist_ok=True)
    number = max([seq(p) for p in root.glob("ckpt-*")] + [0]) + 1
    final = root / f"ckpt-{number:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        files, extras = {}, {}
        for i, (name, lr) in enumerate(col.learners.items()):
            data = learner_bytes(lr, hook=name)
            files[name] = {"file": f"hook_{i:03d}.safetensors", "sha256": _sha(data), "bytes": len(data)}
            _write(tmp / files[name]["file"], data)
            ex = col.extras[name]
            if ex.cov is not None or ex.neurons is not None:
                tensors, meta = ex.state()
                data = _pack(tensors, {"format": EXTRAS_FORMAT, "version": VERSION, **meta})
                extras[name] = {"file": f"extra_{i:03d}.safetensors", "sha256": _sha(data), "bytes": len(data)}
                _write(tmp / extras[name]["file"], data)
        manifest = {"format": COLLECTOR_FORMAT, "version": VERSION, "model": _hooks.model_info(col.model),
                    "hooks": list(col.learners), "d_in": {n: lr.d_in for n, lr in col.learners.items()},
                    "skip_bos": col.skip_bos, "options": options(col.learner_options), **side_config(col),
                    "fit": fit, "files": files, "extras": extras}
        mbytes = json.dumps(manifest, indent=1).encode()
        _write(tmp / "manifest.json", mbytes)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / "LATEST", json.dumps({"checkpoint": final.name, "manifest_sha256": _sha(mbytes)}).encode())
    for old in sorted(root.glob("ckpt-*"), key=seq)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".ckpt-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    _clean_stale(root)
    return final


def check_not_a_file(root: str | Path) -> None:
    """Raise :class:`NotADirectoryError` when ``root``, or a folder above it, is a file: a collector's checkpoints
    go in a folder."""
    root = Path(root)
    for p in (root, *root.parents):
        if p.is_file():
            where = "" if p == root else f" (it would hold {root})"
            folder = p.with_suffix("") if p.suffix else p.with_name(f"{p.name}_collector")
            raise NotADirectoryError(
                f"{p} is a file{where}; a collector is saved to a folder (it holds the ckpt-* checkpoint folders): "
                f"pass a folder path, such as {folder}. One hook's learner alone saves to a file: "
                "col.learners[hook].save(path).")
