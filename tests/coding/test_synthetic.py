import math

import pytest
import torch

from tl_sparsity.coding.synthetic import CovarianceMatchedGaussian, Gaussian, IsotropicCauchy, Rademacher, SparseLinear


def test_sparse_linear_statistics_match_the_paper_recipe():
    d, a = 64, 8
    src = SparseLinear(d, a, sigma=0.1, seed=0)
    assert src.truth == 4 and src.features.shape == (4 * d, d)
    torch.testing.assert_close(src.features.norm(dim=1), torch.ones(4 * d))
    x = torch.cat(list(src.batches(40000, chunk=7000)))
    assert x.shape == (40000, d)
    assert x.mean(0).abs().max() < 0.02  # centred by the exact mean
    assert abs(float(x.norm(dim=1).mean()) - 1) < 0.02  # average norm 1
    # sparsity level: with σ = 0, E‖x_raw − μ‖² = Σ_i Var(c_i) = m_true·(p/3 − p²/4), p = a/m_true
    clean = SparseLinear(d, a, sigma=0.0, seed=0)
    raw = clean._draw(40000, torch.Generator().manual_seed(1)) - clean.shift
    p = a / (4 * d)
    want = 4 * d * (p / 3 - p * p / 4)
    assert abs(float(raw.pow(2).sum(1).mean()) / want - 1) < 0.03


def test_sparse_linear_noise_has_variance_a_sigma2_over_d():
    d, a, sigma = 32, 4, 0.5
    noisy = SparseLinear(d, a, sigma=sigma, seed=3)
    clean = SparseLinear(d, a, sigma=0.0, seed=3)
    # same generator stream for coefficients, so the difference (in raw units) is the noise
    diff = noisy._draw(20000, torch.Generator().manual_seed(0)) - clean._draw(20000, torch.Generator().manual_seed(0))
    assert abs(float(diff.var()) - a * sigma**2 / d) < 0.05 * a * sigma**2 / d


def test_streams_are_reproducible_by_seed():
    a = torch.cat(list(SparseLinear(16, 4, seed=1).batches(1000, chunk=1000)))
    b = torch.cat(list(SparseLinear(16, 4, seed=1).batches(1000, chunk=1000)))
    c = torch.cat(list(SparseLinear(16, 4, seed=2).batches(1000, chunk=1000)))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("cls", [Gaussian, Rademacher])
def test_identity_covariance_controls(cls):
    d = 32
    x = cls(d, seed=0).sample(50000)
    assert abs(float(x.norm(dim=1).mean()) - 1) < 0.01
    cov = torch.cov(x.T) * d  # identity covariance scaled to mean norm 1 ⇒ cov ≈ I/d
    assert (cov - torch.eye(d)).abs().max() < 0.1


def test_rademacher_coordinates_take_two_values():
    x = Rademacher(8, seed=0).sample(100)
    assert x.unique().numel() == 2


def test_isotropic_cauchy_has_uniform_directions_and_heavy_tailed_norms():
    d = 16
    x = IsotropicCauchy(d, seed=0).sample(50000)
    u = x / x.norm(dim=1, keepdim=True)
    assert (torch.cov(u.T) * d - torch.eye(d)).abs().max() < 0.1
    norms = x.norm(dim=1)
    # the median of |Cauchy| is 1 (in raw units): the median/mean ratio of a heavy tail is far below a Gaussian's
    assert float(norms.median() / norms.mean()) < 0.5


def test_covariance_matched_gaussian_reproduces_the_given_covariance_up_to_scale():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, generator=g)
    cov = A @ A.T + 0.1 * torch.eye(8)
    src = CovarianceMatchedGaussian(torch.ones(8), cov, seed=0)
    x = src.sample(100000)
    emp = torch.cov(x.T.double())
    want = cov.double() / src.scale**2
    assert (emp - want).abs().max() < 0.03 * want.abs().max()
    assert x.mean(0).abs().max() < 0.02
    with pytest.raises(ValueError, match="need mean"):
        CovarianceMatchedGaussian(torch.zeros(3), cov)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="a must be"):
        SparseLinear(8, 0)
    with pytest.raises(ValueError, match="d must be"):
        Gaussian(0)
    assert math.isfinite(SparseLinear(8, 2).scale)


def test_sparse_linear_noise_of_variance_sigma2_over_d_when_it_does_not_scale_with_a():
    d, a, sigma = 32, 4, 0.5
    noisy = SparseLinear(d, a, sigma=sigma, seed=3, noise_scales_with_a=False)
    clean = SparseLinear(d, a, sigma=0.0, seed=3, noise_scales_with_a=False)
    diff = noisy._draw(20000, torch.Generator().manual_seed(0)) - clean._draw(20000, torch.Generator().manual_seed(0))
    assert abs(float(diff.var()) - sigma**2 / d) < 0.05 * sigma**2 / d
