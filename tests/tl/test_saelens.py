"""Issue 18, item 1: a collector next to SAELens. ``add_sae`` / ``reset_saes`` / ``run_with_saes`` replace
HookPoints; hook points are looked up by name when hooks are attached (before every forward for ``start()``), so
the collector neither goes blind nor breaks, measures what the user named (where an SAE sits: the SAE's input, the
model's activation there) and says so in the report's ``measured`` column. A real ``HookedSAETransformer`` with a
real, randomly initialised SAELens SAE (no downloads); skipped when sae_lens is not installed (it supports
TransformerLens 3.x: CI installs it on that leg)."""

import warnings

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed (CI: the TransformerLens 3.9 leg)")

from conftest import TINY  # noqa: E402

from tl_sparsity import SparsityCollector  # noqa: E402

R0, R1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
ROWS = 2 * 15  # one batch of 2 × 16 tokens, BOS dropped


@pytest.fixture
def sae_model():
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = sae_lens.HookedSAETransformer(HookedTransformerConfig(**TINY))
    return model.eval()


@pytest.fixture
def sae():
    cfg = sae_lens.StandardSAEConfig(d_in=TINY["d_model"], d_sae=48)
    cfg.metadata.hook_name = R0
    torch.manual_seed(1)
    return sae_lens.StandardSAE(cfg)


def _tokens(seed=0):
    return torch.randint(1, TINY["d_vocab"], (2, 16), generator=torch.Generator().manual_seed(seed))


def _seen(col, name):
    lr = col.learners[name]
    return lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_


def _measured(col):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {r["hook"]: r["measured"] for r in col.report(controls=False).rows}


def test_a_started_collector_sees_through_add_sae_reset_and_run_with_saes(sae_model, sae):
    col = SparsityCollector(sae_model, hooks="resid_post", parallel=None).start()
    try:
        sae_model(_tokens(0))
        sae_model.add_sae(sae)
        sae_model(_tokens(1))
        sae_model.reset_saes()
        sae_model(_tokens(2))  # on the fresh HookPoint reset_saes put there (a collector holding the old one got 0 rows)
        sae_model.run_with_saes(_tokens(3), saes=[sae])
        sae_model.run_with_saes(_tokens(4), saes=[sae], use_error_term=True)
        sae(torch.randn(3, 5, TINY["d_model"]))  # the SAE run on its own, outside the model: not measured
        sae_model(_tokens(5))
    finally:
        col.stop()
    assert _seen(col, R0) == _seen(col, R1) == 6 * ROWS
    assert _measured(col) == {R0: f"{R0}; {R0}.hook_sae_input (the SAE's input: the model's activation there)",
                              R1: R1}
    assert not any(hp.fwd_hooks for hp in sae_model.hook_dict.values())
    assert not sae.hook_sae_input.fwd_hooks  # nothing left on the SAE once stopped


def test_the_sae_input_is_the_models_activation(sae_model, sae):
    """Where an SAE sits, the collector gets exactly the rows it would get without it."""
    x = _tokens()
    plain = SparsityCollector(sae_model, hooks=R0, parallel=None, controls=True)
    with plain.attach():
        sae_model(x)
    sae_model.add_sae(sae)
    through = SparsityCollector(sae_model, hooks=R0, parallel=None, controls=True)  # built with the SAE attached
    with through.attach():
        sae_model(x)
    a, b = plain.extras[R0], through.extras[R0]
    assert _seen(through, R0) == ROWS
    assert a.cov.n == b.cov.n == ROWS
    assert torch.equal(a.cov.mean, b.cov.mean) and torch.equal(a.cov.scatter, b.cov.scatter)
    assert "hook_sae_input" in _measured(through)[R0]


def test_built_while_an_sae_is_attached_and_used_after_it_is_gone(sae_model, sae):
    sae_model.add_sae(sae)
    col = SparsityCollector(sae_model, hooks="resid_post", parallel=None)  # once a KeyError: no hook point named 'blocks.0.hook_resid_post'
    col.fit([_tokens(0)], progress=False)
    sae_model.reset_saes()
    col.fit([_tokens(1)], progress=False)
    sae_model.run_with_hooks(_tokens(2), fwd_hooks=col.fwd_hooks())
    with col.attach():
        sae_model.run_with_saes(_tokens(3), saes=[sae])
    assert _seen(col, R0) == _seen(col, R1) == 4 * ROWS
    assert "hook_sae_input" in _measured(col)[R0] and _measured(col)[R1] == R1


def test_explicit_sae_hook_points_measure_the_latents(sae_model, sae):
    sae_model.add_sae(sae)
    col = SparsityCollector(sae_model, hooks=[f"{R0}.hook_sae_acts_post", f"{R0}.hook_sae_input"], parallel=None,
                            controls=True)
    col.fit([_tokens()], progress=False)
    assert col.extras[f"{R0}.hook_sae_acts_post"].cov.d == 48  # the latents' width
    assert col.extras[f"{R0}.hook_sae_input"].cov.d == TINY["d_model"]
    assert _measured(col)[f"{R0}.hook_sae_acts_post"] == f"{R0}.hook_sae_acts_post (the SAE's latents)"
    col.start()  # started, its SAE's hook points wait while the SAE is away, and come back with it
    try:
        sae_model.reset_saes()
        sae_model(_tokens(1))
        sae_model.run_with_saes(_tokens(2), saes=[sae])
    finally:
        col.stop()
    assert _seen(col, f"{R0}.hook_sae_acts_post") == 2 * ROWS
    sae_model.reset_saes()
    with pytest.raises(KeyError, match=r"no SAE attached now: attach it first \(SAELens model.add_sae"):
        col.fit([_tokens()], progress=False)


def test_errors_name_the_sae_and_its_hook_points(sae_model, sae):
    with pytest.raises(KeyError, match="add_sae"):
        SparsityCollector(sae_model, hooks=f"{R0}.hook_sae_acts_post", parallel=None)
    sae_model.add_sae(sae)
    with pytest.raises(KeyError, match=rf"SAEs are attached at {R0}.*{R0}.hook_sae_input.*{R0}.hook_sae_acts_post"):
        SparsityCollector(sae_model, hooks="blocks.0.hook_resid_postt", parallel=None)


def test_fwd_hooks_lists_made_before_add_sae_still_work(sae_model, sae):
    """Once ``TypeError: Expected a module with add_hook, got _SAEWrapper``: the names are filters
    TransformerLens resolves when it attaches the hooks."""
    col = SparsityCollector(sae_model, hooks="resid_post", parallel=None)
    hooks = col.fwd_hooks()
    assert [n for n, _ in hooks] == [R0, R1]  # equal to the plain names
    sae_model.add_sae(sae)
    sae_model.run_with_hooks(_tokens(0), fwd_hooks=hooks)
    sae_model.reset_saes()
    sae_model.run_with_hooks_with_saes(_tokens(1), saes=[sae], fwd_hooks=col.fwd_hooks())
    sae_model.run_with_hooks(_tokens(2), fwd_hooks=hooks)
    assert _seen(col, R0) == _seen(col, R1) == 3 * ROWS
    assert _measured(col)[R0] == f"{R0}.hook_sae_input (the SAE's input: the model's activation there); {R0}"
    col.start()
    try:
        from tl_sparsity.tl.attach import DoubleCountError

        with pytest.raises(DoubleCountError, match="twice"):
            sae_model.run_with_hooks_with_saes(_tokens(), saes=[sae], fwd_hooks=hooks)
    finally:
        col.stop()
    assert _seen(col, R0) == 3 * ROWS  # the refused forward fed nothing
