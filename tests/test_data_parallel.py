"""Data-parallel learning over 2 CPU processes (gloo) equals one process fed the ranks' rows interleaved."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tl_sparsity import OnlineSparseCoder, SparsityCollector

HOOKS = "blocks.0.hook_resid_post,blocks.1.hook_resid_post,blocks.1.mlp.hook_post"
OPTS = dict(batch_size=128, warmup_tokens=256, controls=True, neurons="blocks.1.mlp.hook_post")
CODER = dict(expansion=4, batch_size=96, warmup_tokens=300, seed=3, reservoir_size=50)


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


def _worker(rank: int, world: int, init: str, out: str, with_model: bool) -> None:
    from tl_sparsity.data_parallel import DataParallelCoder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        coder = DataParallelCoder(**CODER)
        for x in _chunks(rank):
            coder.partial_fit(x)
        res = {"dict": coder.dictionary_, "lam": coder.lam_, "heldout": coder.heldout_.clone(),
               "counts": (coder.n_tokens_, coder.n_heldout_, coder.n_pending_), "global": coder.global_counts(),
               "eval": coder.evaluate()}
        if with_model:
            col = SparsityCollector(_model(), hooks=HOOKS, **OPTS)
            assert col.parallel == "data"
            col.fit(_shards()[rank], progress=False)
            rep = col.report()
            res["report"] = rep.to_dict()
            res["col_dicts"] = {n: lr.dictionary_.clone() for n, lr in col.learners.items()}
            res["n_tokens"] = col.n_tokens
        torch.save(res, f"{out}/rank{rank}.pt")
        dist.barrier()  # tear down together: gloo aborts a rank whose peer has already gone
    finally:
        dist.destroy_process_group()


def _run(tmp_path, with_model: bool) -> list[dict]:
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path), with_model), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_data_parallel_over_two_processes_equals_one_process_fed_the_ranks_rows_interleaved(tmp_path):
    pytest.importorskip("transformer_lens.model_bridge")
    results = _run(tmp_path, with_model=True)

    single = OnlineSparseCoder(**CODER)  # the learner: rank 0's rows, then rank 1's, call by call
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

    a, b = _shards()  # the collector: one process fed the shards interleaved batch by batch
    one = SparsityCollector(_model(), hooks=HOOKS, parallel=None, **OPTS)
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


def _ckpt_worker(rank: int, world: int, init: str, out: str) -> None:
    from pathlib import Path

    from conftest import interrupted_and_resumed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(interrupted_and_resumed(lambda: SparsityCollector(_model(), hooks=CK_HOOKS, **CK_OPTS),
                                           _shards()[rank], Path(out) / "ckpt", rank, crashed_rank=1),
                   f"{out}/ck{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_an_interrupted_data_parallel_fit_resumes_from_the_newest_checkpoint_every_rank_has(tmp_path):
    pytest.importorskip("transformer_lens.model_bridge")
    mp.spawn(_ckpt_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = torch.load(tmp_path / f"ck{r}.pt", weights_only=False)
        assert res["n"][0] == res["n"][1]
        assert res["rows"][0] == res["rows"][1]  # the same report as the uninterrupted run
        assert list(res["same"]) == CK_HOOKS.split(",")  # every rank holds every hook's learner
        assert all(res["same"].values()), res["same"]  # bit for bit
