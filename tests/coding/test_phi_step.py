"""The dictionary step's optimisers (``phi_optimizer``, :mod:`tl_sparsity.coding.phi_step`): Mairal's
block-coordinate pass against a plain loop, the decaying rate's values, and the state of each through a file."""

from __future__ import annotations

import math

import pytest
import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding import phi_step, state_io
from tl_sparsity.coding.options import LearnerOptions


def _plain_bcd(phi: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The textbook loop: for each atom j in order, u_j = (B_j − A_j·Φ)/A_jj + φ_j, φ_j = u_j/‖u_j‖ (float64);
    an atom with A_jj = 0 keeps φ_j."""
    phi = phi.double().clone()
    A, B = A.double(), B.double()
    for j in range(phi.shape[0]):
        if A[j, j] <= phi_step.DEAD * A.diagonal().max():
            continue
        u = (B[j] - A[j] @ phi) / A[j, j] + phi[j]
        phi[j] = u / u.norm()
    return phi


def test_bcd_sweep_by_hand():
    # Φ = I, A = [[2, 1], [1, 4]], B = [[2, 3], [1, 4 + 2]].
    # atom 0: u = (B_0 − A_0·Φ)/A_00 + φ_0 = ([2, 3] − [2, 1])/2 + [1, 0] = [1, 1]  →  φ_0 = [1, 1]/√2
    # atom 1 (with the new φ_0): A_1·Φ = 1·φ_0 + 4·[0, 1] = [s, s + 4], s = 1/√2;
    #   u = ([1, 6] − [s, s + 4])/4 + [0, 1] = [(1 − s)/4, (6 − s)/4]  →  φ_1 = u/‖u‖
    phi = torch.eye(2)
    A = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    B = torch.tensor([[2.0, 3.0], [1.0, 6.0]])
    phi_step.bcd_sweep(phi, A, B)
    s = 1 / math.sqrt(2)
    u = torch.tensor([(1 - s) / 4, (6 - s) / 4])
    assert torch.allclose(phi[0], torch.tensor([s, s]), atol=1e-6)
    assert torch.allclose(phi[1], u / u.norm(), atol=1e-6)


@pytest.mark.parametrize("m,block", [(150, 64), (37, 8), (5, 1)])
def test_bcd_sweep_equals_the_plain_loop_across_blocks_with_a_dead_atom(m, block):
    g = torch.Generator().manual_seed(m)
    d, n = 12, 400
    phi = torch.randn(m, d, generator=g)
    phi /= phi.norm(dim=1, keepdim=True)
    alpha = torch.rand(n, m, generator=g) * (torch.rand(n, m, generator=g) < 0.1)
    alpha[:, 3] = 0.0  # atom 3 unused: A_33 = 0, it keeps its row
    x = alpha @ torch.randn(m, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    A, B = torch.zeros(m, m), torch.zeros(m, d)
    phi_step.accumulate(A, B, x, alpha, n, 0.0)
    assert torch.allclose(A, alpha.T @ alpha / n) and torch.allclose(B, alpha.T @ x / n)
    want = _plain_bcd(phi, A, B)
    before = phi[3].clone()
    phi_step.bcd_sweep(phi, A, B, block=block)
    assert torch.equal(phi[3], before)
    assert torch.allclose(phi.double(), want, atol=2e-5)
    assert torch.allclose(phi.norm(dim=1), torch.ones(m), atol=1e-5)


def test_accumulate_forgets_by_beta():
    A, B = torch.ones(2, 2), torch.ones(2, 3)
    x, alpha = torch.ones(4, 3), torch.full((4, 2), 2.0)
    phi_step.accumulate(A, B, x, alpha, 4, 0.5)
    assert torch.equal(A, torch.full((2, 2), 0.5 + 4.0)) and torch.equal(B, torch.full((2, 3), 0.5 + 2.0))
    assert phi_step.forgetting(1, None) == 0.0 and phi_step.forgetting(7, None) == phi_step.WARM_BETA
    assert phi_step.forgetting(101, 100) == 0.0  # restarted at λ's freeze (step 100)
    assert phi_step.forgetting(102, 100, rho=1.0) == 0.5
    assert phi_step.forgetting(104, 100, rho=2.0) == pytest.approx(0.5625)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bcd_sweep_on_cuda_equals_the_cpu():
    g = torch.Generator().manual_seed(0)
    m, d = 200, 16
    phi = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    alpha = torch.rand(300, m, generator=g) * (torch.rand(300, m, generator=g) < 0.1)
    A, B = alpha.T @ alpha / 300, alpha.T @ torch.randn(300, d, generator=g) / 300
    on_gpu = phi.cuda()
    phi_step.bcd_sweep(on_gpu, A.cuda(), B.cuda())
    phi_step.bcd_sweep(phi, A, B)
    assert torch.allclose(on_gpu.cpu(), phi, atol=1e-4)


def test_decayed_lr_values():
    assert phi_step.decayed_lr(0.1, 50, None) == 0.1  # λ still adapts: constant
    assert phi_step.decayed_lr(0.1, 100, 100) == 0.1
    assert phi_step.decayed_lr(0.1, 400, 100) == pytest.approx(0.05)
    assert phi_step.decayed_lr(0.1, 10_000, 100) == pytest.approx(0.01)


def _rows(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3 * d, generator=g).clamp_min(0) @ torch.randn(3 * d, d, generator=g)


_SMALL = dict(batch_size=32, replay=1, warmup_steps=4, probe_size=8, reservoir_size=64, seed=1)


def test_adam_decay_follows_adam_until_its_start_then_decays():
    x = _rows(32 * 70)
    plain = OnlineSparseCoder(**_SMALL).partial_fit(x[: 32 * 50])  # 100 steps: 50 batches, one replay step each
    decay = OnlineSparseCoder(**_SMALL, phi_optimizer="adam-decay").partial_fit(x[: 32 * 50])
    assert decay.n_steps_ == 100 and decay._phi_t0 == 4  # λ froze at step 4; the rate decays from DECAY_START
    assert torch.equal(plain.dictionary_, decay.dictionary_)  # the same rate up to step t₀
    plain.partial_fit(x[32 * 50 :])
    decay.partial_fit(x[32 * 50 :])
    assert not torch.equal(plain.dictionary_, decay.dictionary_)


def test_options_check_the_choice():
    with pytest.raises(ValueError, match="phi_optimizer must be one of"):
        LearnerOptions(phi_optimizer="sgd")
    with pytest.raises(ValueError, match="phi_optimizer must be one of"):
        OnlineSparseCoder(phi_optimizer="mairal")
    assert OnlineSparseCoder().get_params()["phi_optimizer"] == "adam"


@pytest.mark.parametrize("optimizer", ["bcd", "adam-decay"])
def test_state_round_trip_continues_bit_for_bit(tmp_path, optimizer):
    x = _rows(32 * 60, seed=2)
    a = OnlineSparseCoder(**_SMALL, phi_optimizer=optimizer).partial_fit(x[: 32 * 55 + 5])
    path = a.save(tmp_path / "learner.safetensors")
    b = OnlineSparseCoder.load(path)
    assert b.phi_optimizer == optimizer and b._phi_t0 == a._phi_t0
    if optimizer == "bcd":
        m = a.dictionary_.shape[0]
        assert a._bcd_a.shape == (m, m) and float(a._bcd_a.abs().sum()) > 0
        assert torch.equal(b._bcd_a, a._bcd_a) and torch.equal(b._bcd_b, a._bcd_b)
    a.partial_fit(x[32 * 55 + 5 :])
    b.partial_fit(x[32 * 55 + 5 :])
    assert torch.equal(a.dictionary_, b.dictionary_)
    with pytest.raises(state_io.CheckpointError, match="saved with other options"):
        OnlineSparseCoder(**_SMALL).load_state_dict(a.state_dict())


def test_a_file_without_the_option_loads_as_constant_rate_adam(tmp_path):
    x = _rows(32 * 30, seed=3)
    a = OnlineSparseCoder(**_SMALL).partial_fit(x[: 32 * 20])
    tensors, meta = state_io.learner_state(a)
    del meta["params"]["phi_optimizer"]  # as written before the option existed
    path = tmp_path / "old.safetensors"
    path.write_bytes(state_io._pack(tensors, meta))
    b = OnlineSparseCoder.load(path)
    assert b.phi_optimizer == "adam"
    a.partial_fit(x[32 * 20 :])
    b.partial_fit(x[32 * 20 :])
    assert torch.equal(a.dictionary_, b.dictionary_)


def test_a_bcd_state_with_statistics_of_the_wrong_shape_is_refused():
    a = OnlineSparseCoder(**_SMALL, phi_optimizer="bcd").partial_fit(_rows(32 * 3))
    state = a.state_dict()
    state["tensors"]["bcd_a"] = state["tensors"]["bcd_a"][:-1]
    with pytest.raises(state_io.CheckpointError, match="bcd_a"):
        OnlineSparseCoder(**_SMALL, phi_optimizer="bcd").load_state_dict(state)
