"""Hook-parallel collection over 2 CPU processes (gloo) equals one process fed the shards interleaved: learners,
covariance controls and neuron statistics (sent as raw activations, keep-masks and token ids of different shapes)."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
import torch.distributed as dist

from tl_sparsity import SparsityCollector
from tl_sparsity.scale.hook_parallel import HookParallelCollector, _pack, _unpack
from tl_sparsity.stats.side import NEURON_COLUMNS

HOOKS = "blocks.0.hook_resid_post,blocks.1.hook_resid_post,blocks.1.mlp.hook_post"
NEURON_HOOKS = ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]  # owned by rank 1 and rank 0
OPTS = {"batch_size": 128, "warmup_tokens": 256, "neurons": ",".join(NEURON_HOOKS), "controls": True,
        "neuron_options": {"sketch_width": 2**12}}


def _model():
    from conftest import make_model

    return make_model("bridge")


def _shards():
    """Rank 0's batches [4, 24], rank 1's [3, 17] (one of them left-padded): the ranks' shapes differ."""
    gen = torch.Generator().manual_seed(5)
    a = [torch.randint(1, 200, (4, 24), generator=gen) for _ in range(4)]
    b: list = [torch.randint(1, 200, (3, 17), generator=gen) for _ in range(4)]
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[0, :5] = mask[2, :2] = 0
    b[2] = (b[2], mask)
    return a, b  # rank 0 gets A, rank 1 gets B


def _worker(rank: int) -> dict:
    """One rank's results (run by conftest.on_two_gloo_ranks)."""
    model = _model()
    default = HookParallelCollector(model, hooks=HOOKS, batch_size=128).neuron_hooks
    col = HookParallelCollector(model, hooks=HOOKS, **OPTS)
    col.fit(_shards()[rank], progress=False)
    rep = col.report()
    dicts = {n: col.learners[n].dictionary_.clone() for n in col.owned()}
    neurons = {n: col.extras[n].neurons.state_dict() for n in col.owned() if n in NEURON_HOOKS}
    unowned = [n for n in NEURON_HOOKS if n not in col.owned() and col.extras[n].neurons is not None]
    return {"report": rep.to_dict(), "dicts": dicts, "n_tokens": col.n_tokens, "neurons": neurons,
            "unowned_with_stats": unowned, "default_neuron_hooks": default}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_hook_parallel_over_two_processes_equals_one_process_fed_the_shards_interleaved(tmp_path):
    pytest.importorskip("transformer_lens.model_bridge")
    from conftest import on_two_gloo_ranks

    results = on_two_gloo_ranks(_worker, tmp_path)
    a, b = _shards()
    single = SparsityCollector(_model(), hooks=HOOKS, **OPTS)
    single.fit([x for pair in zip(a, b) for x in pair], progress=False)
    want = single.report().to_dict()
    for res in results:  # the full report on every rank, equal to the single process's
        got = res["report"]
        assert [r["hook"] for r in got["rows"]] == [r["hook"] for r in want["rows"]]
        for g, w in zip(got["rows"], want["rows"]):
            for k in ("n_tokens", "n_heldout", "lam", "normalized_loss", "fvu", "control_normalized_loss"):
                assert g[k] == w[k], (g["hook"], k, g[k], w[k])
            for k in NEURON_COLUMNS:  # NaN / None on the hook without neuron statistics
                assert _same(g[k], w[k]), (g["hook"], k, g[k], w[k])
            assert (g["n_dead"] is None) == (g["hook"] not in NEURON_HOOKS)
        assert list(got["tables"]) == list(want["tables"]) == [f"neurons/{n}" for n in NEURON_HOOKS]
        assert repr(got["tables"]) == repr(want["tables"])  # every neuron's record, NaN included
        assert got["meta"]["neurons"] == want["meta"]["neurons"]  # token counts from each hook's owner
        assert res["n_tokens"] == single.n_tokens
        assert res["unowned_with_stats"] == []  # statistics live on the owner only
        assert res["default_neuron_hooks"] == ["blocks.1.mlp.hook_post"]  # neurons=None: on for mlp_post
    owners = {n: r for r in range(2) for n in results[r]["dicts"]}
    assert owners == {"blocks.0.hook_resid_post": 0, "blocks.1.hook_resid_post": 1, "blocks.1.mlp.hook_post": 0}
    for name, r in owners.items():  # each learner lives on one rank only, bit-identical to the single process's
        assert torch.equal(results[r]["dicts"][name], single.learners[name].dictionary_)
    for name in NEURON_HOOKS:  # the owner's NeuronStats state equals the single process's, tensor for tensor
        got, ref = results[owners[name]]["neurons"][name], single.extras[name].neurons.state_dict()
        assert got.keys() == ref.keys() and got["n_tokens"] == ref["n_tokens"] > 0 and got["track_tokens"] is True
        for k, v in ref.items():
            assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, (name, k)
    fired = single.extras["blocks.1.mlp.hook_post"].neurons.fire_count
    assert 0 < int(fired.sum()) < single.extras["blocks.1.mlp.hook_post"].neurons.n_tokens * fired.numel()


def _same(a, b) -> bool:
    nan = [isinstance(x, float) and math.isnan(x) for x in (a, b)]
    return all(nan) or (not any(nan) and a == b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_neuron_inputs_travel_bit_for_bit_with_chunks_of_different_shapes(dtype):
    gen = torch.Generator().manual_seed(0)
    chunks, want = [], []
    for b, p, tokens in [(2, 5, True), (3, 4, False), (1, 3, True)]:
        acts = (torch.randn(b, p, 6, generator=gen) * 3).to(dtype)
        keep = torch.rand(b, p, generator=gen) > 0.3
        keep[0, 0] = True
        toks = torch.randint(0, 50_000, (b, p), generator=gen) if tokens else None
        rows = acts.reshape(b, p, 6)[keep].to(torch.float32)  # as SparsityCollector.rows builds them
        chunks.append((rows, acts, toks, keep))
        want.append((rows, acts, toks, keep))
    chunks.append((torch.zeros(0, 6), torch.zeros(1, 2, 6, dtype=dtype), None, torch.zeros(1, 2, dtype=torch.bool)))
    data, n_kept, flag = _pack(chunks, torch.device("cpu"))
    assert data.dtype == torch.uint8 and data.numel() % 8 == 0
    assert n_kept == sum(int(k.sum()) for _, _, _, k in want) and flag == 3  # the empty chunk is left out
    got = _unpack(data.clone(), tokens=True)
    assert len(got) == 3
    sent = dtype if dtype != torch.float8_e4m3fn else torch.float32  # dtypes gloo may lack travel as float32
    for (rows, acts, toks, keep), (r, a, t, k) in zip(want, got):
        assert a.dtype == sent and torch.equal(a, acts.to(sent)) and torch.equal(k, keep) and k.dtype == torch.bool
        assert torch.equal(r, rows) and r.dtype == torch.float32
        assert (t is None) == (toks is None) and (t is None or (t.dtype == torch.int64 and torch.equal(t, toks)))
    assert all(t is None for _, _, t, _ in _unpack(data, tokens=False))


def test_token_ids_from_some_ranks_only_are_refused_on_every_rank():
    col = types.SimpleNamespace(_with_tokens={})
    flag = HookParallelCollector._tokens_flag
    assert flag(col, "h", [0, 0]) is None and flag(col, "h", [1, 0]) is True and flag(col, "h", [2, 2]) is False
    with pytest.raises(ValueError, match="some ranks and none from others"):
        flag(col, "h", [1, 2])
    col._with_tokens["h"] = True
    with pytest.raises(ValueError, match="started with token ids"):
        flag(col, "h", [2, 0])
    col._with_tokens["h"] = False  # started without: tokens are dropped with a warning, as SparsityCollector does
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert flag(col, "h", [1, 2]) is False
    assert any("started without token ids" in str(w.message) for w in caught)


def test_hook_parallel_needs_an_initialised_process_group(model):
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        HookParallelCollector(model, hooks="blocks.0.hook_resid_post")


def _ckpt_worker(rank: int, out: str) -> dict:
    from pathlib import Path

    from conftest import interrupted_and_resumed

    opts = {**OPTS, "controls": False}
    res = interrupted_and_resumed(lambda: HookParallelCollector(_model(), hooks=HOOKS, **opts),
                                  _shards()[rank], Path(out) / "ckpt", rank, crashed_rank=0)
    return {**res, "owned": HookParallelCollector(_model(), hooks=HOOKS, **opts).owned()}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_an_interrupted_hook_parallel_fit_resumes_from_the_newest_checkpoint_every_rank_has(tmp_path):
    pytest.importorskip("transformer_lens.model_bridge")
    from conftest import on_two_gloo_ranks

    for res in on_two_gloo_ranks(_ckpt_worker, tmp_path, str(tmp_path)):
        assert list(res["same"]) == res["owned"] and all(res["same"].values()), res  # every owned one, bit for bit
        assert res["n"][0] == res["n"][1] > 0
        assert res["rows"][0] == res["rows"][1]  # the same report, neuron columns included


def test_comm_device_names_a_missing_set_device_under_nccl(monkeypatch):
    """Under NCCL a process with LOCAL_RANK > 0 still on cuda:0 would collide with local rank 0 ("Duplicate GPU
    detected" deep inside NCCL): comm_device says what to call instead. gloo collectives run on the CPU."""
    from tl_sparsity.scale.ranks import comm_device

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert comm_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match=r"torch.cuda.set_device\(int\(os.environ\['LOCAL_RANK'\]\)\)"):
        comm_device()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert comm_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert comm_device() == torch.device("cuda", 1)


def test_the_former_module_still_gives_the_hook_parallel_collector_with_a_deprecation_warning():
    import tl_sparsity
    from tl_sparsity.scale import modes

    with pytest.warns(DeprecationWarning, match="moved to tl_sparsity.scale.hook_parallel"):
        from tl_sparsity.distributed import HookParallelCollector as former, _pack as former_pack
    assert former is HookParallelCollector is tl_sparsity.HookParallelCollector and former_pack is _pack
    assert tl_sparsity.SparsityCollector is modes.SparsityCollector
    assert issubclass(HookParallelCollector, tl_sparsity.SparsityCollector)  # every mode is a SparsityCollector
    assert issubclass(tl_sparsity.DataParallelCollector, tl_sparsity.SparsityCollector)
