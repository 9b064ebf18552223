"""The paper's synthetic sparse-linear data (Appendix D) and its non-sparse controls, as seeded streams.

Every source has ``sample(n) -> [n, d]`` (float32, drawn from its own ``torch.Generator``) and
``batches(n_total, chunk)``; nothing holds the whole data set. Every source is scaled so that the average L2 norm of
its centred samples is 1 (measured once on a calibration draw of ``calibration`` samples from an independent
generator, then fixed), as the paper does before comparing data sets.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["COEF_LAWS", "SparseLinear", "Gaussian", "IsotropicCauchy", "Rademacher", "CovarianceMatchedGaussian"]


# coefficient laws of SparseLinear's active features: name -> mean (each has scale 1 in its own parameterisation)
COEF_LAWS = {"uniform": 0.5, "exponential": 1.0, "half-normal": (2 / torch.pi) ** 0.5,
             "log-normal": float(torch.tensor(0.5).exp()), "constant": 1.0}
_MEAN_SQ = {"uniform": 1 / 3, "exponential": 2.0, "half-normal": 1.0, "log-normal": float(torch.tensor(2.0).exp()),
            "constant": 1.0}  # E c² of each law


class _Source:
    d: int

    def __init__(self, d: int, seed: int, calibration: int) -> None:
        if int(d) < 1:
            raise ValueError(f"d must be a positive integer, got {d!r}.")
        self.d = int(d)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self.shift = torch.zeros(self.d)
        self.scale = 1.0
        cal = self._draw(int(calibration), torch.Generator().manual_seed(self.seed + 7_919))
        self.shift = self._centre(cal)
        self.scale = float((cal - self.shift).norm(dim=1).mean())

    def _centre(self, cal: Tensor) -> Tensor:
        return torch.zeros(self.d)

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:  # raw, unscaled samples
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:
        """``n`` fresh samples ``[n, d]``, centred and scaled to average norm ≈ 1."""
        return (self._draw(int(n), self._gen) - self.shift) / self.scale

    def batches(self, n_total: int, chunk: int = 4096) -> Iterator[Tensor]:
        """Yield ``n_total`` samples in chunks of at most ``chunk`` rows."""
        done = 0
        while done < n_total:
            k = min(chunk, n_total - done)
            yield self.sample(k)
            done += k


class SparseLinear(_Source):
    """x = Σ_i c_i f_i + noise: m_true = ``n_features`` (default 4d) unit features uniform on the sphere, each c_i ~
    U(0, 1) with probability a/m_true else 0; Gaussian noise of variance a·σ²/d per coordinate (times 3·E c² for laws other than
    uniform: the same signal-to-noise ratio) (``PAPER.md``'s
    reading; ``noise_scales_with_a=False``: σ²/d, the convention under which the paper's Fig. 1a is reproduced
    within 3 %, see the README); centred (by the exact mean, (a·E c/m_true)·Σ f_i) and scaled. Ground-truth sparsity
    is ``a/2`` (:attr:`truth`); the expected number of active features per sample is ``a`` (:attr:`count`).

    ``law`` picks the active coefficients' law (:data:`COEF_LAWS`): ``"uniform"`` U(0, 1) (the paper's),
    ``"exponential"`` Exp(1), ``"half-normal"`` |N(0, 1)|, ``"log-normal"`` exp(N(0, 1)), ``"constant"`` 1.
    """

    def __init__(self, d: int, a: float, sigma: float = 0.1, n_features: int | None = None, seed: int = 0,
                 calibration: int = 16384, noise_scales_with_a: bool = True, law: str = "uniform") -> None:
        if law not in COEF_LAWS:
            raise ValueError(f"law must be one of {sorted(COEF_LAWS)}, got {law!r}.")
        self.law = law
        m_true = 4 * int(d) if n_features is None else int(n_features)
        if not 0 < a <= m_true:
            raise ValueError(f"a must be in (0, n_features={m_true}], got {a!r}.")
        if sigma < 0:
            raise ValueError(f"sigma must be ≥ 0, got {sigma!r}.")
        self.a, self.sigma, self.n_features = float(a), float(sigma), m_true
        # per coordinate; other laws scale the noise by their coefficients' RMS over U(0, 1)'s (1/√3), so every law
        # has the uniform law's signal-to-noise ratio
        self.noise_var = (self.a if noise_scales_with_a else 1.0) * self.sigma**2 / int(d) * 3 * _MEAN_SQ[law]
        g = torch.Generator().manual_seed(int(seed) + 104_729)
        f = torch.randn(m_true, int(d), generator=g)
        self.features = f / f.norm(dim=1, keepdim=True)
        super().__init__(d, seed, calibration)

    @property
    def truth(self) -> float:
        """The expected number of active features times their mean size (a/2 under the uniform law)."""
        return self.a * COEF_LAWS[self.law]

    @property
    def count(self) -> float:
        """The expected number of active features per sample: a."""
        return self.a

    def _centre(self, cal: Tensor) -> Tensor:
        return (self.a * COEF_LAWS[self.law] / self.n_features) * self.features.sum(0)

    def _coefficients(self, n: int, gen: torch.Generator) -> Tensor:
        shape = (n, self.n_features)
        if self.law == "uniform":
            return torch.rand(shape, generator=gen)
        if self.law == "exponential":
            return -torch.log1p(-torch.rand(shape, generator=gen))
        if self.law == "half-normal":
            return torch.randn(shape, generator=gen).abs()
        if self.law == "log-normal":
            return torch.randn(shape, generator=gen).exp()
        return torch.ones(shape)

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        p = self.a / self.n_features
        active = torch.rand(n, self.n_features, generator=gen) < p
        coef = self._coefficients(n, gen) * active
        noise = torch.randn(n, self.d, generator=gen) * self.noise_var**0.5
        return coef @ self.features + noise


class Gaussian(_Source):
    """Standard Gaussian (identity covariance), scaled to average norm 1 — the paper's main non-sparse control."""

    def __init__(self, d: int, seed: int = 0, calibration: int = 16384) -> None:
        super().__init__(d, seed, calibration)

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.randn(n, self.d, generator=gen)


class IsotropicCauchy(_Source):
    """Uniform direction times a |standard Cauchy| norm ("isotropic Gaussian with Cauchy-distributed norm").

    The Cauchy norm has no mean; the scale is the calibration draw's average norm, as with any finite sample.
    """

    def __init__(self, d: int, seed: int = 0, calibration: int = 16384) -> None:
        super().__init__(d, seed, calibration)

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        g = torch.randn(n, self.d, generator=gen)
        u = torch.rand(n, generator=gen)
        radius = torch.tan(torch.pi * (u - 0.5)).abs()
        return g / g.norm(dim=1, keepdim=True) * radius.unsqueeze(1)


class Rademacher(_Source):
    """Independent ±1 coordinates (identity covariance)."""

    def __init__(self, d: int, seed: int = 0, calibration: int = 16384) -> None:
        super().__init__(d, seed, calibration)

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.randint(0, 2, (n, self.d), generator=gen).float() * 2 - 1


class CovarianceMatchedGaussian(_Source):
    """Gaussian with a given mean and covariance (e.g. a hook's streamed statistics), then centred and scaled.

    ``cov`` must be symmetric positive semi-definite (negative eigenvalues from rounding are clipped to 0).
    """

    def __init__(self, mean: Tensor, cov: Tensor, seed: int = 0, calibration: int = 16384) -> None:
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = cov.shape[0]
        if cov.shape != (d, d) or torch.as_tensor(mean).shape != (d,):
            raise ValueError(f"need mean [d] and cov [d, d]; got {tuple(torch.as_tensor(mean).shape)}, "
                             f"{tuple(cov.shape)}.")
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.root = (evecs * evals.clamp_min(0).sqrt()).float()  # cov = root @ root.T
        super().__init__(d, seed, calibration)

    def _centre(self, cal: Tensor) -> Tensor:
        return self.mean

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.randn(n, self.d, generator=gen) @ self.root.T + self.mean
