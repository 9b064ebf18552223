import math
import os
import signal
import warnings

import pytest
import torch

from conftest import TINY, make_model, n_hooks
from helpers import BATCHES, HOOKS, OPTS, StubModel, assert_same_collector, assert_same_learner
from tl_sparsity import OnlineSparseCoder, SparsityCollector


def _tokens(seed, b=6, p=17):
    return torch.randint(1, 200, (b, p), generator=torch.Generator().manual_seed(seed))


def test_nan_and_inf_rows_are_dropped_counted_in_the_report_and_never_reach_the_dictionary(model):
    def poison(act, hook):  # another tool writes non-finite values at three positions of each forward
        act[0, 3] = float("nan")
        act[1, 5, 0] = float("inf")
        act[2, 0] = float("-inf")  # position 0 is BOS: excluded before the finiteness check, so not counted

    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]
    col = SparsityCollector(model, hooks=names, **OPTS)
    for s in range(5):
        model.run_with_hooks(_tokens(s), fwd_hooks=[(names[1], poison)] + col.fwd_hooks())
    clean, dirty = col.learners[names[0]], col.learners[names[1]]
    assert (clean.n_dropped_, dirty.n_dropped_) == (0, 2 * 5)
    for lr in (clean, dirty):
        assert lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_ + lr.n_dropped_ == 5 * 6 * 16
        assert torch.isfinite(lr.dictionary_).all() and torch.isfinite(lr.heldout_).all()
        assert torch.isfinite(lr._adam_m).all() and torch.isfinite(lr.mean_).all()
    rep = col.report()
    assert rep[names[1]]["n_dropped"] == 10 and rep[names[0]]["n_dropped"] == 0
    assert math.isfinite(rep[names[1]]["normalized_loss"])


def test_empty_and_all_masked_batches_change_nothing(model):
    col = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:2], progress=False)
    tokens = BATCHES[3]
    none, bos_only = torch.zeros_like(tokens), torch.zeros_like(tokens)
    bos_only[:, 0] = 1  # only the BOS position attended: it is dropped, nothing is left
    col.fit([torch.zeros(0, 17, dtype=torch.long), (tokens, none), {"input_ids": tokens, "attention_mask": bos_only}],
            progress=False)
    model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks(attention_mask=none))
    with col.attach(attention_mask=bos_only):
        model(tokens)
    col.learners[col.hook_names[0]].partial_fit(torch.empty(0, 32))
    assert_same_collector(col, SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:2], progress=False))
    assert n_hooks(model) == 0


def test_a_learner_given_no_finite_rows_stays_uninitialised():
    c = OnlineSparseCoder(batch_size=4)
    c.partial_fit(torch.empty(0, 8))
    c.partial_fit(torch.full((6, 8), float("nan")))
    assert not c.initialized and c.n_dropped_ == 6 and c.n_pending_ == 0 and c.d_in is None
    with pytest.raises(RuntimeError, match="no dictionary yet"):
        c.evaluate()


def _typed_model(kind, dtype):
    if kind != "hooked":
        return make_model(kind).to(dtype)
    import transformer_lens

    try:
        HookedTransformer, Config = transformer_lens.HookedTransformer, transformer_lens.HookedTransformerConfig
    except (ImportError, AttributeError):
        pytest.skip("this TransformerLens has no HookedTransformer (4.x)")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(Config(**TINY, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["hooked", "bridge", "bridge_compat"])
def test_half_precision_models_run_and_their_rows_reach_the_learner_as_float32(kind, dtype):
    model = _typed_model(kind, dtype).eval()
    names = HOOKS.split(",")
    col = SparsityCollector(model, hooks=names, **OPTS)
    got = {n: [] for n in names}
    for n, lr in col.learners.items():
        lr.batches = lambda x, check_finite=True, n=n: got[n].append(x) or []  # where a collector hands rows
    model.run_with_hooks(BATCHES[0], fwd_hooks=col.fwd_hooks())
    _, cache = model.run_with_cache(BATCHES[0], names_filter=lambda n: n in names)
    for n in names:
        assert cache[n].dtype == dtype
        (rows,) = got[n]
        assert rows.dtype == torch.float32
        assert torch.equal(rows, cache[n][:, 1:].reshape(-1, cache[n].shape[-1]).float())
    col = SparsityCollector(model, hooks=names, **OPTS).fit(BATCHES, progress=False)
    rep = col.report()
    assert rep.meta["model"]["dtype"] == str(dtype).replace("torch.", "")
    for n in names:
        assert col.learners[n].dictionary_.dtype == torch.float32
        assert rep[n]["status"].startswith(("ok", "not converged")) and math.isfinite(rep[n]["normalized_loss"])


def test_learner_device_option_receives_rows_of_any_float_dtype():
    x = torch.randn(300, 8, dtype=torch.float64)
    c = OnlineSparseCoder(expansion=2, batch_size=64, device="cpu").partial_fit(x)
    assert c.dictionary_.device.type == "cpu" and c.dictionary_.dtype == torch.float32
    assert_same_learner(c, OnlineSparseCoder(expansion=2, batch_size=64, device="cpu").partial_fit(x.float()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(("act_device", "learner_device"), [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", None)])
def test_activations_on_another_device_than_the_learner(act_device, learner_device, tmp_path):
    name = "blocks.0.hook_resid_post"
    col = SparsityCollector(StubModel(), hooks=name, device=learner_device, **OPTS)
    ref = OnlineSparseCoder(device="cpu", **OPTS)
    hook = col.fwd_hooks()[0][1]
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        act = torch.randn(4, 17, 32, generator=g, dtype=torch.float16)
        hook(act.to(act_device), hook=None)
        ref.partial_fit(act[:, 1:].reshape(-1, 32).float())
    lr = col.learners[name]
    want = learner_device or act_device  # None: the state lives where the first rows came from
    assert lr.dictionary_.device.type == want and lr.heldout_.device.type == want and lr.n_tokens_ == ref.n_tokens_
    assert lr.n_heldout_ == ref.n_heldout_ and lr.n_pending_ == ref.n_pending_
    torch.testing.assert_close(lr.mean_.cpu(), ref.mean_)
    col.save(tmp_path)
    back = SparsityCollector.load(tmp_path, StubModel(), device="cpu").learners[name]
    assert back.dictionary_.device.type == "cpu" and torch.equal(back.dictionary_, lr.dictionary_.cpu())
    assert back.evaluate()["n_eval"] == min(lr.n_heldout_, lr.reservoir_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_rows_from_several_devices_before_the_first_batch_join_the_first_rows_device():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    c = OnlineSparseCoder(expansion=2, batch_size=64, max_steps=8)
    c.partial_fit(x[:30].cuda()).partial_fit(x[30:50]).partial_fit(x[50:].cuda())
    assert c.dictionary_.device.type == "cuda" and c.n_tokens_ + c.n_heldout_ + c.n_pending_ == 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_on_the_gpu_feeds_a_cpu_learner():
    pytest.importorskip("transformer_lens")
    model = make_model("bridge").to("cuda")
    col = SparsityCollector(model, hooks=HOOKS, device="cpu", **OPTS).fit([b.cuda() for b in BATCHES],
                                                                            progress=False)
    assert all(lr.dictionary_.device.type == "cpu" for lr in col.learners.values())
    assert col.report().rows[0]["status"].startswith(("ok", "not converged"))


def test_a_hook_that_never_fires_is_flagged_instead_of_given_metrics(model):
    col = SparsityCollector(model, hooks="resid_post", **OPTS)
    col.fit(BATCHES, progress=False, stop_at_layer=1)  # the caller stops before layer 1
    with pytest.warns(UserWarning, match="blocks.1.hook_resid_post: no tokens: this hook never fired"):
        rep = col.report()
    assert rep["blocks.0.hook_resid_post"]["status"].startswith(("ok", "not converged"))
    row = rep["blocks.1.hook_resid_post"]
    assert row["status"].startswith("no tokens") and row["n_tokens"] == 0 and row["n_atoms"] is None


def test_keyboard_interrupt_inside_a_forward_leaves_whole_batches_no_hooks_and_a_usable_report(model):
    calls = []

    def ctrl_c_on_third_forward(act, hook):  # another tool, between our two hooks
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    model.hook_dict["blocks.1.hook_resid_pre"].add_hook(ctrl_c_on_third_forward, is_permanent=True)
    try:
        col = SparsityCollector(model, hooks=HOOKS, **OPTS)
        with pytest.raises(KeyboardInterrupt):
            col.fit(BATCHES, progress=False)
        assert n_hooks(model) == 1  # only the other tool's
    finally:
        model.reset_hooks(including_permanent=True)
    # the layer-0 hook had seen batch 2 when the interrupt came: its rows never reached the learner
    assert_same_collector(col, SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:2], progress=False))
    assert len(col.report()) == 2


def test_ctrl_c_during_a_learner_batch_is_delivered_after_that_batch():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    c = OnlineSparseCoder(expansion=2, batch_size=64, seed=3, max_steps=16)
    real = c._phi_step

    def phi_step_then_ctrl_c(xb, alpha, n_total):
        real(xb, alpha, n_total)
        if c.n_steps_ == 2 + c._replay_n + 1:  # in the middle of the second batch's update (each: 1 + replay steps)
            os.kill(os.getpid(), signal.SIGINT)

    c._phi_step = phi_step_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        c.partial_fit(x)
    del c._phi_step
    assert_same_learner(c, OnlineSparseCoder(expansion=2, batch_size=64, seed=3, max_steps=16).partial_fit(x[:128]))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_rows_of_the_wrong_width_name_the_hook_and_leave_no_hooks(model):
    col = SparsityCollector(model, hooks="blocks.0.hook_resid_post", d_in=16, **OPTS)
    with pytest.raises(ValueError, match=r"hook blocks\.0\.hook_resid_post: its learner has d_in=16 .* 32 features"):
        col.fit(BATCHES, progress=False)
    assert n_hooks(model) == 0 and col.n_tokens == 0
