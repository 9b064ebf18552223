"""Issue 18, item 2: one collector feeds each hook point at most once per forward, whatever mix of ``start()``,
``fwd_hooks()``, ``attach()`` and ``fit()`` is used — a mix that would count rows twice raises a clear error
(``tl_sparsity.tl.attach.DoubleCountError``) instead, and leaves the learners as they were."""

import pytest
import torch

from tl_sparsity import SparsityCollector

RESID = "blocks.0.hook_resid_post"


def _tokens(seed=0, batch=2, pos=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 200, (batch, pos), generator=g)


def _col(model):
    return SparsityCollector(model, hooks=RESID, parallel=None)


def _seen(col):
    lr = col.learners[RESID]
    return lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_


def _error():
    try:
        from tl_sparsity.tl.attach import DoubleCountError
    except ImportError:  # the code before the fix had no such error: any error at all will do to fail the test
        return RuntimeError
    return DoubleCountError


def _attach_and_run(model, col, x):
    with col.attach():
        model(x)


MIXES = {
    "start+fwd_hooks": lambda m, c, x: m.run_with_hooks(x, fwd_hooks=c.fwd_hooks()),
    "start+attach": _attach_and_run,
    "start+fit": lambda m, c, x: c.fit([x], progress=False),
}


@pytest.mark.parametrize("mix", MIXES)
def test_a_started_collector_refuses_a_second_set_of_hooks(model, mix):
    col = _col(model).start()
    try:
        with pytest.raises(_error(), match="twice"):
            MIXES[mix](model, col, _tokens())
        model(_tokens(1))  # still started: each forward once
        assert _seen(col) == 2 * 15
    finally:
        col.stop()
    assert not any(hp.fwd_hooks for hp in dict(model.hook_dict).values())


def test_fwd_hooks_made_before_start_are_caught_during_the_forward(model):
    col = _col(model)
    early = col.fwd_hooks()  # fine on its own
    col.start()
    try:
        with pytest.raises(_error(), match="twice"):
            model.run_with_hooks(_tokens(), fwd_hooks=early)
        assert _seen(col) == 0  # the failed forward fed nothing (start()'s rows are fed when a forward completes)
    finally:
        col.stop()
    model.run_with_hooks(_tokens(), fwd_hooks=early)  # stopped: the list counts once
    assert _seen(col) == 30


def test_attach_nested_or_with_fit_or_two_fwd_hooks_lists(model):
    col = _col(model)
    with col.attach():
        with pytest.raises(_error(), match="twice"):
            with col.attach():
                pass
        with pytest.raises(_error(), match="twice"):
            col.fit([_tokens()], progress=False)
        with pytest.raises(_error(), match="twice"):
            col.fwd_hooks()
        with pytest.raises(_error(), match="twice"):
            col.start()
        model(_tokens())
    assert _seen(col) == 30
    with pytest.raises(_error(), match="twice"):
        model.run_with_hooks(_tokens(), fwd_hooks=col.fwd_hooks() + col.fwd_hooks())
    assert _seen(col) == 60  # the first list's hook fed its rows once (fwd_hooks() feed during the forward)


def test_each_way_alone_counts_each_row_once(model):
    x = _tokens()
    counts = []
    for way in ("start", "attach", "fwd_hooks", "fit"):
        col = _col(model)
        if way == "start":
            col.start()
            model(x)
            col.stop()
        elif way == "attach":
            with col.attach():
                model(x)
        elif way == "fwd_hooks":
            model.run_with_hooks(x, fwd_hooks=col.fwd_hooks())
        else:
            col.fit([x], progress=False)
        counts.append(_seen(col))
    assert counts == [30, 30, 30, 30]


def test_an_activation_reused_by_a_later_forward_is_not_a_double(model):
    """A cached residual passed again (``start_at_layer``) reaches ``hook_resid_pre`` as the very same tensor in
    each forward: every forward counts it once, and no error."""
    if "Bridge" in type(model).__name__:
        pytest.skip("TransformerBridge has no start_at_layer")
    name = "blocks.1.hook_resid_pre"
    _, cache = model.run_with_cache(_tokens(), names_filter=name)
    resid = cache[name]
    col = SparsityCollector(model, hooks=name, parallel=None)
    for _ in range(2):
        model.run_with_hooks(resid, start_at_layer=1, fwd_hooks=col.fwd_hooks())
    with col.attach():
        model(resid, start_at_layer=1)
        model(resid, start_at_layer=1)
    col.start()
    try:
        model(resid, start_at_layer=1)
        model(resid, start_at_layer=1)
    finally:
        col.stop()
    lr = col.learners[name]
    assert lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_ == 6 * 30
