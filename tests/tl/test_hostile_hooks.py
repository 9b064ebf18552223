"""Hook points that are not ``[batch, pos, features]``, other tools' hooks inside ``fit``, and forwards that raise
under ``start()``."""

from importlib import metadata

import pytest
import torch

from conftest import n_hooks
from tl_sparsity import SparsityCollector

OPTS = dict(batch_size=128, warmup_tokens=512, reservoir_size=256)


def _tokens(b=6, p=17, seed=0):
    return torch.randint(1, 200, (b, p), generator=torch.Generator().manual_seed(seed))


def _sinks(col):
    """Record every completed forward's sink that ``fit`` hands to the learners (and still feed them)."""
    got, feed = [], col._feed

    def record(sink):
        got.append({name: [c[0].clone() for c in chunks] for name, chunks in sink.items()})
        feed(sink)

    col._feed = record
    return got


def _received(col):
    return {name: lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_ for name, lr in col.learners.items()}


# ---------------------------------------------------------------------------------------------- activation shapes
@pytest.mark.parametrize("site", ["hook_pattern", "hook_attn_scores"])
def test_attention_maps_are_refused_at_the_first_forward_naming_the_hook_and_its_shape(model, site):
    name = f"blocks.0.attn.{site}"
    tokens = _tokens()
    col = SparsityCollector(model, hooks=name, **OPTS)
    msg = rf"{name}.*\[batch, head, query, key\].*\(6, 4, 17, 17\).*hook_z"
    with pytest.raises(ValueError, match=msg):
        col.fit(tokens, progress=False)
    with pytest.raises(ValueError, match=msg):
        model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks())
    with pytest.raises(ValueError, match=msg):
        with col.attach():
            model(tokens)
    col.start()
    try:
        with pytest.raises(ValueError, match=msg):
            model(tokens)
    finally:
        col.stop()
    assert col.n_tokens == 0
    assert n_hooks(model) == 0


@pytest.mark.parametrize("site", ["hook_z", "hook_q", "hook_v"])
def test_per_head_activations_are_measured_flattened_to_head_times_d_head(model, site):
    name = f"blocks.1.attn.{site}"
    tokens = _tokens()
    col = SparsityCollector(model, hooks=name, **OPTS)
    got = _sinks(col)
    col.fit(tokens, progress=False)
    _, cache = model.run_with_cache(tokens, names_filter=name)
    act = cache[name]
    assert act.shape == (6, 17, 4, 8)
    (rows,) = got[0][name]
    assert torch.equal(rows, act[:, 1:].reshape(-1, 32).float())
    assert col.n_tokens == 6 * 16


def test_per_head_positions_must_match_the_tokens_of_the_forward(model):
    name = "blocks.0.attn.hook_z"
    col = SparsityCollector(model, hooks=name, **OPTS)
    tokens = _tokens()
    with pytest.raises(ValueError, match=rf"{name}.*\(6, 17, 4, 8\).*17 positions.*tokens.*\(6, 9\)"):
        model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks(tokens=tokens[:, :9]))
    assert col.n_tokens == 0
    model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks(tokens=tokens))
    assert col.n_tokens == 6 * 16


# ---------------------------------------------------------------------------------------- other tools' hooks in fit
def test_fit_runs_another_tool_s_hooks_in_every_forward_before_ours(model):
    name = "blocks.0.hook_resid_post"
    calls = []

    def record(act, hook):
        calls.append(tuple(act.shape))

    def edit(act, hook):  # another tool that replaces the activation
        return torch.full_like(act, 2.0)

    col = SparsityCollector(model, hooks=name, **OPTS)
    got = _sinks(col)
    batches = [_tokens(seed=0), _tokens(seed=1), _tokens(seed=2)]
    col.fit(batches, progress=False, fwd_hooks=[("blocks.1.hook_resid_pre", record), (name, edit)])
    assert calls == [(6, 17, 32)] * 3
    assert len(got) == 3
    for sink in got:
        (rows,) = sink[name]
        assert rows.shape == (6 * 16, 32) and torch.all(rows == 2.0)
    assert col.n_tokens == 3 * 6 * 16
    assert n_hooks(model) == 0


# --------------------------------------------------------------------------------- a forward that raises, start()
@pytest.mark.parametrize("how", ["attached", "run_with_hooks"])
def test_a_forward_that_raises_under_start_leaves_every_hook_with_the_same_rows(model, how):
    col = SparsityCollector(model, hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], **OPTS)
    n = [0]

    def boom(act, hook):  # another tool's hook, between ours, that fails on the 2nd forward
        n[0] += 1
        if n[0] == 2:
            raise RuntimeError("boom")

    other = "blocks.1.hook_resid_pre"
    if how == "attached":
        model.hook_dict[other].add_hook(boom)

        def forward(tokens):
            return model(tokens)
    else:
        def forward(tokens):
            return model.run_with_hooks(tokens, fwd_hooks=[(other, boom)])
    col.start()
    try:
        forward(_tokens(seed=0))
        assert set(_received(col).values()) == {6 * 16}
        with pytest.raises(RuntimeError, match="boom"):
            forward(_tokens(seed=1))
        assert set(_received(col).values()) == {6 * 16}
        forward(_tokens(seed=2))
    finally:
        col.stop()
        model.reset_hooks()
    assert set(_received(col).values()) == {2 * 6 * 16}
    assert n_hooks(model) == 0
    assert "forward" not in vars(model)  # stop() gives the model back as it was
    model(_tokens(seed=3))
    assert set(_received(col).values()) == {2 * 6 * 16}


def test_a_forward_that_raises_inside_attach_gives_its_rows_to_no_hook(model):
    """attach() holds a forward's rows until it returns, as start() does: before, the hooks that had already run
    kept the failed forward's rows and the others did not (blocks.0: 22 rows, blocks.1: 0)."""
    col = SparsityCollector(model, hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], **OPTS)

    def boom(act, hook):
        raise RuntimeError("boom")

    with col.attach():
        model(_tokens(seed=0))
        with pytest.raises(RuntimeError, match="boom"):
            model.run_with_hooks(_tokens(seed=1), fwd_hooks=[("blocks.1.hook_resid_pre", boom)])
        assert set(_received(col).values()) == {6 * 16}
        model(_tokens(seed=2))
    assert set(_received(col).values()) == {2 * 6 * 16}
    assert n_hooks(model) == 0 and "forward" not in vars(model)


def test_two_started_collectors_stopped_in_any_order_each_learn_whole_forwards_and_leave_the_model_as_it_was(model):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    a, b = SparsityCollector(model, hooks=hooks, **OPTS), SparsityCollector(model, hooks=hooks, **OPTS)
    a.start()
    b.start()
    try:
        model(_tokens(seed=0))
        _, cache = model.run_with_cache(_tokens(seed=1), names_filter=hooks[0])
        assert cache[hooks[0]].shape == (6, 17, 32)
        a.stop()  # under b's wrapper: left inert
        if model.tokenizer is not None or metadata.version("transformer-lens") >= "3":
            model.generate(_tokens(b=1, p=5), max_new_tokens=2, stop_at_eos=False, verbose=False)
        else:  # TransformerLens 2.x's generate asserts a tokenizer, which the tiny model has not
            model(_tokens(b=1, p=5))
        model(_tokens(seed=2))
    finally:
        a.stop()
        b.stop()
        model.reset_hooks()
    assert set(_received(a).values()) == {2 * 6 * 16}
    assert len(set(_received(b).values())) == 1 and _received(b)[hooks[0]] > 3 * 6 * 16
    assert "forward" not in vars(model) and n_hooks(model) == 0
