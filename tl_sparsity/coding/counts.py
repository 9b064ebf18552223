"""A count a learner adds to on the host or on its device without waiting for the device: ``capped_`` (rows that
stopped at the pursuit's step cap), ``n_dropped_`` (rows the row rule rejected) and ``n_massive_`` (massive rows)
are :class:`Counted` attributes holding one."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DeviceCount", "Counted"]


class DeviceCount:
    """A non-negative count grown by host ints or by device tensors; device tensors are kept on their device (no
    host synchronisation) until the count is read with ``int()``, which synchronises once for all of them. They are
    summed :data:`FOLD` at a time (one launch per ``FOLD`` adds, not one per add: a grouped step adds one per hook)."""

    __slots__ = ("_host", "_device", "_parts")

    FOLD = 64

    def __init__(self, value: int = 0) -> None:
        self._host, self._device, self._parts = int(value), None, []

    def add(self, count: int | Tensor) -> None:
        if isinstance(count, Tensor):
            self._parts.append(count)
            if len(self._parts) >= self.FOLD:
                self._fold()
        else:
            self._host += int(count)

    def _fold(self) -> None:
        if self._parts:
            total = torch.stack([p.reshape(()) for p in self._parts]).sum()
            self._device = total if self._device is None else self._device + total
            self._parts = []

    def __int__(self) -> int:
        self._fold()
        if self._device is not None:
            self._host += int(self._device)
            self._device = None
        return self._host

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeviceCount) and int(self) == int(other)

    def __repr__(self) -> str:
        return f"DeviceCount({int(self)})"


class Counted:
    """A learner attribute read as an ``int`` and backed by a :class:`DeviceCount` in ``private`` (where the learner
    adds to it); assigning an int starts a new count."""

    def __init__(self, private: str, doc: str) -> None:
        self.private, self.__doc__ = private, doc

    def __get__(self, obj: object, owner: type | None = None) -> "int | Counted":
        return self if obj is None else int(getattr(obj, self.private))

    def __set__(self, obj: object, value: int) -> None:
        setattr(obj, self.private, DeviceCount(value))
