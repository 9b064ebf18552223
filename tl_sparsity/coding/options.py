"""``LearnerOptions``: the options of an :class:`~tl_sparsity.coding.learner.OnlineSparseCoder`, in one place.

One field per constructor argument, with its default, its meaning (the string under each field, which
:func:`option_docs` reads back, e.g. for the command line's help) and, for the string options, its ``choices``
(field metadata); and all the checks in ``__post_init__``: an options object that exists is valid. The learner's
constructor builds one from its keyword arguments and takes its attributes from it; ``OnlineSparseCoder.get_params()``
returns the saved fields (all but ``device``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .convergence import ConvergenceTrace
from .phi_step import PHI_OPTIMIZERS

if TYPE_CHECKING:
    import torch

__all__ = ["LearnerOptions", "SOLVERS", "INITS", "PHI_OPTIMIZERS", "SAVED_FIELDS", "REPLAY_FLOATS", "option_docs",
           "replay_rows"]

SOLVERS = ("greedy", "lasso")
INITS = ("data", "random")


@dataclass(frozen=True)
class LearnerOptions:
    """Options of an online sparse coder (stored only; nothing is allocated until its first batch). Values are
    checked and normalised (``int``/``float``) on construction; ``dataclasses.replace`` checks again."""

    d_in: int | None = None
    """Row width; ``None`` infers it from the first batch."""
    expansion: float = 8
    """Dictionary size m = ``expansion`` × d_in (paper: 8)."""
    lam: float | None = None
    """Fixed λ; ``None`` (default) uses the adaptive rule during warm-up, then freezes it."""
    solver: str = field(default="greedy", metadata={"choices": SOLVERS})
    """``"greedy"`` (the paper's pursuit) or ``"lasso"`` (exact non-negative lasso; slow reference)."""
    seed: int = 0
    """Seeds the dictionary, the held-out split, the reservoir and the replay draws."""
    batch_size: int = 1024
    """Rows per batch taken from the stream (one dictionary step, plus ``replay`` steps)."""
    lr: float | None = None
    """Adam learning rate for Φ; ``None``: ``0.05/√d`` (entries of unit rows of width d are ~1/√d)."""
    warmup_tokens: int | None = None
    """If given, λ adapts during this many training rows instead of ``warmup_steps`` steps."""
    lam_ratio: float = 0.1
    """λ = ``lam_ratio`` × mean max coefficient (paper: 0.1)."""
    holdout_frac: float = 0.1
    """Fraction of rows never trained on, for evaluation."""
    reservoir_size: int = 8192
    """Most held-out rows kept (reservoir sampling over all held-out rows)."""
    max_steps: int | None = None
    """Cap on greedy steps per row (``None``: 4·d); rows that hit it are counted in ``capped_``."""
    phi_steps: int = 1
    """Adam steps on Φ per batch of codes."""
    device: str | torch.device | None = field(default=None, metadata={"saved": False})
    """Where the state lives; ``None`` uses the first batch's device. Not a saved parameter: ``get_params()`` and
    learner files leave it out, and a saved learner loads onto any device."""
    init: str = field(default="data", metadata={"choices": INITS})
    """``"data"`` seeds atoms with random normalised rows of the first batch (plus a little noise); ``"random"``
    draws them uniformly on the sphere."""
    center: bool = True
    """Subtract the first batch's mean. ``False`` keeps ``mean_ = 0``, for rows that are already centred by their
    exact mean (the synthetic sources): the sample mean of heavy-tailed rows does not converge, and for the
    isotropic-Cauchy control it shifts every row by a vector as long as the median row
    (``benchmarks/cauchy_study.py``)."""
    replay: int | None = None
    """Extra dictionary steps per batch, each on ``batch_size`` rows drawn (with replacement) from the replay
    buffer; 0 is the plain one-pass online learner. Held-out rows never enter the buffer. ``None``: 15 where the
    buffer holds at least 32 learner batches (d ≤ 128 with the defaults), else 7 — measured in
    ``docs/convergence.md``: 15 reaches the d = 64 synthetic values in 2–3 times fewer tokens than 7; on SmolLM2-135M
    (d = 576, a buffer of 8 batches) 7 converged the middle residual layers in half the time, at the same values."""
    replay_size: int | None = None
    """Rows the replay buffer keeps (the most recent training rows); ``None``: 8 × ``batch_size`` or a 16 MiB
    buffer (2²² floats: 65 536 rows at d = 64, 16 384 at d = 256), whichever holds more rows."""
    warmup_steps: int = 100
    """Dictionary steps during which λ adapts (then it is frozen)."""
    probe_size: int = 512
    """Held-out rows (the first ones) on which the convergence trace is measured."""
    tol: float = 0.02
    """The convergence rule's tolerance: converged once the held-out normalized loss moved by at most ``tol``
    (relative) over the last half of at least ``min_steps`` dictionary steps, and swung by at most 2.5·``tol``
    within it, all with λ frozen (:mod:`tl_sparsity.coding.convergence`)."""
    min_steps: int | None = None
    """The fewest dictionary steps the convergence rule judges (see ``tol``); no rate check comes earlier. ``None``:
    enough steps for 768 rows per atom (3 456 steps of 1 024 rows at d = 576, expansion 8), at least 400. On
    SmolLM2-135M's residual stream a first rate check at step 800 left values 13–17 % above those of a check at
    step 3 200, which runs of 11 000–26 000 steps reproduce to about 1 % (``docs/convergence.md``)."""
    lam_rounds: int = 6
    """How many times λ may be re-estimated after it froze (the paper's "repeat a couple of rounds"): at each
    doubling of the dictionary steps since it froze (steps 200, 400, 800, … with the default warm-up), λ's fixed point
    ``lam_ratio`` × mean max coefficient is recomputed on training rows with the learned dictionary; if it moved by
    more than ``tol``, the new λ is set and convergence is judged afresh from there. A hook is converged only once a
    check in the last half of its steps found λ where it is (or the re-estimates are spent). 0 keeps λ frozen after
    warm-up."""
    rate_checks: int = 3
    """How many times the dictionary's rate may be cut to check a verdict (:mod:`tl_sparsity.coding.convergence`):
    when the held-out trace is flat, the rate is divided by 10 and training goes on; the hook is converged once the
    trace is flat again and the cut moved its level by at most ``tol``, else the rate is cut again. A constant rate
    settles above the level a smaller one reaches (6–20 % on SmolLM2-135M), so without the check "converged" means
    "settled at this rate". 0 skips it (a flat trace is converged). Not used by ``phi_optimizer="bcd"``, which has no
    rate."""
    massive_ratio: float | None = 3.0
    """Rows longer than ``massive_ratio`` × the 99th percentile of the first batch's training rows' norms are
    massive activations (attention sinks): kept out of learning and of every metric, counted in ``n_massive_``
    (:mod:`tl_sparsity.coding.massive`). ``None`` keeps every row."""
    phi_optimizer: str = field(default="adam", metadata={"choices": PHI_OPTIMIZERS})
    """The dictionary step (:mod:`tl_sparsity.coding.phi_step`): ``"adam"``, Adam on the unit sphere at the constant
    rate ``lr``; ``"adam-decay"``, the same with the rate ``lr``·√(t₀/t) after λ first froze at step t₀;
    ``"bcd"``, Mairal's block-coordinate descent on the sufficient statistics A = Σβ·αᵀα [m, m] and B = Σβ·αᵀx
    [m, d] (4·m·(m + d) more bytes per learner: 96 MB at d = 576; not for data-parallel learners)."""

    def __post_init__(self) -> None:
        init, solver, d_in, lam, lr = self.init, self.solver, self.d_in, self.lam, self.lr
        for name in _NUMERIC:  # ±Inf and NaN first: every check below assumes a finite number
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if init not in INITS:
            raise ValueError(f"init must be 'data' (random normalised first-batch rows) or 'random', got {init!r}.")
        if self.phi_optimizer not in PHI_OPTIMIZERS:
            raise ValueError(f"phi_optimizer must be one of {PHI_OPTIMIZERS}, got {self.phi_optimizer!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
        if d_in is not None and int(d_in) < 1:
            raise ValueError(f"d_in must be a positive integer or None, got {d_in!r}.")
        if not self.expansion > 0:
            raise ValueError(f"expansion must be > 0, got {self.expansion!r}.")
        if lam is not None and not lam > 0:
            raise ValueError(f"lam must be > 0 (or None for the adaptive rule), got {lam!r}.")
        if int(self.batch_size) < 2:
            raise ValueError(f"batch_size must be ≥ 2, got {self.batch_size!r}.")
        if not 0.0 <= self.holdout_frac < 1.0:
            raise ValueError(f"holdout_frac must be in [0, 1), got {self.holdout_frac!r}.")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}.")
        if not self.lam_ratio > 0:
            raise ValueError(f"lam_ratio must be > 0, got {self.lam_ratio!r}.")
        warmup_tokens, replay_size = self.warmup_tokens, self.replay_size
        if (int(self.reservoir_size) < 0 or (warmup_tokens is not None and int(warmup_tokens) < 0)
                or int(self.phi_steps) < 1):
            raise ValueError("reservoir_size and warmup_tokens must be ≥ 0 and phi_steps ≥ 1.")
        if ((self.replay is not None and int(self.replay) < 0) or (replay_size is not None and int(replay_size) < 1)
                or int(self.warmup_steps) < 0):
            raise ValueError(f"replay (or None) and warmup_steps must be ≥ 0 and replay_size ≥ 1 (or None), got replay="
                             f"{self.replay!r}, replay_size={replay_size!r}, warmup_steps={self.warmup_steps!r}.")
        if int(self.lam_rounds) < 0:
            raise ValueError(f"lam_rounds must be ≥ 0, got {self.lam_rounds!r}.")
        if self.massive_ratio is not None and not self.massive_ratio > 1:
            raise ValueError(f"massive_ratio must be > 1 (or None to keep every row), got {self.massive_ratio!r}.")
        if int(self.probe_size) < 8:
            raise ValueError(f"probe_size must be ≥ 8 held-out rows, got {self.probe_size!r}.")
        if self.min_steps is not None and int(self.min_steps) < 1:
            raise ValueError(f"min_steps must be ≥ 1 dictionary step, or None (enough for {ROWS_PER_ATOM} rows per "
                             f"atom, at least {MIN_STEPS}), got {self.min_steps!r}.")
        steps = MIN_STEPS if self.min_steps is None else self.min_steps
        ConvergenceTrace(self.tol, steps, rate_checks=self.rate_checks)  # validates the rule's options
        for name, kind in _NORMALISE.items():
            value = getattr(self, name)
            if not (value is None and name in _OPTIONAL):
                object.__setattr__(self, name, kind(value))

    def as_dict(self) -> dict[str, Any]:
        """Every field (``device`` included) by name, in order, as ``OnlineSparseCoder``'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: The fields stored as ``int``/``float``/``bool`` (``None`` stays ``None`` in those of :data:`_OPTIONAL`); the
#: others (``expansion``, ``solver``, ``lr``, ``max_steps``, ``device``, ``init``, ``phi_optimizer``) are kept as
#: given.
_NORMALISE: dict[str, type] = {
    "d_in": int, "lam": float, "seed": int, "batch_size": int, "warmup_tokens": int, "lam_ratio": float,
    "holdout_frac": float, "reservoir_size": int, "phi_steps": int, "center": bool, "replay": int,
    "replay_size": int, "warmup_steps": int, "probe_size": int, "tol": float, "min_steps": int, "lam_rounds": int,
    "rate_checks": int, "massive_ratio": float,
}
_OPTIONAL = ("d_in", "lam", "warmup_tokens", "replay", "replay_size", "massive_ratio", "min_steps")
#: The numeric fields, checked for finiteness before anything else.
_NUMERIC = ("d_in", "expansion", "lam", "seed", "batch_size", "lr", "warmup_tokens", "lam_ratio", "holdout_frac",
            "reservoir_size", "max_steps", "phi_steps", "replay", "replay_size", "warmup_steps", "probe_size", "tol",
            "min_steps", "lam_rounds", "rate_checks", "massive_ratio")


#: The fields ``get_params()`` returns and learner files record, in order: all but ``device``.
SAVED_FIELDS = tuple(f.name for f in dataclasses.fields(LearnerOptions) if f.metadata.get("saved", True))


#: The replay buffer's size when ``replay_size`` is None: at least this many float32 entries (16 MiB).
REPLAY_FLOATS = 2**22


def replay_rows(replay_size: int | None, batch_size: int, d: int) -> int:
    """Rows of the replay buffer for these options and row width ``d`` (see ``LearnerOptions.replay_size``)."""
    if replay_size is not None:
        return int(replay_size)
    return max(8 * int(batch_size), REPLAY_FLOATS // max(int(d), 1))


#: Replay steps when ``replay`` is None: many where the buffer holds at least REPLAY_BATCHES learner batches, else few.
REPLAY_MANY, REPLAY_FEW, REPLAY_BATCHES = 15, 7, 32


def replay_steps(replay: int | None, rows: int, batch_size: int) -> int:
    """Replay steps per learner batch for these options and a replay buffer of ``rows`` rows (see
    ``LearnerOptions.replay``)."""
    if replay is not None:
        return int(replay)
    return REPLAY_MANY if int(rows) >= REPLAY_BATCHES * int(batch_size) else REPLAY_FEW


def replay_buffer(replay: int | None, replay_size: int | None, batch_size: int, d: int) -> int:
    """Rows of the replay buffer a learner allocates: :func:`replay_rows`, or 0 where it takes no replay steps."""
    rows = replay_rows(replay_size, batch_size, d)
    return rows if replay_steps(replay, rows, batch_size) else 0


#: The convergence rule's fewest dictionary steps when ``min_steps`` is None: rows per atom, and a floor.
ROWS_PER_ATOM, MIN_STEPS = 768, 400


def rule_steps(min_steps: int | None, batch_size: int, n_atoms: int | None) -> int:
    """The fewest dictionary steps the convergence rule judges (see ``LearnerOptions.min_steps``); ``n_atoms`` None
    (no dictionary yet): the floor."""
    if min_steps is not None:
        return int(min_steps)
    return max(MIN_STEPS, -(-ROWS_PER_ATOM * int(n_atoms or 0) // int(batch_size)))


@functools.lru_cache(maxsize=1)
def option_docs() -> dict[str, str]:
    """Each field's documentation (the string under it in :class:`LearnerOptions`' source), one line each; empty
    where the source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(LearnerOptions)))
    except (OSError, TypeError):
        return {f.name: "" for f in dataclasses.fields(LearnerOptions)}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(LearnerOptions)}
