"""Non-sparse controls for a hook: its streamed mean and covariance, and the same learner trained on a Gaussian with
that mean and covariance.

The control answers "is this hook sparser than a Gaussian with the same second-order statistics?": the
covariance-matched Gaussian has every linear property of the activations (and the same anisotropy, which on its own
lowers normalized loss) but no sparse structure. ``sparsity_ratio = control_normalized_loss / normalized_loss``; a
ratio of 5 reads "this hook is 5× sparser than a Gaussian with the same covariance".

Memory per hook: mean ``d`` + scatter ``d × d`` float64 (8·d·(d + 1) bytes; 2.7 MB at d = 576, 19 MB at d = 1536).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["StreamingCovariance", "control_metrics"]


class StreamingCovariance:
    """Mean and covariance of a stream of rows in float64, updated chunk by chunk (Chan et al.'s pairwise
    update, so the result does not depend on how the stream was chunked beyond float64 rounding) and mergeable.
    ``device`` holds the state and does the updates (a CUDA device keeps rows on the GPU); ``state_dict`` is on the CPU.
    """

    def __init__(self, d: int, device: str | torch.device = "cpu") -> None:
        if int(d) < 1:
            raise ValueError(f"d must be a positive integer, got {d!r}.")
        self.d = int(d)
        self.n = 0
        self.mean = torch.zeros(self.d, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(self.d, self.d, dtype=torch.float64, device=device)  # Σ (x − mean)(x − mean)ᵀ

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def update(self, x: Float[Tensor, "n d"]) -> "StreamingCovariance":
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected rows [n, {self.d}], got {tuple(x.shape)}.")
        if x.shape[0] == 0:
            return self
        x = x.detach().to(self.device, torch.float64)
        mean_b = x.mean(0)
        xc = x - mean_b
        self._combine(x.shape[0], mean_b, xc.T @ xc)
        return self

    def merge(self, other: "StreamingCovariance") -> "StreamingCovariance":
        if other.d != self.d:
            raise ValueError(f"cannot merge covariances of different sizes ({self.d} vs {other.d}).")
        if other.n:
            self._combine(other.n, other.mean.to(self.device), other.scatter.to(self.device))
        return self

    def _combine(self, n_b: int, mean_b: Tensor, scatter_b: Tensor) -> None:
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean
        self.scatter += scatter_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.mean += delta * (n_b / n)
        self.n = n

    def cov(self) -> Float[Tensor, "d d"]:
        """The unbiased covariance (divides by n − 1); needs at least 2 rows."""
        if self.n < 2:
            raise ValueError(f"need at least 2 rows for a covariance, have {self.n}.")
        return self.scatter / (self.n - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.to("cpu", copy=True), "scatter": self.scatter.to("cpu", copy=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean, scatter = torch.as_tensor(state["mean"]), torch.as_tensor(state["scatter"])
        if mean.shape != (self.d,) or scatter.shape != (self.d, self.d):
            raise ValueError(f"state is for d={mean.shape[0]}, this covariance has d={self.d}.")
        self.n = int(state["n"])
        self.mean = mean.to(self.device, torch.float64, copy=True)
        self.scatter = scatter.to(self.device, torch.float64, copy=True)


def control_metrics(stats: StreamingCovariance, learner_params: dict[str, Any], n_rows: int, seed: int = 0,
                    chunk: int = 16_384) -> dict[str, float]:
    """Train a fresh ``OnlineSparseCoder(**learner_params)`` on ``n_rows`` rows of the Gaussian with ``stats``'
    mean and covariance (the same options and the same number of rows as the hook's learner saw: trained plus
    held out) and return its held-out metrics (``OnlineSparseCoder.evaluate``)."""
    from ..coding.learner import OnlineSparseCoder
    from ..coding.synthetic import CovarianceMatchedGaussian

    if n_rows < 1:
        raise ValueError(f"n_rows must be positive, got {n_rows}.")
    src = CovarianceMatchedGaussian(stats.mean.cpu(), stats.cov().cpu(), seed=seed)
    coder = OnlineSparseCoder(**learner_params)
    device = learner_params.get("device")
    for x in src.batches(n_rows, chunk=chunk):
        coder.partial_fit(x if device is None else x.to(device))
    return coder.evaluate()
