"""A learner's full state as one safetensors file — tensors, plus JSON (format marker, version, constructor
parameters, counters, scalars, sha256 of the tensors, sha256 of that JSON) in the header — and back. No pickle.
Collector checkpoints (:mod:`tl_sparsity.tl.checkpoint`) are built from these files. A file is verified before it is
used: both checksums (files written before the JSON's checksum existed have only the tensors'), then every field's
type and range.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .safe_io import write_atomic
from .convergence import ConvergenceTrace
from .options import _NORMALISE, _OPTIONAL, LearnerOptions, replay_buffer, rule_steps

__all__ = ["CheckpointError", "saved_params", "learner_state", "restore_learner", "learner_bytes", "learner_from_bytes",
           "save_learner", "read_learner"]

LEARNER_FORMAT, COLLECTOR_FORMAT, EXTRAS_FORMAT, VERSION = ("tl_sparsity.learner", "tl_sparsity.collector",
                                                            "tl_sparsity.extras", 1)
_COUNTERS = ("n_tokens_", "n_heldout_", "n_steps_", "n_dropped_", "capped_")
#: Counters that files written before them lack (read as 0).
_NEWER_COUNTERS = ("n_massive_",)


class CheckpointError(ValueError):
    """A checkpoint is unreadable, damaged, or does not fit the model / collector it is loaded into."""


def learner_state(lr: Any, copy: bool = True, hook: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)``: a learner's full state; ``meta`` is JSON-able. ``copy=False`` shares the live tensors;
    ``hook`` (a collector's learner) is recorded in ``meta``, so a file loaded into another hook is caught."""
    state: dict[str, Any] = {k: getattr(lr, k) for k in _COUNTERS + _NEWER_COUNTERS}
    tensors: dict[str, Tensor] = {}
    if lr._n_pending:
        tensors["pending"] = torch.cat(lr._pending)
    if lr.initialized:
        state.update(scale_=lr.scale_, lam_=lr.lam_, lr_=lr._lr, cap=lr._cap, res_fill=lr._res_fill,
                     lam_frozen=not lr.lam_adapting, device=str(lr.dictionary_.device),
                     probe_fill=lr._probe_fill, replay_fill=lr._replay_fill, replay_pos=lr._replay_pos,
                     trace=lr.trace_.state(),
                     massive_norm=None if math.isinf(lr.massive_norm_) else lr.massive_norm_)
        if lr._phi_t0 is not None:  # "adam-decay" once λ froze: the step its rate decays from
            state["phi_t0"] = lr._phi_t0
        tensors.update(dictionary=lr.dictionary_, mean=lr.mean_, adam_m=lr._adam_m, adam_v=lr._adam_v,
                       reservoir=lr._reservoir[: lr._res_fill], rng_state=lr._gen.get_state(),
                       probe=lr._probe[: lr._probe_fill], replay=lr._replay_buf[: lr._replay_fill])
        if lr.phi_optimizer == "bcd":  # Mairal's statistics (phi_step)
            tensors.update(bcd_a=lr._bcd_a, bcd_b=lr._bcd_b)
    if hasattr(lr, "parallel_state"):  # a data-parallel learner: its place in the ranks' shared stream
        state["data_parallel"] = lr.parallel_state()
    tensors = {k: (v.detach().clone() if copy else v.detach()) for k, v in tensors.items()}
    device = None if lr.device is None else str(lr.device)
    meta = {"format": LEARNER_FORMAT, "version": VERSION, "params": lr.get_params(), "device": device,
            "state": state}
    return tensors, meta if hook is None else {**meta, "hook": hook}


def restore_learner(lr: Any, tensors: dict[str, Tensor], meta: dict[str, Any],
                    device: str | torch.device | None = None) -> Any:
    """Overwrite ``lr``'s state with a saved one. Its parameters must equal the saved ones (``d_in`` may be None)."""
    _check_params(lr, meta, "restore")
    saved, st = meta["params"], meta["state"]
    dev = torch.device(device or lr.device or st.get("device") or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"the learner state lives on {dev}, and CUDA is not available: pass device='cpu'.")
    if hasattr(lr, "restore_parallel_state"):
        lr.restore_parallel_state(st.get("data_parallel"))  # checks first: raises before anything changes
    on = {k: v.to(dev, copy=True) for k, v in tensors.items() if k != "rng_state"}  # never share the caller's
    lr.d_in = saved["d_in"]
    for k in _COUNTERS:
        setattr(lr, k, int(st[k]))
    for k in _NEWER_COUNTERS:
        setattr(lr, k, int(st.get(k, 0)))
    norm = st.get("massive_norm")
    lr.massive_norm_ = math.inf if norm is None else float(norm)
    lr._pending = [on["pending"]] if "pending" in on else []
    lr._n_pending = on["pending"].shape[0] if "pending" in on else 0
    lr.dictionary_ = None
    if "dictionary" in on:
        lr.dictionary_, lr.mean_, lr._adam_m, lr._adam_v = on["dictionary"], on["mean"], on["adam_m"], on["adam_v"]
        lr.scale_, lr.lam_, lr._lr, lr._cap = st["scale_"], st["lam_"], st["lr_"], int(st["cap"])
        lr._res_fill = int(st["res_fill"])
        lr._reservoir = torch.zeros(lr.reservoir_size, lr.d_in, device=dev)
        lr._reservoir[: lr._res_fill] = on["reservoir"]
        lr._gen = torch.Generator(device="cpu")
        lr._gen.set_state(tensors["rng_state"].cpu())
        lr._probe_fill = int(st.get("probe_fill", 0))  # files from before the trace have no probe
        lr._probe = torch.zeros(lr.probe_size, lr.d_in, device=dev)
        lr._probe[: lr._probe_fill] = on.get("probe", lr._probe[:0])
        lr._replay_fill, lr._replay_pos = int(st.get("replay_fill", 0)), int(st.get("replay_pos", 0))
        lr._replay_buf = torch.zeros(lr._replay_alloc, lr.d_in, device=dev)
        saved = on.get("replay", lr._replay_buf[:0])
        if lr._replay_fill < lr._replay_buf.shape[0] and lr._replay_pos != lr._replay_fill:
            # a full ring saved with a smaller buffer (replay_size=None meant 8 × batch_size before the 16 MiB
            # floor): oldest row first, so that new rows fill the rest before any saved row is overwritten
            saved, lr._replay_pos = saved.roll(-lr._replay_pos, 0), lr._replay_fill
        lr._replay_buf[: lr._replay_fill] = saved
        lr._phi_t0 = None if st.get("phi_t0") is None else int(st["phi_t0"])  # files from before it: no decay yet
        m = lr.dictionary_.shape[0] if lr.phi_optimizer == "bcd" else 0
        lr._bcd_a = on.get("bcd_a", torch.zeros(m, m, device=dev))
        lr._bcd_b = on.get("bcd_b", torch.zeros(m, lr.d_in, device=dev))
    lr.trace_ = lr._new_trace()
    if "trace" in st:
        lr.trace_.load_state(st["trace"])
    return lr


def _tensors_sha(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _meta_sha(meta: dict[str, Any]) -> str:
    """sha256 of ``meta``'s canonical JSON (sorted keys, no spaces), its ``meta_sha256`` left out."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _pack(tensors: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    """One safetensors file's bytes: ``tensors`` (CPU) and ``meta`` as JSON in the header, with the sha256 of the
    tensors and the sha256 of that JSON (tensors' sha256 included), so an edit of either is caught on load."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = json.loads(json.dumps({**meta, "tensors_sha256": _tensors_sha(tensors)}))  # as a reader will parse it
    return save(tensors, metadata={"tl_sparsity": json.dumps({**meta, "meta_sha256": _meta_sha(meta)})})


def _unpack(data: bytes, where: str, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Parse and verify :func:`_pack` output; ``where`` names the file and ``what`` its kind in errors."""
    from safetensors.torch import load

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["tl_sparsity"])
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 — any parse failure means the same thing to the user
        raise CheckpointError(f"{where} is not a readable tl_sparsity {what} file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is not a tl_sparsity {what} file: its header's JSON is a "
                              f"{type(meta).__name__}, not an object.")
    if _tensors_sha(tensors) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{where} is corrupt: its tensors do not match the sha256 recorded when it was saved.")
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_sha(meta):  # absent in files from before it existed
        raise CheckpointError(f"{where} is corrupt: its header's JSON does not match the sha256 recorded when it was "
                              "saved (edited by hand?).")
    return tensors, meta


def learner_bytes(lr: Any, hook: str | None = None) -> bytes:
    """A learner's state as the bytes of one safetensors file (its JSON in the header's metadata); ``hook``, a
    collector's hook name, is recorded in it."""
    return _pack(*learner_state(lr, copy=False, hook=hook))


def learner_from_bytes(data: bytes, where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Parse and verify :func:`learner_bytes` output (checksums, then every field's type and range); ``where``
    names the file in errors."""
    tensors, meta = _unpack(data, where, "learner")
    check_learner(tensors, meta, where)
    return tensors, meta


def save_learner(lr: Any, path: str | Path) -> Path:
    """Write learner ``lr`` to the file ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; a learner is saved to one file: pass a file path such as "
                                f"{path / 'learner.safetensors'}.")
    write_atomic(path, learner_bytes(lr))
    return path


def read_learner(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a file written by :func:`save_learner`, verified."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; a learner file is one file (OnlineSparseCoder.save's output); "
                                "a collector's folder loads with SparsityCollector.load(path, model).")
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"learner file {path} is missing.") from e
    return learner_from_bytes(data, str(path))


#: The options that learner files (and reports) written before each option existed imply by not recording it:
#: ``center`` True; no replay, the convergence rule's defaults and no λ or rate check after convergence (the one-pass
#: learner), no massive-row rule and the constant-rate Adam Φ-step.
IMPLIED_PARAMS: dict[str, Any] = {
    "center": True, "replay": 0, "replay_size": None, "warmup_steps": 100, "probe_size": 512, "tol": 0.02,
    "min_steps": 400, "lam_rounds": 0, "rate_checks": 0, "massive_ratio": None, "phi_optimizer": "adam"}


def saved_params(meta: dict[str, Any]) -> dict[str, Any]:
    """A learner file's constructor parameters, with :data:`IMPLIED_PARAMS` for those it does not record."""
    return {**IMPLIED_PARAMS, **meta["params"]}


def _check_params(lr: Any, meta: dict[str, Any], where: str) -> None:
    if meta.get("format") != LEARNER_FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{where}: not a version-{VERSION} tl_sparsity learner state "
                              f"(format {meta.get('format')!r}, version {meta.get('version')!r}).")
    saved, mine = saved_params(meta), lr.get_params()
    diff = [f"{k}: saved {saved.get(k)!r}, here {v!r}" for k, v in mine.items()
            if saved.get(k) != v and not (k == "d_in" and v is None)]
    if diff:
        raise CheckpointError(f"{where}: the learner was saved with other options — " + "; ".join(diff) + ".")




def check_learner(tensors: dict[str, Tensor], meta: dict[str, Any], where: str) -> None:
    """Raise :class:`CheckpointError` naming ``where`` and the field unless ``meta`` / ``tensors`` are a learner
    state of sound types and ranges: the parameters pass the learner's own validation, counters are integers ≥ 0,
    scalars positive and finite, buffer fills within their buffers, and tensor shapes agree with ``d_in``."""
    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}: field {field!r} of the learner state {why}.")

    def num(obj: dict, field: str, kind: type = int, low: float = 0, default: Any = None) -> Any:
        v = obj.get(field, default)
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            raise bad(field, f"must be {'a number' if kind is float else 'an integer'}, not {v!r}")
        if not (math.isfinite(v) and (v > low if kind is float else v >= low)):
            raise bad(field, f"is out of range: {v!r} (must be finite and {'>' if kind is float else '≥'} {low})")
        return v

    if meta.get("format") != LEARNER_FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{where}: not a version-{VERSION} tl_sparsity learner state "
                              f"(format {meta.get('format')!r}, version {meta.get('version')!r}).")
    for part in ("params", "state"):
        if not isinstance(meta.get(part), dict):
            raise bad(part, f"must be a JSON object, not {type(meta.get(part)).__name__}")
    if not isinstance(meta.get("hook", ""), str) or not isinstance(meta.get("device") or "", str):
        raise bad("hook", "and 'device' must be strings")
    params, st = saved_params(meta), meta["state"]
    for k, kind in _NORMALISE.items():
        if kind is int and not (params.get(k) is None and k in _OPTIONAL):
            num(params, k, low=-math.inf)
    try:
        opts = LearnerOptions(**params)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the saved learner parameters are invalid: {e}") from e
    for k in _COUNTERS:
        num(st, k)
    for k in _NEWER_COUNTERS:
        num(st, k, default=0)
    if st.get("massive_norm") is not None:
        num(st, "massive_norm", float)
    d = opts.d_in
    widths = {k: t.shape[-1] for k, t in tensors.items() if k not in ("rng_state", "bcd_a") and t.dim() == 2}
    if len(set(widths.values()) | ({d} if d is not None else set())) > 1 or "dictionary" in tensors and d is None:
        raise bad("d_in", f"({d!r}) does not match the tensors' widths {widths}")
    if "dictionary" not in tensors:
        return
    missing = sorted({"mean", "adam_m", "adam_v", "reservoir", "rng_state"} - set(tensors))
    if missing:
        raise bad("dictionary", f"comes without the tensors {missing}")
    dic = tensors["dictionary"]
    if dic.dim() != 2 or tensors["adam_m"].shape != dic.shape or tensors["adam_v"].shape != dic.shape or tuple(
            tensors["mean"].shape) != (d,):
        raise bad("dictionary", "has tensors of inconsistent shapes (dictionary, adam_m, adam_v, mean)")
    m = dic.shape[0] if opts.phi_optimizer == "bcd" else 0
    if any(k in tensors and tuple(tensors[k].shape) != s for k, s in (("bcd_a", (m, m)), ("bcd_b", (m, d)))):
        raise bad("bcd_a", f"and 'bcd_b' must be [{m}, {m}] and [{m}, {d}] (phi_optimizer={opts.phi_optimizer!r})")
    if st.get("phi_t0") is not None:
        num(st, "phi_t0")
    for k in ("scale_", "lam_", "lr_"):
        num(st, k, float)
    num(st, "cap", low=1)
    replay = replay_buffer(opts.replay, opts.replay_size, opts.batch_size, d or 1)
    for fill, name, size in (("res_fill", "reservoir", opts.reservoir_size), ("probe_fill", "probe", opts.probe_size),
                             ("replay_fill", "replay", replay)):
        n = num(st, fill, default=0)
        if n > size or (name in tensors or n) and tensors.get(name, dic[:0]).shape[0] != n:
            raise bad(fill, f"({n}) does not fit its buffer of {size} rows holding "
                            f"{tensors[name].shape[0] if name in tensors else 0} saved rows")
    if num(st, "replay_pos", default=0) >= max(size, 1):  # size: the replay buffer's, from the loop's last round
        raise bad("replay_pos", f"({st['replay_pos']}) is beyond the replay buffer of {size} rows")
    try:
        if "trace" in st:
            ConvergenceTrace(opts.tol, rule_steps(opts.min_steps, opts.batch_size, dic.shape[0]),
                             rate_checks=opts.rate_checks).load_state(st["trace"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise bad("trace", f"is invalid: {type(e).__name__}: {e}") from e
