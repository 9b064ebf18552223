"""Learners of one shape trained together: one set of launches for k hooks' batches instead of k sets.

A collector feeds every hook the same rows per forward, so hooks of equal width reach full batches together. On a
GPU a learner's batch costs about thirty small launches that the host must queue (at learner batches of 4096 the
host, not the GPU, sets the pace), so :func:`train_together` takes one batch from each of k learners whose state
has the same shape and trains them in one pass: the dictionaries stacked, two batched GEMMs for the correlations,
one sort, one pursuit kernel over all k·n rows (each row reads its own dictionary's G), two batched GEMMs for the
Φ-step, then each learner's own Adam step. Each learner ends where training it alone would leave it, up to
float rounding: batched GEMMs may sum in another order than single ones (the tests bound the difference).

On an H100 (``benchmarks/bench_grouped.py``) 12 learners at d = 768 and batches of 4096 queue a round in 2.4–3.1 ms
of host time instead of 8.8–11.4 ms, and the round takes 11.2 ms instead of 12.3–13.0 ms (1.10–1.13×; 1.02× at
16 384). End to end (``benchmarks/bench_e2e.py``) it measured no different: there the model's forward, which the
learners' GPU work follows, sets the pace.

Replay steps are grouped too: after the fresh batch's step, the r-th replay step of every learner that takes one
is one pass (each learner draws its own rows from its own buffer with its own generator, so each takes the steps it
would take alone). With 10 learners at d = 576, batches of 1024 (921 training rows) and 7 replay steps, a round of
10 batches (80 steps) took 37–59 ms instead of 102–123 ms (2.3×; the dictionaries came out bit for bit the same;
``bench_grouped.py --n 1024 --k 10 --d 576 --rounds 8 --train-tokens 1048576``, one H100, 2026-12-07).

Learners train together only where it pays and the arithmetic is the single learner's: greedy solver, CUDA with
the Triton kernels, λ frozen (after warm-up, or fixed), one Φ-step per batch, the same d and m. Any other job
is trained alone, as before.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .learner import OnlineSparseCoder, to_device
from .backend import triton_applies
from .pursuit import STOP_TOL

__all__ = ["GROUP_BYTES", "group_key", "train_together"]

#: Most transient memory one grouped pass may take (stacked G in float16, correlations and codes, products; on a
#: GPU with less than 32 GiB, an eighth of its memory): a group needing more is trained in chunks. At d = 768
#: (m = 6144) and batches of 4096 a learner needs ~0.35 GB, so 12 hooks go in one pass; at d = 3072 (m = 24 576)
#: ~3 GB, one at a time.
GROUP_BYTES = 4 << 30


def group_key(learner: OnlineSparseCoder, x: Tensor, force: bool = False) -> tuple | None:
    """What learners must share to train together on rows ``x``; ``None`` if this one trains alone. ``force``
    drops the CUDA/Triton condition (the tests run the grouped arithmetic on the CPU)."""
    if (type(learner) is not OnlineSparseCoder or learner.solver != "greedy" or learner.phi_steps != 1
            or learner.lam_adapting
            or not (force or triton_applies(x, learner.dictionary_))):
        return None
    return (tuple(learner.dictionary_.shape), learner.dictionary_.device, learner._cap)


def train_together(jobs: Sequence[tuple[OnlineSparseCoder, Tensor]], force: bool = False) -> None:
    """Train each ``(learner, rows)`` job — one batch's normalised training rows — as ``learner._train(rows, n)``
    would, learners of one :func:`group_key` together: the fresh batch's step, then each replay step (each learner
    draws its own replay rows, in its own order, so the steps are the ones it would take alone). Jobs of one learner
    must not appear twice (its batches are sequential). ``force`` groups any learners of one shape (CPU included;
    for tests)."""
    together: list[tuple[OnlineSparseCoder, Tensor]] = []
    for learner, x in jobs:
        if x.shape[0] == 0:
            continue
        if group_key(learner, x, force) is None:
            learner._train(x, x.shape[0])
        else:
            together.append((learner, x))
    _steps_together(together, force)
    for learner, x in together:
        learner.n_tokens_ += x.shape[0]
    _after_together(together, force)


def _after_together(jobs: list[tuple[OnlineSparseCoder, Tensor]], force: bool) -> None:
    """Each learner's ``_after_batch`` (replay steps on rows from its replay buffer, the convergence trace), with the
    r-th replay step of every learner that takes one taken together."""
    replaying = []
    for learner, x in jobs:
        if learner._replay_n:
            learner._remember(x)
            replaying.append((learner, learner._replay_rows(x.shape[0])))
        learner._settle(x, x.shape[0])
    for r in range(max((lr._replay_n for lr, _ in replaying), default=0)):
        steps = []
        for learner, draws in replaying:
            if r < learner._replay_n:
                steps.append((learner, next(draws)))
        _steps_together(steps, force)
        for learner, rows in steps:
            learner._settle(rows, rows.shape[0])
    for learner, _ in jobs:
        if learner.on_batch is not None:
            learner.on_batch()


def _steps_together(jobs: list[tuple[OnlineSparseCoder, Tensor]], force: bool) -> None:
    """One dictionary step (``learner._step(rows, n)``) per job, learners of one :func:`group_key` in one pass
    (chunked to the memory budget)."""
    groups: dict[tuple, list[tuple[OnlineSparseCoder, Tensor]]] = {}
    for learner, x in jobs:
        key = group_key(learner, x, force)
        if key is None:  # e.g. λ moved back to adapting: not here (λ's checks keep it frozen), but alone is right
            learner._step(x, x.shape[0])
        else:
            groups.setdefault(key, []).append((learner, x))
    for group in groups.values():
        m, d = group[0][0].dictionary_.shape
        n = max(x.shape[0] for _, x in group)
        need = 2 * m * m + 8 * n * m + 12 * m * d + 12 * n * d  # transient bytes per learner in a grouped pass
        per = max(1, _budget(group[0][0].dictionary_.device) // need)
        for start in range(0, len(group), per):
            chunk = group[start : start + per]
            if len(chunk) == 1:
                learner, x = chunk[0]
                learner._step(x, x.shape[0])
            else:
                _step_group(chunk)


def _budget(device: torch.device) -> int:
    """:data:`GROUP_BYTES`, or an eighth of a smaller GPU's memory."""
    if device.type != "cuda":
        return GROUP_BYTES
    return min(GROUP_BYTES, torch.cuda.get_device_properties(device).total_memory // 8)


@torch.no_grad()
def _step_group(group: list[tuple[OnlineSparseCoder, Tensor]]) -> None:
    """One dictionary step for each learner of one :func:`group_key` on its rows, as ``learner._step`` takes it."""
    learners = [lr for lr, _ in group]
    sizes = [x.shape[0] for _, x in group]
    k, n = len(group), max(sizes)
    dev = learners[0].dictionary_.device
    d = learners[0].dictionary_.shape[1]
    if min(sizes) == n:  # the usual case: one stack
        x = torch.stack([rows for _, rows in group])
    else:
        x = torch.zeros(k, n, d, device=dev)  # rows past a set's own count stay zero: no step, α = 0, no gradient
        for h, (_, rows) in enumerate(group):
            x[h, : sizes[h]] = rows
    phi = torch.stack([lr.dictionary_ for lr in learners])  # [k, m, d]: the products read a copy
    if x.is_cuda and all(triton_applies(rows, lr.dictionary_) for lr, rows in group):
        from .kernels import grouped_codes

        lams = torch.tensor([[lr.lam_ / 2.0, STOP_TOL * lr.lam_ / 2.0] for lr in learners], dtype=torch.float32)
        alpha, capped = grouped_codes(x, phi, to_device(lams, dev), learners[0]._cap)
        counts = capped.sum(1)
        for h, lr in enumerate(learners):
            lr._count_capped(counts[h])
    else:  # the torch pursuit, one set at a time (CPU; exercised by the tests through force=True)
        alpha = torch.zeros(k, n, phi.shape[1], device=dev)
        for h, lr in enumerate(learners):
            alpha[h, : sizes[h]] = lr._code(x[h, : sizes[h]])
            lr._count_capped(lr._last_capped)
    from .kernels import phi_products

    scale = to_device(torch.tensor([-2.0 / s for s in sizes], dtype=torch.float32), dev)
    _, grad = phi_products(x, alpha, phi, scale=scale)
    for h, lr in enumerate(learners):
        lr._phi_step(x[h, : sizes[h]], None, sizes[h], grad=grad[h])
