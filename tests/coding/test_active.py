"""n_active (tl_sparsity/coding/active.py, docs/active.md): hand-computed counts on small fixed codes, the metric
key and report column, and calibration on one planted law (the study's --quick mode)."""

import math

import pytest
import torch
from helpers import load_script

from tl_sparsity import OnlineSparseCoder, SparsityReport, sparsity_metrics
from tl_sparsity.coding.active import active_counts, refit_coefficients, support_refit
from tl_sparsity.coding.metrics import MetricAccumulator
from tl_sparsity.coding.synthetic import SparseLinear
from tl_sparsity.tl.rows import learner_row

D = torch.float64


def test_refit_on_the_support_removes_cross_talk():
    # x = f1 exactly; a pursuit-like code put weight on f0 too. NNLS on {f0, f1} gives β = (0, 1): one feature.
    phi = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=D)
    x = torch.tensor([[0.6, 0.8]], dtype=D)
    alpha = torch.tensor([[0.5, 0.3]], dtype=D)
    beta, idx, _ = support_refit(x, phi, alpha, sweeps=200)
    by_atom = dict(zip(idx[0].tolist(), beta[0].tolist()))
    assert by_atom[0] == pytest.approx(0.0, abs=1e-9) and by_atom[1] == pytest.approx(1.0, abs=1e-9)
    assert active_counts(x, phi, alpha, lam=0.2, sweeps=200).tolist() == [1.0]
    assert (alpha > 0).sum().item() == 2  # N₀ counts both


def test_lambda_floor_counts_coefficients_above_half_lambda():
    # orthonormal atoms: the refit is β = x on the support; λ/2 = 0.1 drops the 0.05 coefficient; residual 0
    phi = torch.eye(3, dtype=D)
    x = torch.tensor([[2.0, 1.0, 0.05]], dtype=D)
    alpha = torch.tensor([[1.9, 0.9, 0.01]], dtype=D)
    assert active_counts(x, phi, alpha, lam=0.2).tolist() == [2.0]
    assert active_counts(x, phi, alpha, lam=0.0).tolist() == [3.0]


def test_split_atoms_merge_into_one():
    # f0 and f1 have cosine 0.8 > 0.7: the smaller refit coefficient (f1's 0.5) is not counted
    phi = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=D)
    x = (1.0 * phi[0] + 0.5 * phi[1]).unsqueeze(0)
    alpha = torch.tensor([[1.0, 0.5]], dtype=D)
    assert active_counts(x, phi, alpha, lam=0.2).tolist() == [1.0]
    assert active_counts(x, phi, alpha, lam=0.2, merge_cos=1.0).tolist() == [2.0]
    assert active_counts(x, phi, alpha, lam=0.2, merge_cos=0.85).tolist() == [2.0]


def test_noise_threshold_reads_the_refit_residual():
    # atoms e0, e1 of R⁴ (m = 2); residual (0, 0, 0.4, 0) over d − s = 2 free directions:
    # cut = 1.5 · 0.4 · √(2 ln 2 / 2) ≈ 0.500 > β₁ = 0.3
    phi = torch.eye(4, dtype=D)[:2]
    x = torch.tensor([[1.0, 0.3, 0.4, 0.0]], dtype=D)
    alpha = torch.tensor([[0.9, 0.2]], dtype=D)
    cut = 1.5 * 0.4 * math.sqrt(2 * math.log(2) / 2)
    assert 0.3 < cut < 1.0
    assert active_counts(x, phi, alpha, lam=0.2).tolist() == [1.0]
    assert active_counts(x, phi, alpha, lam=0.2, noise_k=0.0).tolist() == [2.0]


def test_refit_coefficients_by_hand():
    # split atoms (cos 0.8): x = f0 + 0.5·f1 exactly, so the refit is β = (1, 0.5), residual 0; the merge zeroes f1
    phi = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=D)
    x = (1.0 * phi[0] + 0.5 * phi[1]).unsqueeze(0)
    beta, noise = refit_coefficients(x, phi, torch.tensor([[1.0, 0.5]], dtype=D), sweeps=200)
    assert beta.tolist()[0] == pytest.approx([1.0, 0.0], abs=1e-9) and noise.tolist() == pytest.approx([0.0], abs=1e-9)
    beta, _ = refit_coefficients(x, phi, torch.tensor([[1.0, 0.5]], dtype=D), merge_cos=1.0, sweeps=200)
    assert beta.tolist()[0] == pytest.approx([1.0, 0.5], abs=1e-9)
    # e0, e1 of R⁴ (m = 2): β = (1, 0.3), residual (0, 0, 0.4, 0) over d − s = 2 directions
    phi = torch.eye(4, dtype=D)[:2]
    beta, noise = refit_coefficients(torch.tensor([[1.0, 0.3, 0.4, 0.0]], dtype=D), phi,
                                     torch.tensor([[0.9, 0.2]], dtype=D))
    assert beta.tolist()[0] == pytest.approx([1.0, 0.3])
    assert noise.item() == pytest.approx(0.4 * math.sqrt(2 * math.log(2) / 2))


def _study():
    return load_script("benchmarks/active_count.py", "active_count")


def test_study_candidates_by_hand():
    mod = _study()
    # non-zero α = {1, 0.5, 0.2}: 0.9 quantile 0.5 + 0.8·0.5 = 0.9; mean ‖α‖₁ = (1.5 + 0.2)/2 = 0.85
    alpha = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.0, 0.0]], dtype=D)
    assert mod.scale_count(alpha) == pytest.approx(0.85 / 0.9)
    # two well-separated magnitude groups (≈1 and ≈0.01): the mixture counts the large ones per row
    g = torch.Generator().manual_seed(0)
    big = 1 + 0.1 * torch.rand(200, 3, generator=g, dtype=D)
    small = 0.01 * (1 + 0.1 * torch.rand(200, 5, generator=g, dtype=D))
    on = torch.arange(3) < torch.arange(200).remainder(4).unsqueeze(1)  # 0 to 3 large coefficients per row
    beta = torch.cat([big * on, small, torch.zeros(200, 2, dtype=D)], 1)
    want = (beta > 0.5).sum(1).to(D)
    assert torch.equal(mod.mixture_counts(beta), want)


def test_empty_codes_count_zero():
    phi = torch.eye(2, dtype=D)
    assert active_counts(torch.zeros(3, 2, dtype=D), phi, torch.zeros(3, 2, dtype=D), 0.1).tolist() == [0.0] * 3


def test_metrics_key_and_standard_error_by_hand():
    phi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=D)
    x = torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.6, 0.8]], dtype=D)
    alpha = torch.tensor([[2.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=D)
    m = sparsity_metrics(x, phi, alpha, 0.5)
    # per-row counts 2 (refit β = (2, 1), orthogonal atoms), 0, 1 → mean 1, sd 1, se 1/√3
    assert m["n_active"] == pytest.approx(1.0)
    assert m["n_active_se"] == pytest.approx(1 / math.sqrt(3))
    a, b = MetricAccumulator(0.5), MetricAccumulator(0.5)
    a.update(x[:2], phi, alpha[:2])
    b.update(x[2:], phi, alpha[2:])
    merged = a.merge(b).result()
    assert merged["n_active"] == pytest.approx(1.0) and merged["n_active_se"] == pytest.approx(1 / math.sqrt(3))
    off = MetricAccumulator(0.5, active=False)
    off.update(x, phi, alpha)
    assert math.isnan(off.result()["n_active"]) and not math.isnan(off.result()["normalized_loss"])


def test_sparse_linear_laws():
    base = SparseLinear(16, 2, seed=3, calibration=256).sample(8)
    assert torch.equal(SparseLinear(16, 2, seed=3, calibration=256, law="uniform").sample(8), base)
    const = SparseLinear(16, 2, sigma=0.0, seed=3, calibration=256, law="constant")
    assert const.count == 2 and const.truth == 2
    with pytest.raises(ValueError, match="law"):
        SparseLinear(16, 2, law="cauchy")


def test_learner_row_and_report_carry_n_active():
    coder = OnlineSparseCoder(8, seed=0)
    coder.partial_fit(SparseLinear(8, 2, seed=0, calibration=512).sample(6000))
    row = learner_row(coder)
    assert row["n_active"] > 0 and row["n_active_se"] > 0
    ev = coder.evaluate()
    assert ev["n_active"] == row["n_active"]
    rows = [{"hook": f"blocks.{i}.hook_resid_post", "layer": i, "site": "resid_post", "normalized_loss": 2.0 + i,
             "normalized_loss_se": 0.1, "n_active": 3.0 + i, "n_active_se": 0.2} for i in range(3)]
    report = SparsityReport(rows)
    assert "3.000 ± 0.200" in report.to_markdown()
    import matplotlib

    matplotlib.use("Agg")
    ax = report.plot("n_active")
    assert list(ax.lines[0].get_ydata()) == [3.0, 4.0, 5.0]
    assert ax.get_ylabel() == "n active"


def test_quick_study_is_calibrated_on_one_planted_law():
    rows = _study().main(["--quick"])
    assert [r["k"] for r in rows] == [2, 4]
    for r in rows:
        assert abs(r["n_active"] / r["k"] - 1) <= 0.15, r
    assert abs(rows[1]["normalized_loss"] / 4 - 1) > 0.15  # the paper's measure is not a count here


def test_n_active_is_computed_on_the_first_active_rows_rows_only():
    """Its support refit costs far more than the pursuit: an accumulator counts on its first ACTIVE_ROWS rows."""
    from tl_sparsity.coding.active import active_counts
    from tl_sparsity.coding.metrics import ACTIVE_ROWS

    g = torch.Generator().manual_seed(0)
    phi = torch.nn.functional.normalize(torch.randn(32, 8, generator=g), dim=1)
    alpha = torch.rand(ACTIVE_ROWS + 500, 32, generator=g) * (torch.rand(ACTIVE_ROWS + 500, 32, generator=g) < 0.1)
    x = alpha @ phi
    acc = MetricAccumulator(0.05)
    acc.update(x[:700], phi, alpha[:700])
    acc.update(x[700:], phi, alpha[700:])
    assert acc.n == ACTIVE_ROWS + 500 and acc.n_act == ACTIVE_ROWS
    want = active_counts(x[:ACTIVE_ROWS], phi, alpha[:ACTIVE_ROWS], 0.05).double()
    assert acc.result()["n_active"] == pytest.approx(float(want.mean()))
