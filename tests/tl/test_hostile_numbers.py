"""Hostile numbers: huge finite values, non-finite state, degenerate rows, non-finite options and impossible
metrics never give a learner that says "ok"; a fuzz test checks the row rule against a plain reference."""

import math

import pytest
import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding.grouped import train_together
from tl_sparsity.coding.options import LearnerOptions
from tl_sparsity.tl.rows import learner_row

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FEW = settings(max_examples=12, deadline=None, database=None)
BOUND = 1e30  # the stated rule: all entries finite and Σx² (float64) ≤ 1e30


def reference_bad(x):
    """The rows the stated rule drops, by a plain loop."""
    bad = 0
    for row in x.tolist():
        if not all(math.isfinite(v) for v in row) or sum(v * v for v in row) > BOUND:
            bad += 1
    return bad


def _state_finite(c):
    return (bool(torch.isfinite(c.dictionary_).all()) and math.isfinite(c.scale_) and math.isfinite(c.lam_)
            and bool(torch.isfinite(c.mean_).all()) and bool(torch.isfinite(c._adam_m).all())
            and bool(torch.isfinite(c._adam_v).all()))


def test_huge_finite_row_is_dropped_and_counted():
    x = torch.randn(640, 16, generator=torch.Generator().manual_seed(0))
    x[5, 0] = 2e19
    c = OnlineSparseCoder(batch_size=64, expansion=2, min_steps=8).partial_fit(x)
    assert c.n_dropped_ == 1
    assert _state_finite(c)
    assert math.isfinite(c.evaluate()["normalized_loss"])
    assert learner_row(c)["n_dropped"] == 1


def test_huge_row_dropped_on_the_unchecked_path_too():
    x = torch.randn(640, 16, generator=torch.Generator().manual_seed(1))
    x[300, 3] = -3e19
    c = OnlineSparseCoder(batch_size=64, expansion=2, min_steps=8)
    for batch in c.batches(x, check_finite=False):  # as the collector does when its NaN/Inf check passed
        train_together([(c, c.prepare(batch))])
    assert c.n_dropped_ == 1
    assert _state_finite(c)


def test_row_far_past_the_learned_scale_keeps_the_state_finite():
    x = torch.randn(640, 16, generator=torch.Generator().manual_seed(2))
    x[400] = 1e14  # within the absolute bound, but 1e14 times the typical row once the scale is learned
    c = OnlineSparseCoder(batch_size=64, expansion=2, min_steps=8, holdout_frac=0.0).partial_fit(x)
    assert c.n_dropped_ == 0
    assert _state_finite(c)


def test_normal_data_unchanged_by_the_rule():
    x = torch.randn(700, 12, generator=torch.Generator().manual_seed(3))
    a = OnlineSparseCoder(batch_size=64, expansion=2).partial_fit(x)
    b = OnlineSparseCoder(batch_size=64, expansion=2)
    for batch in b.batches(x, check_finite=False):
        b._process(batch)
    assert torch.equal(a.dictionary_, b.dictionary_) and a.n_dropped_ == b.n_dropped_ == 0


def test_non_finite_state_is_reported():
    x = torch.randn(640, 16, generator=torch.Generator().manual_seed(4))
    c = OnlineSparseCoder(batch_size=64, expansion=2, min_steps=8).partial_fit(x)
    c._adam_v[0, 0] = float("inf")
    row = learner_row(c)
    assert row["status"].startswith("state not finite") and "Adam" in row["status"]
    c = OnlineSparseCoder(batch_size=64, expansion=2, min_steps=8).partial_fit(x)
    c.scale_ = float("inf")
    assert learner_row(c)["status"].startswith("state not finite")


@pytest.mark.parametrize("kind", ["zeros", "constant"])
def test_degenerate_rows_say_so(kind):
    x = torch.zeros(640, 8) if kind == "zeros" else torch.full((640, 8), 3.0)
    c = OnlineSparseCoder(batch_size=64, expansion=2, min_steps=8).partial_fit(x)
    row = learner_row(c)
    assert row["status"].startswith("degenerate"), row["status"]
    assert "zero variance" in row["status"]


@pytest.mark.parametrize("name", ["lam", "lr", "lam_ratio", "expansion", "tol", "holdout_frac"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_options_must_be_finite(name, value):
    with pytest.raises(ValueError, match=name):
        LearnerOptions(**{name: value})
    with pytest.raises(ValueError, match=name):
        OnlineSparseCoder(**{name: value})


def test_existing_option_messages_kept():
    with pytest.raises(ValueError, match=r"lam must be > 0 \(or None"):
        LearnerOptions(lam=-1.0)
    with pytest.raises(ValueError, match="expansion must be > 0"):
        LearnerOptions(expansion=0)


def test_impossible_metrics_are_never_ok(monkeypatch):
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(5))
    c = OnlineSparseCoder(batch_size=64, expansion=2, min_steps=8, tol=0.5).partial_fit(x)
    base = c.evaluate()
    for bad in ({"fvu": 1.5}, {"normalized_loss": -0.1}, {"normalized_loss": math.inf}, {"fvu": math.nan}):
        monkeypatch.setattr(c, "evaluate", lambda x=None, bad=bad: {**base, **bad})
        row = learner_row(c)
        assert row["status"] != "ok" and not row["status"].startswith("not converged"), (bad, row["status"])
        key = next(iter(bad))
        assert key in row["status"]


@st.composite
def hostile_rows(draw):
    n, d = draw(st.integers(1, 300)), draw(st.integers(2, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n, d, generator=g)
    kinds = [0.0, 1e30, -1e30, 1e-30, -1e-30, 1e16, 3e14, -3e14, math.nan, math.inf, -math.inf]
    for _ in range(draw(st.integers(0, 20))):  # entries set to hostile values
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))
        x[i, j] = draw(st.sampled_from(kinds))
    for _ in range(draw(st.integers(0, 5))):  # whole zero or constant rows
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0.0, 2.5, -7.0]))
    return x, draw(st.integers(1, 4))


@FEW
@given(hostile_rows())
def test_fuzz_partial_fit(case):
    x, chunks = case
    c = OnlineSparseCoder(batch_size=32, expansion=2, min_steps=8, probe_size=8)
    for part in x.tensor_split(chunks):
        c.partial_fit(part)
    assert c.n_dropped_ == reference_bad(x)
    if c.initialized:
        assert _state_finite(c)
        ev = c.evaluate()
        for k in ("loss", "mse", "max_coef"):
            assert math.isfinite(ev[k]), (k, ev)
        assert learner_row(c)["status"] is not None


@FEW
@given(hostile_rows())
def test_fuzz_collector_path(case):
    x, chunks = case
    c = OnlineSparseCoder(batch_size=32, expansion=2, min_steps=8, probe_size=8)
    for part in x.tensor_split(chunks):
        ok = bool(torch.isfinite(part).all())  # the collector's own NaN/Inf check
        for batch in c.batches(part, check_finite=not ok):
            train_together([(c, c.prepare(batch))])
    assert c.n_dropped_ == reference_bad(x)
    if c.initialized:
        assert _state_finite(c)


def _dp_worker(rank: int) -> dict:
    """One rank of a data-parallel learner fed huge finite rows, with and without every rank's counts."""
    from tl_sparsity.scale.data_parallel import DataParallelCoder

    out = {}
    for mode in ("exchanged", "counts"):
        coder = DataParallelCoder(batch_size=64, expansion=2, min_steps=8, warmup_tokens=128)
        for i in range(8):
            x = torch.randn(40, 8, generator=torch.Generator().manual_seed(10 * rank + i))
            if i in (1, 5):
                x[3, rank] = 2e19  # finite, past the bound: a NaN/Inf check lets it through
            if mode == "counts":
                coder.partial_fit(x, check_finite=False, counts=[40, 40])
            else:
                coder.partial_fit(x)
        out[mode] = dict(dropped=coder.n_dropped_, finite=_state_finite(coder),
                         loss=float(coder.evaluate()["normalized_loss"]))
    return out


def test_data_parallel_huge_rows(tmp_path):
    from conftest import on_two_gloo_ranks

    for res in on_two_gloo_ranks(_dp_worker, tmp_path):
        for mode in ("exchanged", "counts"):
            assert res[mode]["dropped"] == 2 and res[mode]["finite"], (mode, res)
            assert math.isfinite(res[mode]["loss"]), (mode, res)


def test_rows_kept_in_place_are_counted_and_neutral():
    """The synchronisation-free form of the rule (fixed row counts): a rejected row becomes the mean row."""
    x = torch.randn(640, 8, generator=torch.Generator().manual_seed(6))
    c = OnlineSparseCoder(batch_size=64, expansion=2, min_steps=8).partial_fit(x)
    y = torch.randn(10, 8, generator=torch.Generator().manual_seed(7))
    y[2, 1], y[7, 0] = 5e19, math.nan
    out = c._finite_rows(y, check_finite=False, keep_rows=True)
    assert out.shape == y.shape and c.n_dropped_ == 2
    assert torch.equal(out[2], c.mean_) and torch.equal(out[7], c.mean_)
    assert torch.equal(out[[0, 1, 3, 4, 5, 6, 8, 9]], y[[0, 1, 3, 4, 5, 6, 8, 9]])
    assert bool((c.normalize(out)[[2, 7]] == 0).all())


def test_normalise_shrinks_only_far_rows():
    from tl_sparsity.coding.bounds import NORMALISED_NORM_MAX, normalise

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(8))
    x[1] = 1e14
    mean, scale = torch.zeros(4), 2.0
    xn = normalise(x, mean, scale)
    rest = [0, 2, 3, 4, 5]
    assert torch.equal(xn[rest], (x[rest] - mean) / scale)
    assert abs(float(xn[1].norm()) / NORMALISED_NORM_MAX - 1) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sync_free_path_replaces_bad_and_massive_rows_in_place_and_counts_them():
    """On a GPU after λ's warm-up, with check_finite=False (the collector's path), rejected rows — non-finite,
    overflowing, massive — are replaced by the mean row on the device and counted there, without a host sync."""
    g = torch.Generator().manual_seed(0)
    c = OnlineSparseCoder(seed=0, batch_size=256, warmup_steps=2, device="cuda")
    c.partial_fit(torch.randn(1024, 16, generator=g).cuda())
    assert not c.lam_adapting
    x = torch.randn(1024, 16, generator=g)
    long = 40.0 * float(x.norm(dim=1).median())
    x[3, 0], x[500, 1], x[700] = float("nan"), 1e20, 0.0
    x[700, 2] = long  # a massive row
    before = (c.n_dropped_, c.n_massive_)
    c.partial_fit(x.cuda(), check_finite=False)
    assert (c.n_dropped_ - before[0], c.n_massive_ - before[1]) == (2, 1)
    assert torch.isfinite(c.dictionary_).all() and torch.isfinite(c.heldout_).all()
    assert math.isfinite(c.evaluate()["normalized_loss"])
