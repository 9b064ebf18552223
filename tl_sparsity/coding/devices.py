"""Device checks at construction: ``device="cuda"`` on a machine without CUDA raises here, naming the fix, instead
of a bare ``AssertionError`` from torch at the first batch."""

from __future__ import annotations

from typing import Any

__all__ = ["check_device"]


def check_device(device: Any) -> None:
    """Raise ``ValueError`` when ``device`` (None, a string or a ``torch.device``) names a device this torch cannot
    use: CUDA without a CUDA build or GPU, a CUDA index past the GPUs present, or MPS where it is not available."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device torch knows ({e}); use e.g. 'cpu', 'cuda', 'cuda:1' or "
                         "'mps'.") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but torch.cuda.is_available() is False here (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): use device='cpu', or "
                             "run on a machine with an NVIDIA GPU and a CUDA build of torch.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those.")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device={device!r}, but MPS is not available here; use device='cpu'.")
