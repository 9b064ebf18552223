"""Data-parallel learning over 2 CPU processes (gloo) equals one process fed the ranks' rows interleaved."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from tl_sparsity import OnlineSparseCoder, SparsityCollector

HOOKS = "blocks.0.hook_resid_post,blocks.1.hook_resid_post,blocks.1.mlp.hook_post"
OPTS = dict(batch_size=128, warmup_tokens=256, controls=True, neurons="blocks.1.mlp.hook_post")
CODER = dict(expansion=4, batch_size=96, warmup_tokens=300, seed=3, reservoir_size=50)
#: A rule loose enough that the verdict's rate check cuts the rate within a few dozen steps.
LOOSE = dict(expansion=2, batch_size=32, seed=3, reservoir_size=50, probe_size=8, warmup_steps=4, min_steps=8,
             tol=0.3, lam_rounds=0)


def _finite_chunks(rank: int, passes: int = 3) -> list[torch.Tensor]:
    return [x[torch.isfinite(x).all(1)] for _ in range(passes) for x in _chunks(rank)]


def _chunks(rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s rows, call by call: uneven sizes, empty calls, one call with a non-finite row."""
    gen = torch.Generator().manual_seed(11)
    sizes = [[37, 0, 64, 5, 90, 1, 33, 70, 0, 41], [12, 50, 0, 77, 3, 60, 28, 0, 99, 16]]
    base = torch.randn(12, 16, generator=gen)
    out = []
    for i, n in enumerate(sizes[rank]):
        g = torch.Generator().manual_seed(100 * rank + i)
        coef = torch.rand(n, 12, generator=g) * (torch.rand(n, 12, generator=g) < 0.25)
        x = coef @ base + 0.01 * torch.randn(n, 16, generator=g)
        if rank == 1 and i == 3:
            x[5, 2] = float("nan")
        out.append(x)
    return out


def _model():
    from conftest import make_model

    return make_model("bridge")


def _shards():
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(1, 200, (4, 24), generator=gen) for _ in range(8)]
    batches[2] = torch.zeros(0, 24, dtype=torch.long)  # an empty batch on rank 0 only
    return batches[0::2], batches[1::2]  # rank 0 gets A, rank 1 gets B


# the collectives a data-parallel fit may make, named by the innermost tl_sparsity function on the stack
KINDS = ("same_batch_count", "finite_row_counts", "_all_gather_ints", "_gather_ordered", "_mean_max", "_phi_grad")
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object", "all_reduce",
               "broadcast", "broadcast_object_list", "gather", "reduce", "scatter", "reduce_scatter_tensor",
               "all_to_all_single", "barrier")


@contextlib.contextmanager
def _counting_collectives(calls: list[str]):
    """Record, for each ``torch.distributed`` collective called, the innermost of :data:`KINDS` calling it."""
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(fn):
        def counted(*args, **kwargs):
            frame, names = sys._getframe(1), []
            while frame is not None:
                names.append(frame.f_code.co_name)
                frame = frame.f_back
            calls.append(next((n for n in names if n in KINDS), "/".join(reversed(names[:4]))))
            return fn(*args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _fed_with_counts(rank: int, coder) -> list[str]:
    """Feed ``coder`` the rows of :func:`_chunks` with every rank's count given, NaN rows dropped first (as the
    collector does); at call 3 also make calls with wrong counts, which must raise and change nothing."""
    errors = []
    for i, (a, b) in enumerate(zip(_chunks(0), _chunks(1))):
        x = (a, b)[rank]
        keep = torch.isfinite(x).all(dim=1)
        counts = [int(torch.isfinite(c).all(dim=1).sum()) for c in (a, b)]
        if i == 3:
            bad_own = [c + (r == rank) for r, c in enumerate(counts)]
            for kwargs in ({"counts": counts[:1]}, {"counts": bad_own}, {"counts": [counts[0], -1]}):
                try:
                    coder.partial_fit(x[keep], check_finite=False, **kwargs)
                except ValueError as e:
                    errors.append(str(e))
            if rank == 1:  # its NaN row counted: rejected when checked
                try:
                    coder.partial_fit(x, counts=[counts[0], x.shape[0]])
                except ValueError as e:
                    errors.append(str(e))
        coder.partial_fit(x[keep], check_finite=False, counts=counts)
    return errors


def _worker(rank: int) -> dict:
    """One rank's results (run by conftest.on_two_gloo_ranks)."""
    from tl_sparsity.scale.data_parallel import DataParallelCoder

    coder = DataParallelCoder(**CODER)
    for x in _chunks(rank):
        coder.partial_fit(x)
    res = {"dict": coder.dictionary_.clone(), "lam": coder.lam_, "heldout": coder.heldout_.clone(),
           "counts": (coder.n_tokens_, coder.n_heldout_, coder.n_pending_), "global": coder.global_counts(),
           "eval": coder.evaluate()}
    coder.flush()  # collective: the ranks' pending rows as one last shared batch
    res["flushed"] = {"dict": coder.dictionary_, "heldout": coder.heldout_.clone(), "lam": coder.lam_,
                      "counts": (coder.n_tokens_, coder.n_heldout_, coder.n_pending_)}
    counted = DataParallelCoder(**CODER)
    res["count_errors"] = _fed_with_counts(rank, counted)
    res["counted"] = {"dict": counted.dictionary_, "heldout": counted.heldout_.clone(), "lam": counted.lam_,
                      "counts": (counted.n_tokens_, counted.n_heldout_, counted.n_pending_, counted.n_dropped_)}
    loose = DataParallelCoder(**LOOSE)
    for x in _finite_chunks(rank):
        loose.partial_fit(x)
    res["loose"] = {"dict": loose.dictionary_.clone(), "cuts": loose.trace_.rate_cuts, "steps": loose.n_steps_,
                    "converged": loose.converged_}
    col = SparsityCollector(_model(), hooks=HOOKS, **OPTS)
    assert col.parallel == "data"
    calls: list[str] = []
    with _counting_collectives(calls):
        col.fit(_shards()[rank], progress=False)
    res["collectives"] = calls
    res["batches"] = {n: (lr.n_tokens_ + lr.n_heldout_) // lr.batch_size for n, lr in col.learners.items()}
    res["phi_steps"] = {n: lr.n_steps_ for n, lr in col.learners.items()}
    rep = col.report()
    res["report"] = rep.to_dict()
    res["col_dicts"] = {n: lr.dictionary_.clone() for n, lr in col.learners.items()}
    res["n_tokens"] = col.n_tokens
    return res


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results of one 2-process run (learner and collector), shared by the tests below."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("transformer_lens.model_bridge")
    from conftest import on_two_gloo_ranks

    return on_two_gloo_ranks(_worker, tmp_path_factory.mktemp("dp"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_data_parallel_over_two_processes_equals_one_process_fed_the_ranks_rows_interleaved(two_ranks):
    results = two_ranks

    single = OnlineSparseCoder(**CODER, replay=0)  # replay 0, as data-parallel; rank 0's rows, then rank 1's, call by call
    for a, b in zip(_chunks(0), _chunks(1)):
        single.partial_fit(a).partial_fit(b)
    assert single.n_tokens_ >= 4 * CODER["batch_size"] * 0.8  # several steps happened
    for res in results:
        assert res["counts"] == (single.n_tokens_, single.n_heldout_, single.n_pending_)
        assert torch.equal(res["heldout"], single.heldout_)  # the same reservoir, bit for bit
        assert res["global"]["n_dropped"] == 1
        assert abs(res["global"]["capped"] - single.capped_) <= 0.02 * single.n_tokens_
        assert res["lam"] == pytest.approx(single.lam_, rel=1e-5)
        torch.testing.assert_close(res["dict"], single.dictionary_, atol=1e-4, rtol=0)
        assert res["eval"]["normalized_loss"] == pytest.approx(single.evaluate()["normalized_loss"], rel=1e-3)
    assert torch.equal(results[0]["dict"], results[1]["dict"])  # every rank holds the same dictionary
    pending = single.n_pending_
    single.flush()  # one last, shorter batch, in one process and over the ranks alike
    assert pending > 0 and single.n_pending_ == 0
    for res in results:
        got = res["flushed"]
        assert got["counts"] == (single.n_tokens_, single.n_heldout_, 0)
        assert torch.equal(got["heldout"], single.heldout_)
        torch.testing.assert_close(got["dict"], single.dictionary_, atol=1e-4, rtol=0)

    a, b = _shards()  # the collector: one process fed the shards interleaved batch by batch
    one = SparsityCollector(_model(), hooks=HOOKS, parallel=None, **{**OPTS, "replay": 0})  # as data-parallel
    one.fit([x for pair in zip(a, b) for x in pair], progress=False)
    want = one.report().to_dict()
    for res in results:
        got = res["report"]
        assert res["n_tokens"] == one.n_tokens
        assert got["meta"]["data_parallel"] == {"world_size": 2}
        for g, w in zip(got["rows"], want["rows"], strict=True):
            assert g["hook"] == w["hook"]
            for k in ("n_tokens", "n_heldout", "n_eval", "n_dropped", "dead_frac", "n_positional"):
                assert g[k] == w[k] or (g[k] != g[k] and w[k] != w[k]), (g["hook"], k, g[k], w[k])
            for k in ("lam", "normalized_loss", "fvu", "control_normalized_loss"):
                assert g[k] == pytest.approx(w[k], rel=2e-3), (g["hook"], k, g[k], w[k])
        for name, d in res["col_dicts"].items():
            torch.testing.assert_close(d, one.learners[name].dictionary_, atol=1e-3, rtol=0)
    assert repr(results[0]["report"]["rows"]) == repr(results[1]["report"]["rows"])  # every rank: the same report


def test_data_parallel_ranks_cut_the_rate_at_the_steps_one_process_does(two_ranks):
    """The verdict's rate check (a collective decision, like λ's) cuts the dictionary's rate on every rank at once,
    at the steps one process fed the ranks' rows interleaved cuts it."""
    single = OnlineSparseCoder(**LOOSE, replay=0)
    for a, b in zip(_finite_chunks(0), _finite_chunks(1)):
        single.partial_fit(a).partial_fit(b)
    assert single.trace_.rate_cuts and single.converged_
    for res in two_ranks:
        got = res["loose"]
        assert got["steps"] == single.n_steps_ and got["converged"]
        assert [c[0] for c in got["cuts"]] == [c[0] for c in single.trace_.rate_cuts]
        assert [c[1] for c in got["cuts"]] == pytest.approx([c[1] for c in single.trace_.rate_cuts], rel=1e-3)
        torch.testing.assert_close(got["dict"], single.dictionary_, atol=1e-4, rtol=0)
    assert torch.equal(two_ranks[0]["loose"]["dict"], two_ranks[1]["loose"]["dict"])


def test_partial_fit_with_every_ranks_counts_equals_the_exchange_and_rejects_wrong_counts(two_ranks):
    for rank, res in enumerate(two_ranks):
        got, want = res["counted"], res
        assert torch.equal(got["dict"], want["dict"]) and torch.equal(got["heldout"], want["heldout"])  # bit for bit
        assert got["lam"] == want["lam"]
        assert got["counts"] == (*want["counts"], 0)  # the caller dropped the NaN row: the learner counted none
        errors = res["count_errors"]
        assert len(errors) == 3 + rank, errors  # every wrong call raised (rank 1 also had its NaN row counted)
        assert all("counts must hold every rank's number of rows" in e for e in errors[:3]), errors
        assert "rank " + str(rank) in errors[1]
        if rank == 1:
            assert "NaN/Inf" in errors[3] and "check_finite=False" in errors[3]


def test_data_parallel_fit_counts_all_hooks_rows_with_one_collective_per_forward(two_ranks):
    """Per forward: one all-gather of every hook's row count (not one per hook). Per learner batch: one all-reduce
    of the Φ-gradient per Φ-step, at most one all-reduce for λ's warm-up and at most one all-gather of the held-out
    rows. Per learner, once: the width of the first rows (no d_in given) and the first batch's gather. Per fit: one
    check that every rank has the same number of batches. Nothing else."""
    n_forwards, n_hooks = len(_shards()[0]), len(HOOKS.split(","))
    for res in two_ranks:
        calls = Counter(res["collectives"])
        assert set(calls) <= set(KINDS), calls
        batches, steps = sum(res["batches"].values()), sum(res["phi_steps"].values())
        assert batches >= 2 * n_hooks  # each learner took several steps
        assert calls["same_batch_count"] == 1
        assert calls["finite_row_counts"] == n_forwards  # the empty batch's forward too
        assert calls["_all_gather_ints"] == n_hooks
        assert calls["_phi_grad"] == steps == batches  # phi_steps=1
        assert 1 <= calls["_mean_max"] <= batches
        assert n_hooks + 1 <= calls["_gather_ordered"] <= n_hooks + batches
    assert two_ranks[0]["collectives"] == two_ranks[1]["collectives"]  # the ranks' collectives match one for one


def test_data_parallel_needs_an_initialised_process_group(model):
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        SparsityCollector(model, hooks="blocks.0.hook_resid_post", parallel="data")
    assert SparsityCollector(model, hooks="blocks.0.hook_resid_post").parallel is None  # auto: off without dist
    with pytest.raises(ValueError, match="parallel must be"):
        SparsityCollector(model, hooks="blocks.0.hook_resid_post", parallel="hooks")


CK_HOOKS = "blocks.0.hook_resid_post,blocks.1.mlp.hook_post"
CK_OPTS = dict(batch_size=64, warmup_tokens=128, neurons=False, parallel="data")


def _ckpt_worker(rank: int, out: str) -> dict:
    from pathlib import Path

    from conftest import interrupted_and_resumed

    return interrupted_and_resumed(lambda: SparsityCollector(_model(), hooks=CK_HOOKS, **CK_OPTS), _shards()[rank],
                                   Path(out) / "ckpt", rank, crashed_rank=1)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_an_interrupted_data_parallel_fit_resumes_from_the_newest_checkpoint_every_rank_has(tmp_path):
    pytest.importorskip("transformer_lens.model_bridge")
    from conftest import on_two_gloo_ranks

    for res in on_two_gloo_ranks(_ckpt_worker, tmp_path, str(tmp_path)):
        assert res["n"][0] == res["n"][1]
        assert res["rows"][0] == res["rows"][1]  # the same report as the uninterrupted run
        assert list(res["same"]) == CK_HOOKS.split(",")  # every rank holds every hook's learner
        assert all(res["same"].values()), res["same"]  # bit for bit
