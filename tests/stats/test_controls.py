"""Streaming covariance and the covariance-matched Gaussian control."""

import pytest
import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.stats.controls import StreamingCovariance, control_metrics
from tl_sparsity.coding.synthetic import SparseLinear


def test_streaming_covariance_equals_torch_cov_whatever_the_chunking():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=gen) @ torch.randn(7, 7, generator=gen) + 5.0
    ref = torch.cov(x.double().T)
    for sizes in ([1000], [1, 999], [333, 333, 334], [10] * 100):
        s = StreamingCovariance(7)
        for part in torch.split(x, sizes):
            s.update(part)
        assert s.n == 1000
        torch.testing.assert_close(s.mean, x.double().mean(0))
        torch.testing.assert_close(s.cov(), ref)


def test_merged_covariances_equal_the_one_over_the_union():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 4, generator=gen), torch.randn(80, 4, generator=gen) * 3 + 1
    merged = StreamingCovariance(4).update(a).merge(StreamingCovariance(4).update(b))
    torch.testing.assert_close(merged.cov(), torch.cov(torch.cat([a, b]).double().T))
    restored = StreamingCovariance(4)
    restored.load_state_dict(merged.state_dict())
    torch.testing.assert_close(restored.cov(), merged.cov())


def test_streaming_covariance_rejects_bad_input():
    s = StreamingCovariance(3)
    with pytest.raises(ValueError, match=r"expected rows \[n, 3\]"):
        s.update(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        s.cov()
    s.update(torch.zeros(0, 3))  # empty: a no-op
    assert s.n == 0


def test_sparse_data_is_several_times_sparser_than_its_covariance_matched_gaussian():
    d, a = 32, 4
    src = SparseLinear(d, a, sigma=0.0, seed=0)
    params = dict(expansion=8, batch_size=512, warmup_tokens=8_000, seed=0)
    coder, stats = OnlineSparseCoder(**params), StreamingCovariance(d)
    for x in src.batches(16_000, chunk=8192):
        coder.partial_fit(x)
        stats.update(x)
    actual = coder.evaluate()["normalized_loss"]
    control = control_metrics(stats, params, n_rows=16_000)["normalized_loss"]
    assert actual < 0.7 * control, (actual, control)  # a/2 = 2 vs a Gaussian of rank 32
