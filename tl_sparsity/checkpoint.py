"""Checkpoints of learners and collectors — safetensors for tensors, JSON for the rest, no pickle — written
atomically and verified on load. One learner's file is built by :mod:`tl_sparsity.state_io`; crash-safe writes and
:func:`defer_interrupts` (re-exported here), which keeps a Ctrl-C from landing mid-update, are in
:mod:`tl_sparsity.safe_io`.

Learner file (``*.safetensors``): tensors ``dictionary``, ``mean``, ``adam_m``, ``adam_v``, ``reservoir`` (the filled
rows), ``rng_state`` (the learner's CPU generator), ``pending`` (rows of the unfinished batch); the header's metadata
key ``tl_sparsity`` holds JSON: format marker, version, constructor parameters, counters, scalars (scale, λ, Adam
learning rate, step cap) and the sha256 of the tensors' bytes.

Collector checkpoint root (the ``dir`` of ``col.save(dir)`` and of ``col.fit(..., checkpoint_dir=dir)``)::

    dir/LATEST                     {"checkpoint": "ckpt-000007", "manifest_sha256": "..."}
    dir/ckpt-000007/manifest.json  model identity, hooks, d_in per hook, options (learner, controls, neurons,
                                   neuron_options), fit progress, sha256 of each file
    dir/ckpt-000007/hook_000.safetensors ...
    dir/ckpt-000007/extra_000.safetensors ...  per hook with side statistics: covariance (``cov.mean``,
                                   ``cov.scatter``) and neuron-statistics tensors (``neurons.*``); JSON as for learners
    dir/ckpt-000006/...            the previous checkpoint

A new checkpoint is written into a temporary folder beside the others, every file fsynced, renamed into place, and
only then does ``LATEST`` (replaced atomically) point to it; the two newest are kept. A crash at any moment leaves
the previous checkpoint loadable, and a damaged file fails its sha256 check with an error that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .safe_io import defer_interrupts
from .safe_io import fsync_dir as _fsync_dir
from .safe_io import sha256 as _sha
from .safe_io import write_atomic as _write_atomic
from .safe_io import write_synced as _write
from .state_io import (
    COLLECTOR_FORMAT,
    EXTRAS_FORMAT,
    VERSION,
    CheckpointError,
    _check_params,
    _pack,
    _unpack,
    learner_bytes,
    learner_from_bytes,
    learner_state,
    restore_learner,
    saved_params,
)

__all__ = ["learner_state", "restore_learner", "save_learner", "load_learner", "save_collector", "read_collector",
           "load_collector", "resume_fit", "check_model", "defer_interrupts", "fingerprint", "CheckpointError"]

_IDENTITY = ("model_class", "model_name", "n_layers", "d_model")


def save_learner(lr: Any, path: str | Path) -> Path:
    """Write ``lr`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    _write_atomic(path, learner_bytes(lr))
    return path


def load_learner(path: str | Path, device: str | torch.device | None = None) -> Any:
    """A new :class:`OnlineSparseCoder` from a file written by :func:`save_learner`."""
    from .learner import OnlineSparseCoder

    path = Path(path)
    tensors, meta = learner_from_bytes(_read(path), str(path))
    lr = OnlineSparseCoder(**saved_params(meta), device=device or meta.get("device"))
    return restore_learner(lr, tensors, meta, device)


# ---------------------------------------------------------------------------------------------------- collectors
def save_collector(col: Any, root: str | Path, fit: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write a checkpoint of ``col`` under ``root`` (see the module docstring); returns its folder."""
    from . import hooks as _hooks

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seq = max([_seq(p) for p in root.glob("ckpt-*")] + [0]) + 1
    final = root / f"ckpt-{seq:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        files, extras = {}, {}
        for i, (name, lr) in enumerate(col.learners.items()):
            data = learner_bytes(lr)
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
                    "skip_bos": col.skip_bos, "options": _options(col.learner_options), **_side_config(col),
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
    for old in sorted(root.glob("ckpt-*"), key=_seq)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".ckpt-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def exists(root: str | Path) -> bool:
    """Whether ``root`` holds a collector checkpoint (a root with checkpoints, or one checkpoint folder)."""
    root = Path(root)
    return (root / "manifest.json").is_file() or (root / "LATEST").is_file() or any(root.glob("ckpt-*"))


def read_collector(root: str | Path) -> tuple[dict[str, Any], dict[str, bytes], Path]:
    """``(manifest, {file name: bytes}, folder)`` of the newest checkpoint under ``root`` (or of the checkpoint
    folder ``root``), every learner and extras file verified against its sha256."""
    root = Path(root)
    want = None
    if (root / "manifest.json").is_file():
        folder = root
    elif (root / "LATEST").is_file():
        latest = _json(root / "LATEST")
        folder, want = root / latest["checkpoint"], latest.get("manifest_sha256")
    else:
        found = sorted(root.glob("ckpt-*"), key=_seq)
        if not found:
            raise CheckpointError(f"no checkpoint in {root} (expected LATEST, ckpt-* folders or manifest.json).")
        folder = found[-1]
    hint = _previous_hint(folder)
    mpath = folder / "manifest.json"
    mbytes = _read(mpath)
    if want is not None and _sha(mbytes) != want:
        raise CheckpointError(f"{mpath} is corrupt or truncated (its sha256 differs from the one in LATEST).{hint}")
    manifest = _json(mpath, mbytes)
    if manifest.get("format") != COLLECTOR_FORMAT:
        raise CheckpointError(f"{mpath} is not a tl_sparsity collector checkpoint (format {manifest.get('format')!r}).")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{mpath}: checkpoint version {manifest.get('version')} is not supported "
                              f"(this tl_sparsity reads version {VERSION}).")
    blobs = {}
    for name, f in [*manifest["files"].items(), *manifest.get("extras", {}).items()]:
        data = _read(folder / f["file"])
        if len(data) != f["bytes"] or _sha(data) != f["sha256"]:
            raise CheckpointError(
                f"{folder / f['file']} (hook {name}) is corrupt or truncated: {len(data)} bytes with sha256 "
                f"{_sha(data)[:12]}…, the manifest records {f['bytes']} bytes with sha256 {f['sha256'][:12]}…."
                f"{hint}")
        blobs[f["file"]] = data
    return manifest, blobs, folder


def check_model(manifest: dict[str, Any], model: Any, where: str) -> None:
    """Raise :class:`CheckpointError` naming each difference between the checkpoint's model and ``model``; also
    check every hook exists in ``model`` and, where the config gives it, has the saved width."""
    import warnings

    from . import hooks as _hooks

    saved, found = manifest["model"], _hooks.model_info(model)
    diff = [f"{k}: expected {saved.get(k)!r} (checkpoint), found {found.get(k)!r} (this model)"
            for k in _IDENTITY if saved.get(k) != found.get(k)]
    if diff:
        raise CheckpointError(f"{where} was saved from a different model — " + "; ".join(diff) + ".")
    soft = [f"{k}: {saved.get(k)!r} → {found.get(k)!r}" for k in ("compatibility_mode", "dtype")
            if saved.get(k) != found.get(k)]
    if soft:
        warnings.warn(f"{where}: the model differs from the saved one in " + ", ".join(soft) + "; activations will "
                      "differ from those the dictionaries were learned on.", stacklevel=3)
    names = dict(model.hook_dict)
    missing = [n for n in manifest["hooks"] if n not in names]
    if missing:
        raise CheckpointError(f"{where}: hook(s) {missing} of the checkpoint do not exist in this model.")
    cfg = getattr(model, "cfg", None)
    for n, d in manifest["d_in"].items():
        site = _hooks.parse_hook_name(n)[1]
        key = "d_mlp" if site in ("mlp_pre", "mlp_post") else "d_model" if site in (
            "resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out", "embed") else None
        width = getattr(cfg, key, None) if key else None
        if d is not None and width is not None and int(width) != int(d):
            raise CheckpointError(f"{where}: hook {n} has d_in={d} in the checkpoint but this model's {key} is "
                                  f"{width}.")


def _parsed(manifest: dict[str, Any], blobs: dict[str, bytes], folder: Path, col: Any) -> tuple[dict, dict]:
    """Parse every learner and extras file and check them against the manifest and ``col``, before anything is
    changed: ``({hook: (tensors, meta)} of learners, {hook: (tensors, meta)} of side statistics)``."""
    out = {}
    for name, f in manifest["files"].items():
        tensors, meta = learner_from_bytes(blobs[f["file"]], str(folder / f["file"]))
        if meta["params"]["d_in"] != manifest["d_in"][name]:
            raise CheckpointError(f"{folder}: hook {name} has d_in={manifest['d_in'][name]} in the manifest but "
                                  f"{meta['params']['d_in']} in its learner file.")
        _check_params(col.learners[name], meta, f"{folder}, hook {name}")
        out[name] = (tensors, meta)
    extras = {}
    for name, f in manifest.get("extras", {}).items():
        where = str(folder / f["file"])
        tensors, meta = _unpack(blobs[f["file"]], where, "extras")
        if meta.get("format") != EXTRAS_FORMAT or meta.get("version") != VERSION or meta.get("hook") != name:
            raise CheckpointError(f"{where}: not a version-{VERSION} tl_sparsity extras file of hook {name} "
                                  f"(format {meta.get('format')!r}, version {meta.get('version')!r}, hook "
                                  f"{meta.get('hook')!r}).")
        ex = col.extras.get(name)
        if ex is None or (meta["covariance"] is not None and not ex.want_cov) or (
                meta["neurons"] is not None and not ex.want_neurons):
            raise CheckpointError(f"{where}: holds statistics of hook {name} that this collector does not keep.")
        diff = ex.config_diff(meta)
        if diff:
            raise CheckpointError(f"{where}: the neuron statistics were saved with other settings — "
                                  + "; ".join(diff) + ".")
        extras[name] = (tensors, meta)
    return out, extras


def _options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if k == "device" and v is not None else v) for k, v in options.items()}


def _side_config(col: Any) -> dict[str, Any]:
    """What a collector keeps beside its learners, as the manifest records it."""
    return {"controls": col.controls, "neurons": list(col.neuron_hooks), "neuron_options": _options(col.neuron_options)}


def _check_side_config(manifest: dict[str, Any], col: Any, where: str) -> None:
    saved = {"controls": manifest.get("controls", False), "neurons": manifest.get("neurons", []),
             "neuron_options": manifest.get("neuron_options", {})}
    mine = _side_config(col)
    for cfg in (saved, mine):
        cfg["neuron_options"] = {k: v for k, v in cfg["neuron_options"].items() if k != "device"}
    diff = [f"{k}: saved {saved[k]!r}, here {mine[k]!r}" for k in saved if saved[k] != mine[k]]
    if diff:
        raise CheckpointError(f"{where} was written by a collector built with other side statistics — "
                              + "; ".join(diff) + ". Build the collector with the same controls=, neurons= and "
                              "neuron_options=, or use another checkpoint_dir for a new run.")


def _loaded_extras(col: Any, extras: dict[str, tuple], device: str | torch.device | None, where: str) -> dict:
    """``{hook: (covariance, neuron stats)}`` rebuilt for every hook of ``col`` (None where none were saved)."""
    out = {}
    for name, ex in col.extras.items():
        try:
            out[name] = ex.loaded(*extras.get(name, ({}, None)), device)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{where}, hook {name}: its side statistics cannot be restored: {e}") from e
    return out


def load_collector(cls: Any, path: str | Path, model: Any, device: str | torch.device | None) -> Any:
    """A new collector of class ``cls`` on ``model`` from the checkpoint at ``path`` (``SparsityCollector.load``)."""
    manifest, blobs, folder = read_collector(path)
    check_model(manifest, model, f"checkpoint {folder}")
    opts = dict(manifest["options"])
    if device is not None:
        opts["device"] = device
    nopts = dict(manifest.get("neuron_options", {}))
    if device is not None and "device" in nopts:
        nopts["device"] = device
    col = cls(model, hooks=manifest["hooks"], skip_bos=manifest["skip_bos"], controls=manifest.get("controls", False),
              neurons=manifest.get("neurons", []), neuron_options=nopts, parallel=None, **opts)
    _check_side_config(manifest, col, f"checkpoint {folder}")
    learners, extras = _parsed(manifest, blobs, folder, col)
    extras = _loaded_extras(col, extras, device, f"checkpoint {folder}")
    for name, (tensors, meta) in learners.items():
        restore_learner(col.learners[name], tensors, meta, device)
        col.extras[name].restore(extras[name])
    return col


def resume_fit(col: Any, root: str | Path, batches: Iterator[Any]) -> tuple[int, int, str | None, dict[str, Any]]:
    """Restore ``col`` from the checkpoint under ``root`` and skip the batches of ``batches`` it had consumed;
    returns ``(batches_done, start_tokens, last_batch_sha256, the manifest's fit record)``. Nothing is changed if a
    check fails."""
    import warnings

    manifest, blobs, folder = read_collector(root)
    where = f"checkpoint {folder}"
    check_model(manifest, col.model, where)
    mine, saved = list(col.learners), manifest["hooks"]
    if mine != saved:
        raise CheckpointError(f"{where} has another hook set: expected {saved} (checkpoint), found {mine} (this "
                              f"collector); missing {sorted(set(saved) - set(mine))}, extra "
                              f"{sorted(set(mine) - set(saved))}. Use another checkpoint_dir for a new run.")
    if manifest["skip_bos"] != col.skip_bos:
        raise CheckpointError(f"{where} was written with skip_bos={manifest['skip_bos']}, this collector has "
                              f"skip_bos={col.skip_bos}.")
    _check_side_config(manifest, col, where)
    parsed, extras = _parsed(manifest, blobs, folder, col)
    extras = _loaded_extras(col, extras, None, where)
    fit = manifest.get("fit") or {}
    done, want = int(fit.get("batches_done", 0)), fit.get("last_batch_sha256")
    got = None
    for i in range(done):
        batch = next(batches, None)
        if batch is None:
            warnings.warn(f"{where} had consumed {done} batches but the stream ended after {i}; nothing is left "
                          "to fit.", stacklevel=3)
            break
        if i == done - 1 and want is not None:
            from .collector import _split_batch

            got = fingerprint(*_split_batch(batch))
            if got != want:
                raise CheckpointError(f"batch {i} of this stream differs from the one {where} was written after "
                                      "(sha256 mismatch): pass the same batches in the same order to resume, or "
                                      "use a new checkpoint_dir.")
    if col.n_tokens:
        warnings.warn(f"fit: resuming from {where}; the {col.n_tokens} tokens this collector held are replaced by "
                      "the checkpoint's state.", stacklevel=3)
    for name, (tensors, meta) in parsed.items():
        restore_learner(col.learners[name], tensors, meta)
        col.extras[name].restore(extras[name])
    start = int(fit["start_tokens"]) if "start_tokens" in fit else col.n_tokens
    return done, start, want, fit


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


# ---------------------------------------------------------------------------------------------------- file helpers
def _seq(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _previous_hint(folder: Path) -> str:
    prev = [p for p in sorted(folder.parent.glob("ckpt-*"), key=_seq) if _seq(p) < _seq(folder)]
    if not prev:
        return ""
    return (f" The previous checkpoint {prev[-1]} is untouched: load it with SparsityCollector.load('{prev[-1]}', "
            f"model), or delete {folder} and {folder.parent / 'LATEST'} to resume from it.")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {path} is missing.{_previous_hint(path.parent)}") from e


def _json(path: Path, data: bytes | None = None) -> dict[str, Any]:
    try:
        return json.loads(_read(path) if data is None else data)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt or truncated (not valid JSON: {e}).") from e
