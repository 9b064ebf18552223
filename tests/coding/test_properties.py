"""Property-based tests (hypothesis) of the collector's row extraction, the greedy pursuit and the learner's
streaming invariants, each checked against a plain reference."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import StubModel, assert_same_learner  # noqa: E402
from tl_sparsity import OnlineSparseCoder, SparsityCollector, greedy_pursuit, greedy_pursuit_reference  # noqa: E402
from tl_sparsity.coding.pursuit import STOP_TOL  # noqa: E402

FEW = settings(max_examples=25, deadline=None, database=None)  # no .hypothesis folder left behind


def _collector(skip_bos):
    return SparsityCollector(StubModel(), hooks="blocks.0.hook_resid_post", skip_bos=skip_bos)


@st.composite
def activations(draw):
    b, p = draw(st.integers(0, 4)), draw(st.integers(0, 6))
    feat = draw(st.sampled_from([(), (3,), (2, 3)]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    act = torch.randn(b, p, *feat, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    act = act.to(dtype)
    if draw(st.booleans()) and act.ndim >= 3:  # a non-contiguous view, as a hook may receive
        act = act.transpose(0, 1).contiguous().transpose(0, 1)
    mask = None
    if draw(st.booleans()):
        bits = draw(st.lists(st.booleans(), min_size=b * p, max_size=b * p))
        mask = torch.tensor(bits, dtype=torch.bool).reshape(b, p)
        mask = mask.to(draw(st.sampled_from([torch.bool, torch.int64, torch.float32])))
    return act, mask, draw(st.booleans())


@FEW
@given(activations())
def test_rows_are_the_kept_positions_flattened_in_order_as_float32(case):
    act, mask, skip_bos = case
    rows = _collector(skip_bos).rows(act, mask)
    b, p = act.shape[:2]
    want = []
    for i in range(b):  # plain loops: keep attended positions, minus the first attended one when skipping BOS
        attended = [j for j in range(p) if mask is None or bool(mask[i, j])]
        for j in attended[1:] if skip_bos else attended:
            want.append(act[i, j].reshape(-1).float())
    n_feat = act[0, 0].numel() if b and p else int(torch.tensor(act.shape[2:]).prod())
    want = torch.stack(want) if want else torch.zeros(0, n_feat)
    assert rows.dtype == torch.float32 and rows.shape == want.shape
    assert torch.equal(rows, want)
    if rows.numel():
        rows[0, 0] = 1e6  # a copy: writing to it leaves the activation alone
        assert act.float().max() < 1e6


@st.composite
def pursuit_problems(draw):
    n, d, m = draw(st.integers(1, 6)), draw(st.integers(2, 8)), draw(st.integers(1, 16))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    phi = torch.randn(m, d, generator=g, dtype=torch.float64)
    phi = phi / phi.norm(dim=1, keepdim=True)
    scale = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.1, 1.0, 3.0]), min_size=n, max_size=n)),
                         dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale.unsqueeze(1)
    lam = draw(st.sampled_from([0.01, 0.1, 0.5, 2.0]))
    cap = draw(st.sampled_from([None, 1, 3]))
    return x, phi, lam, cap


@FEW
@given(pursuit_problems())
def test_greedy_pursuit_matches_the_reference_and_keeps_its_promises(problem):
    x, phi, lam, cap = problem
    alpha, info = greedy_pursuit(x, phi, lam, max_steps=cap, return_info=True)
    ref, ref_info = greedy_pursuit_reference(x, phi, lam, max_steps=cap)
    torch.testing.assert_close(alpha, ref, rtol=0, atol=1e-10)
    assert torch.equal(info.steps, ref_info.steps) and info.capped == ref_info.capped
    assert (alpha >= 0).all()
    r = x - alpha @ phi
    loss = (r**2).sum(1) + lam * alpha.sum(1)
    assert (loss <= (x**2).sum(1) + 1e-12).all()  # each step lowers the objective by a²
    stopped = info.steps < (4 * x.shape[1] if cap is None else cap)  # samples that stopped by the rule
    top = (r @ phi.T).max(dim=1).values
    assert (top[stopped] <= lam / 2 * (1 + STOP_TOL) + 1e-12).all()
    assert info.capped <= int((~stopped).sum())


@st.composite
def chunked_streams(draw):
    n = draw(st.integers(0, 300))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    bad = draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=5)) if n else []
    return n, cuts, bad, draw(st.integers(0, 2**16))


@FEW
@given(chunked_streams())
def test_any_chunking_with_nonfinite_rows_equals_one_call_on_the_clean_rows(case):
    n, cuts, bad, seed = case
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    dirty = x.clone()
    for i in bad:
        dirty[i, i % 4] = float("nan") if i % 2 else float("inf")
    keep = torch.ones(n, dtype=torch.bool)
    keep[bad] = False
    opts = dict(expansion=2, batch_size=32, reservoir_size=20, warmup_tokens=64, max_steps=8, seed=seed)
    one = OnlineSparseCoder(**opts).partial_fit(x[keep])
    many = OnlineSparseCoder(**opts)
    for a, b in zip([0] + cuts, cuts + [n]):
        many.partial_fit(dirty[a:b])
    assert many.n_dropped_ == len(set(bad))
    many.n_dropped_ = 0
    assert_same_learner(one, many)


@FEW
@given(chunked_streams())
def test_a_state_dict_taken_at_any_point_continues_bit_identically(case):
    n, cuts, _, seed = case
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    opts = dict(expansion=2, batch_size=32, reservoir_size=20, warmup_tokens=64, max_steps=8, seed=seed)
    k = cuts[0] if cuts else n // 2
    whole = OnlineSparseCoder(**opts).partial_fit(x)
    first = OnlineSparseCoder(**opts).partial_fit(x[:k])
    resumed = OnlineSparseCoder(**opts).load_state_dict(first.state_dict()).partial_fit(x[k:])
    assert_same_learner(whole, resumed)
