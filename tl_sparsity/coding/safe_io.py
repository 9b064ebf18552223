"""Crash-safe file writes (fsync, write-then-rename) and :func:`defer_interrupts`, which holds a Ctrl-C back until
a block of state updates has completed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["sha256", "write_synced", "write_atomic", "fsync_dir", "defer_interrupts", "clean_stale"]

#: The names of :func:`write_atomic`'s temporary files: ``.<name>.tmp-`` and ``tempfile``'s 8 random characters.
_TEMP = re.compile(r"\..+\.tmp-[a-z0-9_]{8}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_deferring = threading.local()


@contextlib.contextmanager
def defer_interrupts() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) until the block ends, then deliver it — so the block's state updates complete.

    A no-op outside the main thread, and when nested. The block should be short (one batch of one learner).
    """
    if getattr(_deferring, "on", False) or threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    except (ValueError, OSError):  # not the main interpreter, or signals unavailable
        yield
        return
    old = signal.default_int_handler if old is None else old  # None: a handler not installed from Python
    _deferring.on = True
    try:
        yield
    finally:
        _deferring.on = False
        signal.signal(signal.SIGINT, old)
        if got:
            if callable(old):
                old(signal.SIGINT, None)
            elif old == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write_synced(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_stale(folder: Path, min_age: float = 60.0) -> list[Path]:
    """Remove the temporary files :func:`write_atomic` left in ``folder`` (a writer killed before its rename) that
    are over ``min_age`` seconds old — younger ones may belong to a live writer. Only regular files named by
    :func:`write_atomic`'s pattern are touched. Returns those removed."""
    import time

    removed = []
    for p in Path(folder).iterdir() if Path(folder).is_dir() else ():
        with contextlib.suppress(OSError):
            if _TEMP.fullmatch(p.name) and p.is_file() and not p.is_symlink() and (
                    time.time() - p.lstat().st_mtime > min_age):
                p.unlink()
                removed.append(p)
    return removed
