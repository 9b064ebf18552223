"""Massive-activation rows (attention sinks) are kept out of learning and measurement, and counted."""

import math

import pytest
import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding import state_io
from tl_sparsity.coding.massive import massive_threshold
from tl_sparsity.coding.synthetic import Gaussian, SparseLinear


def _with_sinks(x: torch.Tensor, where: list[int], factor: float = 40.0) -> torch.Tensor:
    """``x`` with the rows at ``where`` replaced by one fixed direction ``factor`` times the median row norm (what
    an attention-sink token looks like in a residual stream: long and always the same direction)."""
    x = x.clone()
    sink = torch.zeros(x.shape[1])
    sink[3] = 1.0
    x[where] = sink * factor * float(x.norm(dim=1).median())
    return x


def test_planted_sinks_are_counted_exactly_and_reach_no_buffer():
    src = SparseLinear(32, 8, seed=0)
    x = src.sample(12 * 1024)  # 12 whole batches: no row left pending
    where = list(range(5, 12 * 1024, 997))  # 13 sinks, in the first batch and later ones
    c = OnlineSparseCoder(seed=1, batch_size=1024, reservoir_size=20_000).partial_fit(_with_sinks(x, where))
    assert c.n_massive_ == len(where)
    assert c.n_dropped_ == 0
    assert c.n_pending_ == 0 and c.n_tokens_ + c.n_heldout_ == 12 * 1024 - len(where)
    limit = (c.massive_norm_ + c.mean_.norm()) / c.scale_  # the longest a kept row can be once normalised
    for name, rows in (("reservoir", c.heldout_), ("probe", c._probe[: c._probe_fill]),
                       ("replay", c._replay_buf[: c._replay_fill])):
        assert rows.norm(dim=1).max() <= limit, name
    # the normaliser: the first batch's training rows without its sinks
    held = torch.rand(1024, generator=torch.Generator().manual_seed(1)) < c.holdout_frac
    kept = ~held
    kept[[5, 1002]] = False  # the first batch's sinks
    first = x[:1024][kept]
    torch.testing.assert_close(c.mean_, first.mean(0))


def test_the_reported_metric_with_sinks_matches_fresh_clean_rows():
    src = SparseLinear(32, 8, seed=2)
    x = _with_sinks(src.sample(20_000), list(range(7, 20_000, 211)), factor=60.0)  # 0.5 % sinks
    c = OnlineSparseCoder(seed=0, batch_size=512).partial_fit(x)
    reported, fresh = c.evaluate(), c.evaluate(src.sample(8_000))
    se = math.hypot(reported["normalized_loss_se"], fresh["normalized_loss_se"])
    assert abs(reported["normalized_loss"] - fresh["normalized_loss"]) <= 4 * se


@pytest.mark.parametrize("source", [SparseLinear(64, 4, seed=3), SparseLinear(64, 32, seed=3), Gaussian(64, seed=3)])
def test_ordinary_data_trips_nothing(source):
    c = OnlineSparseCoder(seed=0, batch_size=1024, expansion=1, replay=0).partial_fit(source.sample(30_000))
    assert c.n_massive_ == 0 and math.isfinite(c.massive_norm_)


def test_none_keeps_every_row_and_the_threshold_is_ratio_times_the_99th_percentile():
    x = _with_sinks(torch.randn(3000, 16), [10, 2000])
    keep = OnlineSparseCoder(seed=0, batch_size=1024, massive_ratio=None).partial_fit(x)
    assert keep.n_massive_ == 0 and math.isinf(keep.massive_norm_)
    norms = torch.tensor([1.0] * 98 + [2.0, 50.0])[:, None] * torch.eye(4)[0]
    assert massive_threshold(norms, 3.0) == pytest.approx(3.0 * torch.quantile(norms.norm(dim=1).double(), 0.99))
    assert massive_threshold(norms, None) == math.inf
    with pytest.raises(ValueError, match="massive_ratio must be > 1"):
        OnlineSparseCoder(massive_ratio=1.0)


def test_without_synchronisation_a_massive_row_becomes_the_mean_row():
    c = OnlineSparseCoder(seed=0, batch_size=256).partial_fit(torch.randn(512, 8))
    before = c.n_massive_
    batch = _with_sinks(torch.randn(10, 8), [4])
    held = torch.zeros(10, dtype=torch.bool)
    out, held_out = c._without_massive(batch, held, keep_rows=True)
    assert out.shape == batch.shape and held_out is held
    torch.testing.assert_close(out[4], c.mean_)
    assert torch.equal(out[torch.arange(10) != 4], batch[torch.arange(10) != 4])
    assert c.n_massive_ == before + 1


def test_state_round_trip_and_files_from_before_the_rule(tmp_path):
    x = _with_sinks(torch.randn(2500, 8), [3, 1500])
    c = OnlineSparseCoder(seed=0, batch_size=512).partial_fit(x)
    back = OnlineSparseCoder.load(c.save(tmp_path / "a.safetensors"))
    assert back.n_massive_ == c.n_massive_ == 2 and back.massive_norm_ == c.massive_norm_
    tensors, meta = state_io.learner_state(c)
    del meta["params"]["massive_ratio"], meta["state"]["n_massive_"], meta["state"]["massive_norm"]
    path = tmp_path / "old.safetensors"
    path.write_bytes(state_io._pack(tensors, meta))
    old = OnlineSparseCoder.load(path)
    assert old.massive_ratio is None and math.isinf(old.massive_norm_) and old.n_massive_ == 0
    old.partial_fit(_with_sinks(torch.randn(600, 8), [1]))
    assert old.n_massive_ == 0  # the learner it was kept every row
