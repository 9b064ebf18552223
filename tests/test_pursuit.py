import pytest
import torch

from tl_sparsity import greedy_pursuit, greedy_pursuit_reference, lasso_pursuit
from tl_sparsity.pursuit import STOP_TOL


def _problem(n=40, d=16, m=48, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(m, d, generator=g, dtype=dtype)
    phi /= phi.norm(dim=1, keepdim=True)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return x, phi


@pytest.mark.parametrize("lam", [0.05, 0.3, 1.0])
def test_batched_greedy_equals_per_sample_reference_in_float64(lam):
    x, phi = _problem()
    ref, info_ref = greedy_pursuit_reference(x, phi, lam)
    fast, info = greedy_pursuit(x, phi, lam, return_info=True)
    assert torch.equal(ref != 0, fast != 0)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(info.steps, info_ref.steps)
    assert (fast >= 0).all()


def test_batched_greedy_float32_matches_reference_support_and_values():
    x, phi = _problem(n=200, d=32, m=128, dtype=torch.float32, seed=3)
    ref, _ = greedy_pursuit_reference(x, phi, 0.2)
    fast = greedy_pursuit(x, phi, 0.2)
    same_support = ((ref != 0) == (fast != 0)).all(dim=1)
    assert same_support.float().mean() > 0.97  # near-ties in the argmax may differ by rounding
    torch.testing.assert_close(fast[same_support], ref[same_support], rtol=1e-4, atol=1e-5)


def test_greedy_stop_rule_each_active_correlation_ends_at_half_lambda():
    x, phi = _problem(n=30)
    lam = 0.4
    alpha, info = greedy_pursuit(x, phi, lam, max_steps=100_000, return_info=True)
    assert info.capped == 0
    r = x - alpha @ phi
    corr = r @ phi.T
    # at termination no atom can take a positive step: every correlation ≤ λ/2 (up to the stop tolerance)
    assert (corr <= lam / 2 * (1 + STOP_TOL) + 1e-12).all()
    assert corr.max() > lam / 2 - 1e-9  # and the last atom chosen sits exactly at λ/2


def test_greedy_respects_max_steps_and_counts_capped_rows():
    x, phi = _problem(n=25)
    alpha, info = greedy_pursuit(x, phi, 1e-4, max_steps=3, return_info=True)
    assert int(info.steps.max()) == 3
    assert info.capped == 25
    ref, info_ref = greedy_pursuit_reference(x, phi, 1e-4, max_steps=3)
    torch.testing.assert_close(alpha, ref)
    assert info_ref.capped == 25


def test_greedy_on_a_single_atom_is_soft_thresholded_projection():
    phi = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[3.0, -1.0], [0.1, 0.05]], dtype=torch.float64)
    alpha = greedy_pursuit(x, phi, 1.0)
    torch.testing.assert_close(alpha, torch.tensor([[2.5, 0.0], [0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_lasso_pursuit_satisfies_kkt_conditions(lam):
    x, phi = _problem(n=20, d=12, m=30)
    alpha = lasso_pursuit(x, phi, lam, tol=1e-8, max_iter=20000)
    grad = 2 * (alpha @ phi - x) @ phi.T + lam  # ∂/∂α of ‖x − αΦ‖² + λ‖α‖₁ on α ≥ 0
    assert (alpha >= 0).all()
    active = alpha > 0
    assert grad[active].abs().max() < 1e-6
    assert (grad[~active] >= -1e-6).all()


def test_lasso_objective_is_no_worse_than_greedy():
    x, phi = _problem(n=20, d=12, m=30)
    lam = 0.2

    def obj(a):
        return ((x - a @ phi) ** 2).sum(1) + lam * a.sum(1)

    assert (obj(lasso_pursuit(x, phi, lam, tol=1e-9)) <= obj(greedy_pursuit(x, phi, lam)) + 1e-9).all()


def test_bad_shapes_and_lambda_raise_clear_errors():
    x, phi = _problem()
    with pytest.raises(ValueError, match="must match"):
        greedy_pursuit(x[:, :5], phi, 0.1)
    with pytest.raises(ValueError, match="Flatten"):
        greedy_pursuit(x[None], phi, 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        lasso_pursuit(x, phi, -1.0)
    with pytest.raises(ValueError, match="compact_every"):
        greedy_pursuit(x, phi, 0.1, compact_every=0)
