"""The two ``torch.distributed`` modes have one shape (``tl_sparsity/scale/``): the same constructor and methods on
one base; what a mode cannot run (fit(until=...) in both, fwd_hooks() in hook-parallel mode) raises naming the mode
and the alternative; ``save`` / ``load`` round-trip per rank;
``tl_sparsity.SparsityCollector(parallel=...)`` builds the data-parallel one. Run on 2 CPU processes (gloo)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

import tl_sparsity
from tl_sparsity.scale.data_parallel import DataParallelCollector
from tl_sparsity.scale.hook_parallel import HookParallelCollector
from tl_sparsity.scale.ranked import RankedCollector
from tl_sparsity.tl.collector import SparsityCollector as OneProcess

HOOKS = "blocks.0.hook_resid_post,blocks.1.mlp.hook_post"
OPTS = {"batch_size": 64, "warmup_tokens": 128, "neurons": False}


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_both_modes_have_one_base_one_constructor_and_the_collectors_methods():
    for mode in (DataParallelCollector, HookParallelCollector):
        assert mode.__bases__ == (RankedCollector,) and issubclass(mode, OneProcess)
        assert issubclass(mode, tl_sparsity.SparsityCollector)  # every collector is the package's SparsityCollector
        assert list(inspect.signature(mode.__init__).parameters) == ["self", "model", "hooks", "group", "options"]
        assert _public(OneProcess) <= _public(mode)
    assert _public(DataParallelCollector) == _public(HookParallelCollector) - {"owned"}
    assert {DataParallelCollector.parallel, HookParallelCollector.parallel} == {"data", "hooks"}


def _model():
    from conftest import make_model

    return make_model("bridge")


def _shard(rank: int) -> list:
    gen = torch.Generator().manual_seed(11 + rank)
    return [torch.randint(1, 200, (3, 20), generator=gen) for _ in range(3)]


def _errors(fn) -> str:
    try:
        fn()
    except (NotImplementedError, ValueError) as e:
        return str(e)
    return ""


def _worker(rank: int, out: str) -> dict:
    from pathlib import Path

    model, res = _model(), {}
    auto = tl_sparsity.SparsityCollector(model, hooks=HOOKS, **OPTS)  # parallel="auto" under 2 ranks: data-parallel
    res["auto"] = (type(auto).__name__, auto.parallel, isinstance(auto, tl_sparsity.SparsityCollector))
    res["alone"] = type(tl_sparsity.SparsityCollector(model, hooks=HOOKS, parallel=None, **OPTS)).__name__
    for mode in (DataParallelCollector, HookParallelCollector):
        col = mode(model, hooks=HOOKS, **OPTS).fit(_shard(rank), progress=False)
        name = mode.__name__
        res[f"{name} until"] = _errors(lambda: col.fit(_shard(rank), progress=False, until="converged"))
        if mode is HookParallelCollector:
            res[f"{name} fwd_hooks"] = _errors(col.fwd_hooks)
        mine = col.owned() if mode is HookParallelCollector else list(col.learners)
        pending = sum(col.learners[n].n_pending_ for n in mine)
        col.flush()  # works in both: each rank trains the hooks it owns / the ranks' shared pending rows
        res[f"{name} flushed"] = (pending, sum(col.learners[n].n_pending_ for n in mine))
        saved = col.save(Path(out) / name)
        back = mode.load(Path(out) / name, _model())
        res[f"{name} saved"] = str(saved.parent.name)
        res[f"{name} same"] = (repr(col.report().to_dict()["rows"]) == repr(back.report().to_dict()["rows"]),
                               type(back).__name__, back.n_tokens == col.n_tokens)
        one = tl_sparsity.SparsityCollector.load(saved.parent, _model())  # one rank's folder, in one process
        res[f"{name} one"] = (type(one).__name__, one.parallel)
    fitted = DataParallelCollector(model, hooks=HOOKS, **OPTS).fit(_shard(rank), progress=False)
    attached, hooked = DataParallelCollector(model, hooks=HOOKS, **OPTS), DataParallelCollector(model, hooks=HOOKS,
                                                                                                 **OPTS)
    for tokens in _shard(rank):  # data-parallel: any forward that every rank runs feeds the shared learners
        with attached.attach():
            model(tokens, return_type=None)
        model.run_with_hooks(tokens, fwd_hooks=hooked.fwd_hooks(), return_type=None)
    res["attached"] = [(col.n_tokens, {n: lr.dictionary_ for n, lr in col.learners.items()})
                       for col in (fitted, attached, hooked)]
    # hook-parallel: attach() and start() gather each whole forward to the owners, as fit() does
    fitted = HookParallelCollector(model, hooks=HOOKS, **OPTS).fit(_shard(rank), progress=False)
    attached, started = HookParallelCollector(model, hooks=HOOKS, **OPTS), HookParallelCollector(model, hooks=HOOKS,
                                                                                                **OPTS)
    for tokens in _shard(rank):
        with attached.attach():
            model(tokens, return_type=None)
    started.start()
    for tokens in _shard(rank):
        model(tokens, return_type=None)  # started: its hooks stay across forwards
    started.stop()
    res["hook attached"] = [(col.n_tokens, {n: col.learners[n].dictionary_ for n in col.owned()},
                             repr(col.report().to_dict()["rows"])) for col in (fitted, attached, started)]
    return res


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_both_modes_save_load_and_refuse_what_they_cannot_run_naming_mode_and_alternative(tmp_path):
    pytest.importorskip("transformer_lens.model_bridge")
    from conftest import on_two_gloo_ranks

    for rank, res in enumerate(on_two_gloo_ranks(_worker, tmp_path, str(tmp_path))):
        assert res["auto"] == ("DataParallelCollector", "data", True)
        assert res["alone"] == "SparsityCollector"
        for key in ("DataParallelCollector until", "HookParallelCollector until"):
            assert "runs in one process" in res[key] and "n_tokens=" in res[key], res[key]
        msg = res["HookParallelCollector fwd_hooks"]
        assert "fwd_hooks() in hook-parallel mode (HookParallelCollector)" in msg and "col.attach()" in msg, msg
        for name in ("DataParallelCollector", "HookParallelCollector"):
            assert res[f"{name} flushed"][0] > 0 and res[f"{name} flushed"][1] == 0, res[f"{name} flushed"]
        for name in ("DataParallelCollector", "HookParallelCollector"):
            assert res[f"{name} saved"] == f"rank{rank:03d}-of-002"
            assert res[f"{name} same"] == (True, name, True), (name, res[f"{name} same"])
            assert res[f"{name} one"] == ("SparsityCollector", None)
        (n, want), *others = res["attached"]
        for got_n, got in others:  # attach() and fwd_hooks() learn what fit() learns from the same forwards
            assert got_n == n > 0 and got.keys() == want.keys()
            for name, d in want.items():
                torch.testing.assert_close(got[name], d, atol=1e-5, rtol=0)
        (n, want, report), *others = res["hook attached"]
        assert want  # each rank owns one of the two hooks
        for got_n, got, got_report in others:  # hook-parallel attach() and start(): what fit() learns, bit for bit
            assert got_n == n > 0 and got.keys() == want.keys() and got_report == report
            for name, d in want.items():
                assert torch.equal(got[name], d), name
