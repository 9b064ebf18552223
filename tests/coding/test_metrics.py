import math

import torch

from tl_sparsity import sparsity_metrics
from tl_sparsity.coding.metrics import MetricAccumulator


def test_metrics_equal_hand_computation():
    phi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    x = torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    alpha = torch.tensor([[2.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    lam = 0.5
    m = sparsity_metrics(x, phi, alpha, lam)
    # residuals: [0, 0.5] → 0.25; [0,0] → 0; [0,0] → 0. L1: 2.5, 0, 1. max: 2, 0, 1. nnz: 2, 0, 1
    assert math.isclose(m["loss"], (0.25 + 0.5 * 3.5) / 3)
    assert math.isclose(m["coef_norm"], 3.5 / 3.0)
    assert math.isclose(m["nnz"], 1.0)
    assert math.isclose(m["max_coef"], 1.0)
    assert math.isclose(m["normalized_loss"], (0.25 + 0.5 * 3.5) / (0.5 * 3.0))
    xbar = x.mean(0)
    assert math.isclose(m["fvu"], 0.25 / float(((x - xbar) ** 2).sum()))
    # L_norm = S₁ + mean‖x − αΦ‖² / (λ‖α‖∞)
    assert math.isclose(m["normalized_loss"], m["coef_norm"] + m["mse"] / (lam * m["max_coef"]))


def test_standard_error_matches_direct_delta_method_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64)
    phi = torch.nn.functional.normalize(torch.randn(20, 8, generator=g, dtype=torch.float64), dim=1)
    alpha = torch.rand(500, 20, generator=g, dtype=torch.float64) * (torch.rand(500, 20, generator=g) < 0.2)
    lam = 0.3
    m = sparsity_metrics(x, phi, alpha, lam)
    a = ((x - alpha @ phi) ** 2).sum(1) + lam * alpha.sum(1)
    b = lam * alpha.max(1).values
    r = a.sum() / b.sum()
    se = float(((a - r * b).std(unbiased=True) / math.sqrt(500)) / b.mean())
    assert math.isclose(m["normalized_loss"], float(r), rel_tol=1e-12)
    assert math.isclose(m["normalized_loss_se"], se, rel_tol=1e-6)


def test_accumulators_merge_to_the_one_over_the_union():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g)
    phi = torch.nn.functional.normalize(torch.randn(10, 6, generator=g), dim=1)
    alpha = torch.rand(300, 10, generator=g)
    whole = MetricAccumulator(0.2)
    whole.update(x, phi, alpha)
    a, b = MetricAccumulator(0.2), MetricAccumulator(0.2)
    a.update(x[:120], phi, alpha[:120])
    b.update(x[120:], phi, alpha[120:])
    merged = a.merge(b).result()
    for k, v in whole.result().items():
        assert math.isclose(merged[k], v, rel_tol=1e-9), k
