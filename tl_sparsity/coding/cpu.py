"""Learner options for a CPU, where one forward's learning must stay a few seconds (a notebook cell, a command).

With the defaults (learner batches of 1 024 rows and 7 replay steps at d = 576, 15 at small widths: 8–16 dictionary
steps per 1 024 rows, so that a GPU run converges in few model tokens) a learner batch at d = 576 costs tens of
seconds on a 2-core CPU. There a forward is cheap next to the learning it completes, so the rule below takes 8
dictionary steps per 1 024 rows — as many as the defaults at d = 576, half of them at small widths — at a quarter of
the coding work there (2 coding passes over each row instead of 8; 16 at small widths). Measured, with the command:
``docs/cpu.md``.

The rule applies only where neither option is given; GPU defaults are unchanged. ``tl-sparsity run --device cpu``
and every collector whose learners live on a CPU (its ``device=``, else its model's) apply it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CPU_OPTIONS", "cpu_options"]

#: Learner batch and replay steps on a CPU: 4 batches × (1 + 1) steps per 1 024 rows (by default 1 × (1 + 15)).
CPU_OPTIONS = {"batch_size": 256, "replay": 1}


def cpu_options(device: Any = "cpu", given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The learner options to add on ``device``: :data:`CPU_OPTIONS` on a CPU when ``given`` (the options already
    chosen) sets neither ``batch_size`` nor ``replay``; else nothing."""
    given = given or {}
    on_cpu = str(device).split(":")[0] == "cpu"
    return dict(CPU_OPTIONS) if on_cpu and not set(CPU_OPTIONS) & set(given) else {}
