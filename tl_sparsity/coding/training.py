"""The training step of :class:`~tl_sparsity.coding.learner.OnlineSparseCoder` (a part of that class).

Per fresh batch: split off the held-out rows (:mod:`.tracking`), normalise, then one dictionary step on the training
rows — code them (greedy pursuit, or the exact lasso), set λ ← ``lam_ratio`` × mean max coefficient while λ adapts,
take ``phi_steps`` Adam steps on Φ with the closed-form gradient −(2/n)·αᵀ(x − αΦ), tangent to the unit sphere, and
renormalise the rows (or another Φ-step, ``phi_optimizer``: :mod:`.phi_step`) — then the replay steps and the
convergence trace (:mod:`.tracking`). The first batch also allocates the state (:meth:`TrainingStep._init_state`).
``_mean_max`` and ``_phi_grad`` are the sums over the step's rows, which
:class:`tl_sparsity.scale.data_parallel.DataParallelCoder` takes over all ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backend import triton_applies
from .counts import Counted
from .bounds import normalise
from .options import rule_steps
from .phi_step import DECAY_START, accumulate, bcd_sweep, decayed_lr, forgetting
from .pursuit import default_max_steps, greedy_pursuit_torch, lasso_pursuit
from .rows import split_rows

__all__ = ["TrainingStep", "WARMUP_CAP"]

#: Most greedy steps per row while λ adapts. Those codes only set λ (from each row's largest coefficient, found in
#: the first steps) and drive the first Φ-steps; with a young dictionary and a λ still too small, uncapped pursuits
#: fit noise up to the 4·d cap (at d = 576 on a 2-core CPU: 4.5 s per batch of 1024 instead of ~0.5 s).
WARMUP_CAP = 64


class TrainingStep:
    """The state's allocation, the batch pipeline and the dictionary step of an online sparse coder; mixed into
    :class:`~tl_sparsity.coding.learner.OnlineSparseCoder`, whose attributes it uses."""

    # ------------------------------------------------------------------ state
    def _init_state(self, batch: Tensor) -> None:
        """Allocate the state; the normaliser, the dictionary's seed and λ's first guess come from ``batch``, the
        first batch's training rows (never its held-out rows). The generator ``_gen`` exists already."""
        d = batch.shape[1]
        self.d_in = d
        dev = batch.device
        self.mean_ = batch.mean(0) if self.center else torch.zeros(d, device=dev)
        scale = float((batch - self.mean_).norm(dim=1).mean())
        self.scale_ = scale if scale > 0 else 1.0
        m = max(1, int(round(self.expansion * d)))
        xn0 = (batch - self.mean_) / self.scale_
        if self.init == "data":  # random training rows (with replacement when m > batch) plus a little noise
            pick = torch.randint(0, batch.shape[0], (m,), generator=self._gen).to(dev)
            noise = torch.randn(m, d, generator=self._gen).to(dev)
            rows = xn0[pick]
            phi = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) + 0.1 * noise / math.sqrt(d)
        else:
            phi = torch.randn(m, d, generator=self._gen).to(dev)
        self.dictionary_ = phi / phi.norm(dim=1, keepdim=True)
        self.trace_.min_steps = rule_steps(self.min_steps, self.batch_size, m)  # the rule's, now that m is known
        self._adam_m = torch.zeros_like(self.dictionary_)
        self._adam_v = torch.zeros_like(self.dictionary_)
        self._lr = self.lr if self.lr is not None else 0.05 / math.sqrt(d)
        self._phi_t0: int | None = None  # the step λ first froze at (origin of "adam-decay" and "bcd" schedules)
        bcd = self.phi_optimizer == "bcd"  # Mairal's statistics A [m, m] and B [m, d]; empty otherwise
        self._bcd_a = torch.zeros((m, m) if bcd else (0, 0), device=dev)
        self._bcd_b = torch.zeros((m, d) if bcd else (0, d), device=dev)
        self._reservoir = torch.zeros(self.reservoir_size, d, device=dev)
        self._res_fill = 0
        self._probe = torch.zeros(self.probe_size, d, device=dev)
        self._probe_fill = 0
        self._replay_buf = torch.zeros(self._replay_alloc, d, device=dev)
        self._replay_fill = self._replay_pos = 0
        self._cap = default_max_steps(d) if self.max_steps is None else int(self.max_steps)
        if self.lam is not None:
            self.lam_ = self.lam
        else:  # initial guess: the first greedy coefficient is about the largest correlation
            self.lam_ = self.lam_ratio * float((xn0 @ self.dictionary_.T).max(dim=1).values.clamp_min(0).mean())
            self.lam_ = max(self.lam_, 1e-6)

    # ------------------------------------------------------------------ one batch
    def _process(self, batch: Tensor) -> None:
        x = self._prepare(batch)
        if x.shape[0]:
            self._train(x, x.shape[0])

    def _prepare(self, batch: Tensor) -> Tensor:
        """Split off a batch's held-out rows (first: nothing learns from them), set aside its massive rows
        (:mod:`.massive`), normalise, keep the held-out rows; returns the training rows (normalised)."""
        held = self._heldout_mask(batch.shape[0])
        if self.dictionary_ is None:
            self._init_state(self._set_massive_norm(split_rows(batch, held)[1]))
        batch, held = self._without_massive(batch, held)
        heldout, x = split_rows(normalise(batch, self.mean_, self.scale_), held)
        self._add_heldout(heldout)
        return x

    def _train(self, x: Tensor, n_total: int) -> None:
        """One fresh batch: code the training rows ``x``, adapt λ during warm-up, take the Φ-steps, then the replay
        steps and the convergence trace. ``n_total``: the rows of this step over all processes (``x.shape[0]`` here;
        more in :class:`tl_sparsity.scale.data_parallel.DataParallelCoder`)."""
        self._step(x, n_total)
        self.n_tokens_ += n_total
        self._after_batch(x, n_total)

    def _step(self, x: Tensor, n_total: int) -> None:
        """One dictionary update from rows ``x``: code, adapt λ while it adapts, take ``phi_steps`` Φ-steps."""
        warm = self.lam_adapting
        gram = self._gram() if warm else None  # λ's warm-up codes the rows twice with one dictionary
        alpha = self._code(x, warm, gram)
        if self.solver == "greedy" and not warm:
            self._count_capped(self._last_capped)
        if warm:
            mean_max = self._mean_max(alpha, n_total)
            if mean_max > 0:
                self.lam_ = self.lam_ratio * mean_max
                alpha = self._code(x, warm, gram)
        for _ in range(self.phi_steps):
            self._phi_step(x, alpha, n_total)

    # ------------------------------------------------------------------ codes
    def _gram(self) -> Tensor | None:
        """The dictionary's Gram matrix ΦΦᵀ where the torch pursuit will code rows (else ``None``), for callers that
        code several batches with one dictionary: on a CPU at d = 576 it costs about as much as coding 256 rows."""
        dic = self.dictionary_
        if self.solver != "greedy" or triton_applies(dic, dic):
            return None
        return dic @ dic.T

    def _code(self, xn: Tensor, warm: bool = False, gram: Tensor | None = None) -> Tensor:
        """Codes of normalised rows ``xn``. ``warm``: a training step while λ adapts, whose pursuit stops after
        :data:`WARMUP_CAP` steps and whose capped rows are not counted. ``gram``: :meth:`_gram` of the current
        dictionary, when the caller has it."""
        cap = min(self._cap, WARMUP_CAP) if warm else self._cap
        if self.solver == "lasso":
            return lasso_pursuit(xn, self.dictionary_, self.lam_)
        if triton_applies(xn, self.dictionary_):  # one kernel launch, no host sync
            from .kernels import greedy_pursuit_triton

            alpha, _, capped = greedy_pursuit_triton(xn, self.dictionary_, self.lam_, max_steps=cap)
            self._last_capped = capped.sum()  # a device tensor: counted without a sync
            return alpha
        alpha, info = greedy_pursuit_torch(xn, self.dictionary_, self.lam_, max_steps=cap, gram=gram,
                                           return_info=True)
        self._last_capped = info.capped
        return alpha

    capped_ = Counted("_capped", "Rows that stopped at ``max_steps`` (on CUDA counted on the device; reading this syncs "
                                 "once).")

    def _count_capped(self, count: int | Tensor) -> None:
        """Add a pursuit's capped rows: an int on the host, or a device tensor kept on the device (no sync)."""
        self._capped.add(count)

    # ------------------------------------------------------------------ the dictionary step
    def _mean_max(self, alpha: Tensor, n_total: int) -> float:
        """Mean over the step's rows of each row's largest coefficient (the adaptive λ rule's ‖α‖∞)."""
        return float(alpha.max(dim=1).values.mean())

    def _phi_grad(self, x: Tensor, alpha: Tensor, n_total: int) -> Tensor:
        """∇Φ of the mean ‖x − αΦ‖² over the step's rows, −(2/n)·αᵀ(x − αΦ), ``[m, d]`` (not yet tangent)."""
        if triton_applies(x, self.dictionary_):  # bf16 products, fp32 accumulation
            from .kernels import phi_products

            return phi_products(x, alpha, self.dictionary_)[1]
        return (-2.0 / x.shape[0]) * (alpha.T @ (x - alpha @ self.dictionary_))

    def _phi_step(self, x: Tensor, alpha: Tensor | None, n_total: int, grad: Tensor | None = None) -> None:
        """One Φ-step of ``phi_optimizer`` (:mod:`.phi_step`) from the codes ``alpha`` of rows ``x`` (or, for Adam,
        from ``grad``, their gradient, when given: :mod:`tl_sparsity.coding.grouped` forms it for several learners at
        once; block-coordinate descent then codes ``x`` again, as it needs the codes)."""
        if self.phi_optimizer == "bcd":
            self._bcd_step(x, self._code(x) if alpha is None else alpha, n_total)
            return
        phi = self.dictionary_
        grad = self._phi_grad(x, alpha, n_total) if grad is None else grad
        self.n_steps_ += 1
        lr = self._lr * self.trace_.rate_scale  # 1/10 per rate check so far (convergence)
        if self.phi_optimizer == "adam-decay":
            self._note_freeze()
            lr = decayed_lr(lr, self.n_steps_, None if self._phi_t0 is None else max(self._phi_t0, DECAY_START))
        if triton_applies(x, phi):  # one fused Adam-on-the-sphere kernel
            from .kernels import adam_sphere_step

            adam_sphere_step(phi, grad, self._adam_m, self._adam_v, lr, self.n_steps_)
            return
        grad -= (grad * phi).sum(1, keepdim=True) * phi  # tangent to the unit sphere
        b1, b2, eps = 0.9, 0.999, 1e-8
        t = self.n_steps_
        self._adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self._adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        mhat = self._adam_m / (1 - b1**t)
        vhat = self._adam_v / (1 - b2**t)
        phi -= lr * mhat / (vhat.sqrt() + eps)
        norms = phi.norm(dim=1, keepdim=True)
        phi /= torch.where(norms > 0, norms, torch.ones_like(norms))

    def _bcd_step(self, x: Tensor, alpha: Tensor, n_total: int) -> None:
        """Mairal's step: fold the step's rows into the statistics A, B (forgetting factor β), then one
        block-coordinate pass over the atoms (:mod:`.phi_step`)."""
        if getattr(self, "world", 1) > 1:
            raise NotImplementedError("phi_optimizer='bcd' keeps its statistics per process; data-parallel learners "
                                      "take phi_optimizer='adam' or 'adam-decay'.")
        self.n_steps_ += 1
        self._note_freeze()
        accumulate(self._bcd_a, self._bcd_b, x, alpha, n_total, forgetting(self.n_steps_, self._phi_t0))
        bcd_sweep(self.dictionary_, self._bcd_a, self._bcd_b)

    def _note_freeze(self) -> None:
        """Record, once, the step λ first froze at (``_phi_t0``: the decay's and the statistics' origin)."""
        if self._phi_t0 is None and not self.lam_adapting:
            self._phi_t0 = self.n_steps_
