"""Reading collector checkpoints (layout: :mod:`tl_sparsity.tl.checkpoint`): find the newest one, verify every file
against the manifest's sha256, check it fits the model and the collector, then load a new collector from it
(``SparsityCollector.load``) or restore a running one and skip the batches it had consumed (``fit``'s resume).
Every check runs before anything is changed."""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..coding.safe_io import sha256 as _sha
from ..coding.state_io import (
    COLLECTOR_FORMAT,
    EXTRAS_FORMAT,
    LEARNER_FORMAT,
    VERSION,
    CheckpointError,
    _check_params,
    _unpack,
    learner_from_bytes,
    restore_learner,
)
from . import hooks as _hooks
from .checkpoint_layout import check_latest, check_manifest, fingerprint, seq, side_config

__all__ = ["read_collector", "check_model", "load_collector", "resume_fit"]

_IDENTITY = ("model_class", "model_name", "n_layers", "d_model")
_LOAD_TAKES = "SparsityCollector.load takes the folder given to SparsityCollector.save or to fit(checkpoint_dir=...)"


def read_collector(root: str | Path) -> tuple[dict[str, Any], dict[str, bytes], Path]:
    """``(manifest, {file name: bytes}, folder)`` of the newest checkpoint under ``root`` (or of the checkpoint
    folder ``root``), every learner and extras file verified against its sha256."""
    root = Path(root)
    if root.is_file():
        raise _given_a_file(root)
    want = None
    if (root / "manifest.json").is_file():
        folder = root
    elif (root / "LATEST").is_file():
        latest = check_latest(_json(root / "LATEST"), root / "LATEST")
        folder, want = root / latest["checkpoint"], latest.get("manifest_sha256")
    else:
        found = sorted(root.glob("ckpt-*"), key=seq)
        if not found:
            missing = "" if root.exists() else f": {root} does not exist"
            raise CheckpointError(f"no checkpoint in {root} (expected LATEST, ckpt-* folders or manifest.json)"
                                  f"{missing}.")
        folder = found[-1]
    hint = _previous_hint(folder)
    mpath = folder / "manifest.json"
    mbytes = _read(mpath)
    if want is not None and _sha(mbytes) != want:
        raise CheckpointError(f"{mpath} is corrupt or truncated (its sha256 differs from the one in LATEST).{hint}")
    manifest = _json(mpath, mbytes)
    check_manifest(manifest, mpath)
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


def check_model(manifest: dict[str, Any], model: Any, where: str, stacklevel: int = 2) -> None:
    """Raise :class:`CheckpointError` naming each difference between the checkpoint's model and ``model``; also
    check every hook exists in ``model`` and, where the config gives it, has the saved width. Softer differences
    (compatibility mode, dtype) warn, at ``stacklevel`` counted from this function (2: its caller)."""
    saved, found = manifest["model"], _hooks.model_info(model)
    diff = [f"{k}: expected {saved.get(k)!r} (checkpoint), found {found.get(k)!r} (this model)"
            for k in _IDENTITY if saved.get(k) != found.get(k)]
    if diff:
        raise CheckpointError(f"{where} was saved from a different model — " + "; ".join(diff) + ".")
    soft = [f"{k}: {saved.get(k)!r} → {found.get(k)!r}" for k in ("compatibility_mode", "dtype")
            if saved.get(k) != found.get(k)]
    if soft:
        warnings.warn(f"{where}: the model differs from the saved one in " + ", ".join(soft) + "; activations will "
                      "differ from those the dictionaries were learned on.", stacklevel=stacklevel)
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


def load_collector(cls: Any, path: str | Path, model: Any, device: str | torch.device | None, **build: Any) -> Any:
    """A new collector of class ``cls`` on ``model`` from the checkpoint at ``path`` (``SparsityCollector.load``);
    ``build``: more arguments of ``cls`` (a parallel mode's process group)."""
    manifest, blobs, folder = read_collector(path)
    check_model(manifest, model, f"checkpoint {folder}", stacklevel=4)
    opts = dict(manifest["options"])
    if device is not None:
        opts["device"] = device
    nopts = dict(manifest.get("neuron_options", {}))
    if device is not None and "device" in nopts:
        nopts["device"] = device
    col = cls(model, hooks=manifest["hooks"], skip_bos=manifest["skip_bos"], controls=manifest.get("controls", False),
              neurons=manifest.get("neurons", []), neuron_options=nopts, **build, **opts)
    _check_side_config(manifest, col, f"checkpoint {folder}")
    learners, extras = _parsed(manifest, blobs, folder, col)
    extras = _loaded_extras(col, extras, device, f"checkpoint {folder}")
    for name, (tensors, meta) in learners.items():
        restore_learner(col.learners[name], tensors, meta, device)
        col.extras[name].restore(extras[name])
    if manifest.get("fit"):  # written by fit: what a subclass keeps beside its learners (a parallel mode's counts)
        col._restore_fit_state(manifest["fit"])
    return col


def resume_fit(col: Any, root: str | Path, batches: Iterator[Any], stacklevel: int = 2
               ) -> tuple[int, int, str | None, dict[str, Any]]:
    """Restore ``col`` from the checkpoint under ``root`` and skip the batches of ``batches`` it had consumed;
    returns ``(batches_done, start_tokens, last_batch_sha256, the manifest's fit record)``. Nothing is changed if a
    check fails. Warnings go to ``stacklevel`` counted from this function (2: its caller)."""
    manifest, blobs, folder = read_collector(root)
    where = f"checkpoint {folder}"
    check_model(manifest, col.model, where, stacklevel=stacklevel + 1)
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
    for i in range(done):
        batch = next(batches, None)
        if batch is None:
            warnings.warn(f"{where} had consumed {done} batches but the stream ended after {i}; nothing is left "
                          "to fit.", stacklevel=stacklevel)
            break
        if i == done - 1 and want is not None and fingerprint(*_hooks.split_batch(batch)) != want:
            raise CheckpointError(f"batch {i} of this stream differs from the one {where} was written after "
                                  "(sha256 mismatch): pass the same batches in the same order to resume, or "
                                  "use a new checkpoint_dir.")
    if col.n_tokens:
        warnings.warn(f"fit: resuming from {where}; the {col.n_tokens} tokens this collector held are replaced by "
                      "the checkpoint's state.", stacklevel=stacklevel)
    for name, (tensors, meta) in parsed.items():
        restore_learner(col.learners[name], tensors, meta)
        col.extras[name].restore(extras[name])
    start = int(fit["start_tokens"]) if "start_tokens" in fit else col.n_tokens
    return done, start, want, fit


def _parsed(manifest: dict[str, Any], blobs: dict[str, bytes], folder: Path, col: Any) -> tuple[dict, dict]:
    """Parse every learner and extras file and check them against the manifest and ``col``, before anything is
    changed: ``({hook: (tensors, meta)} of learners, {hook: (tensors, meta)} of side statistics)``."""
    out = {}
    for name, f in manifest["files"].items():
        tensors, meta = learner_from_bytes(blobs[f["file"]], str(folder / f["file"]))
        if meta.get("hook", name) != name:  # files from before the hook was recorded have none
            raise CheckpointError(f"{folder / f['file']} holds the learner of hook {meta['hook']}, but the manifest "
                                  f"lists it for hook {name}: the checkpoint's files were moved or renamed.")
        if meta["params"]["d_in"] != manifest["d_in"][name]:
            raise CheckpointError(f"{folder}: hook {name} has d_in={manifest['d_in'][name]} in the manifest but "
                                  f"{meta['params']['d_in']} in its learner file.")
        _check_params(col.learners[name], meta, f"{folder}, hook {name}")
        out[name] = (tensors, meta)
    extras = {}
    for name, f in manifest.get("extras", {}).items():
        where = str(folder / f["file"])
        tensors, meta = _unpack(blobs[f["file"]], where, "extras")
        if meta.get("format") != EXTRAS_FORMAT or meta.get("version") != VERSION or meta.get("hook") != name or any(
                k not in meta or not isinstance(meta[k], (dict, type(None))) for k in ("covariance", "neurons")):
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


def _check_side_config(manifest: dict[str, Any], col: Any, where: str) -> None:
    saved = {"controls": manifest.get("controls", False), "neurons": manifest.get("neurons", []),
             "neuron_options": manifest.get("neuron_options", {})}
    mine = side_config(col)
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
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{where}, hook {name}: its side statistics cannot be restored: {e!r}") from e
    return out


# ---------------------------------------------------------------------------------------------------- file helpers
def _given_a_file(path: Path) -> CheckpointError:
    """The error for a file passed where a checkpoint folder is read: what the file looks like, what to pass."""
    kind, folder = _file_format(path), path.parent
    if path.name in ("manifest.json", "LATEST") or kind == COLLECTOR_FORMAT:
        return CheckpointError(f"{path} is a file of a collector checkpoint, not its folder: pass the folder, "
                               f"SparsityCollector.load({str(folder)!r}, model).")
    if kind == EXTRAS_FORMAT:
        return CheckpointError(f"{path} is a file holding one hook's side statistics, not a collector checkpoint "
                               f"folder: pass the folder that holds it, SparsityCollector.load({str(folder)!r}, "
                               "model).")
    own = (f" (the collector checkpoint it belongs to loads with SparsityCollector.load({str(folder)!r}, model))"
           if (folder / "manifest.json").is_file() else "")
    if kind == LEARNER_FORMAT:
        return CheckpointError(f"{path} is a file, not a collector checkpoint folder: it looks like a learner file "
                               f"(OnlineSparseCoder.save's output), load it with OnlineSparseCoder.load"
                               f"({str(path)!r}){own}. {_LOAD_TAKES}.")
    if kind == "tl_sparsity.report":
        return CheckpointError(f"{path} is a file, not a collector checkpoint folder: it looks like a saved report, "
                               f"load it with SparsityReport.load({str(path)!r}). {_LOAD_TAKES}.")
    return CheckpointError(f"{path} is a file, not a collector checkpoint folder. {_LOAD_TAKES}.")


def _file_format(path: Path, limit: int = 1 << 26) -> str | None:
    """The tl_sparsity format marker of file ``path`` — of a safetensors header's metadata, or of a JSON file's
    ``format`` key — or None (another kind of file, unreadable, or over ``limit`` bytes)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            if 0 < n <= min(limit, size - 8):  # safetensors: an 8-byte length, then the JSON header
                try:
                    return json.loads(json.loads(f.read(n))["__metadata__"]["tl_sparsity"]).get("format")
                except (ValueError, KeyError, TypeError, AttributeError):
                    pass
            if head.lstrip()[:1] == b"{" and size <= limit:
                f.seek(0)
                data = json.loads(f.read())
                return data.get("format") if isinstance(data, dict) else None
    except (OSError, ValueError):
        pass
    return None


def _previous_hint(folder: Path) -> str:
    prev = [p for p in sorted(folder.parent.glob("ckpt-*"), key=seq) if seq(p) < seq(folder)]
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
