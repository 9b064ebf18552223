"""Hook-parallel collection over 2 CPU processes (gloo) equals one process fed the shards interleaved."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tl_sparsity import SparsityCollector

HOOKS = "blocks.0.hook_resid_post,blocks.1.hook_resid_post,blocks.1.mlp.hook_post"
OPTS = dict(batch_size=128, warmup_tokens=256, neurons=False, controls=True)


def _model():
    from conftest import make_model

    return make_model("bridge")


def _shards():
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(1, 200, (4, 24), generator=gen) for _ in range(8)]
    return batches[0::2], batches[1::2]  # rank 0 gets A, rank 1 gets B


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from tl_sparsity.distributed import HookParallelCollector

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        col = HookParallelCollector(_model(), hooks=HOOKS, **OPTS)
        col.fit(_shards()[rank], progress=False)
        rep = col.report()
        dicts = {n: col.learners[n].dictionary_.clone() for n in col.owned()}
        torch.save({"report": rep.to_dict(), "dicts": dicts, "n_tokens": col.n_tokens}, f"{out}/rank{rank}.pt")
        dist.barrier()  # tear down together: gloo aborts a rank whose peer has already gone
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_hook_parallel_over_two_processes_equals_one_process_fed_the_shards_interleaved(tmp_path):
    pytest.importorskip("transformer_lens.model_bridge")
    init = f"file://{tmp_path}/store"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    a, b = _shards()
    single = SparsityCollector(_model(), hooks=HOOKS, **OPTS)
    single.fit([x for pair in zip(a, b) for x in pair], progress=False)
    want = single.report().to_dict()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for res in results:  # the full report on every rank, equal to the single process's
        got = res["report"]
        assert [r["hook"] for r in got["rows"]] == [r["hook"] for r in want["rows"]]
        for g, w in zip(got["rows"], want["rows"]):
            for k in ("n_tokens", "n_heldout", "lam", "normalized_loss", "fvu", "control_normalized_loss"):
                assert g[k] == w[k], (g["hook"], k, g[k], w[k])
        assert res["n_tokens"] == single.n_tokens
    owners = {n: r for r in range(2) for n in results[r]["dicts"]}
    assert owners == {"blocks.0.hook_resid_post": 0, "blocks.1.hook_resid_post": 1, "blocks.1.mlp.hook_post": 0}
    for name, r in owners.items():  # each learner lives on one rank only, bit-identical to the single process's
        assert torch.equal(results[r]["dicts"][name], single.learners[name].dictionary_)


def test_hook_parallel_needs_an_initialised_process_group(model):
    from tl_sparsity.distributed import HookParallelCollector

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        HookParallelCollector(model, hooks="blocks.0.hook_resid_post")
