import pytest
import torch

from conftest import n_hooks
from tl_sparsity import SparsityCollector, SparsityReport

OPTS = dict(batch_size=128, warmup_tokens=512, reservoir_size=256)


def _tokens(b=6, p=17, seed=0):
    return torch.randint(1, 200, (b, p), generator=torch.Generator().manual_seed(seed))


def _record(col):
    """Replace every learner's ``batches`` (where a collector hands it rows) with a recorder of the rows it receives."""
    got = {name: [] for name in col.learners}
    for name, learner in col.learners.items():
        learner.batches = lambda x, check_finite=True, name=name: got[name].append(x.clone()) or []
    return got


def test_aliases_resolve_to_every_layer_with_ht_style_keys(model):
    col = SparsityCollector(model, hooks=["resid_post", "mlp_post"], **OPTS)
    n = model.cfg.n_layers
    assert set(col.hook_names) == {f"blocks.{i}.hook_resid_post" for i in range(n)} | {
        f"blocks.{i}.mlp.hook_post" for i in range(n)}
    assert len({id(hp) for hp in col.hook_points.values()}) == 2 * n


def test_globs_filters_and_exact_names(model):
    assert SparsityCollector(model, hooks="blocks.*.hook_resid_pre").hook_names == [
        f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
    assert SparsityCollector(model, hooks=lambda n: n == "blocks.1.hook_mlp_out").hook_names == [
        "blocks.1.hook_mlp_out"]
    col = SparsityCollector(model, hooks="blocks.0.hook_resid_post, blocks.0.hook_resid_post")
    assert col.hook_names == ["blocks.0.hook_resid_post"]


def test_unknown_names_list_the_closest_valid_ones(model):
    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        SparsityCollector(model, hooks="blocks.0.hook_resid_pst")
    with pytest.raises(KeyError, match="Aliases"):
        SparsityCollector(model, hooks="residpost")
    with pytest.raises(TypeError, match="TransformerLens model"):
        SparsityCollector(torch.nn.Linear(2, 2))


def test_collected_rows_equal_run_with_cache_activations_masked(model):
    tokens = _tokens()
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0  # left padding in row 0
    mask[2, -3:] = 0  # right padding in row 2
    col = SparsityCollector(model, hooks="resid_post,mlp_post", **OPTS)
    got = _record(col)
    model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks(attention_mask=mask))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in col.hook_names)
    keep = mask.bool().clone()
    first = mask.int().argmax(dim=1)
    keep[torch.arange(tokens.shape[0]), first] = False  # BOS = first attended position
    for name in col.hook_names:
        want = cache[name].reshape(*tokens.shape, -1)[keep].float()
        (rows,) = got[name]
        assert rows.dtype == torch.float32
        assert torch.equal(rows, want), name


def test_without_mask_only_position_zero_is_dropped(model):
    tokens = _tokens()
    col = SparsityCollector(model, hooks="blocks.0.hook_resid_post", **OPTS)
    got = _record(col)
    model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks())
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    assert torch.equal(got["blocks.0.hook_resid_post"][0], cache["blocks.0.hook_resid_post"][:, 1:].reshape(-1, 32))


def test_logits_identical_with_collectors_beside_another_tools_hook(model):
    tokens = _tokens()
    seen = []

    def patch(act, hook):  # another tool that edits the residual stream in place
        act[:, 2] += 1.0
        return act

    def record(act, hook):
        seen.append(act.clone())

    others = [("blocks.0.hook_resid_post", patch), ("blocks.1.hook_resid_pre", record)]
    plain = model.run_with_hooks(tokens, fwd_hooks=others)
    plain_seen = seen.pop()
    col = SparsityCollector(model, hooks="resid_pre,resid_post,mlp_post", **OPTS)
    with_col = model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks() + others)
    assert torch.equal(plain, with_col)
    assert torch.equal(plain_seen, seen.pop())
    assert n_hooks(model) == 0


def test_no_hook_remains_after_attach_even_when_the_forward_raises(model):
    col = SparsityCollector(model, hooks="resid_post", **OPTS)
    with col.attach():
        assert n_hooks(model) == model.cfg.n_layers
        model(_tokens())
    assert n_hooks(model) == 0

    def boom(act, hook):
        raise RuntimeError("boom")

    hp = model.hook_dict["blocks.1.hook_resid_post"]
    with pytest.raises(RuntimeError, match="boom"):
        with col.attach():
            hp.add_hook(boom)
            model(_tokens())
    model.reset_hooks()
    assert n_hooks(model) == 0


def test_start_survives_reset_hooks_and_stop_leaves_none_and_others_untouched(model):
    col = SparsityCollector(model, hooks="resid_post", **OPTS)
    other = model.hook_dict["blocks.0.hook_resid_post"]
    other.add_hook(lambda act, hook: None, is_permanent=True)  # another tool's permanent hook
    col.start()
    col.start()  # idempotent
    assert n_hooks(model) == model.cfg.n_layers + 1
    model.reset_hooks()
    model(_tokens())
    model(_tokens(seed=1))
    assert col.n_tokens == 2 * 6 * 16
    col.stop()
    assert n_hooks(model) == 1  # only the other tool's hook is left
    model(_tokens())
    assert col.n_tokens == 2 * 6 * 16
    model.reset_hooks(including_permanent=True)


def test_works_under_no_grad_and_inference_mode_and_then_fit_and_report(model):
    col = SparsityCollector(model, hooks="blocks.1.hook_resid_post", **OPTS)
    with torch.inference_mode():
        model.run_with_hooks(_tokens(b=16), fwd_hooks=col.fwd_hooks())
    with torch.no_grad():
        model.run_with_hooks(_tokens(b=16, seed=1), fwd_hooks=col.fwd_hooks())
    col.fit((_tokens(b=8, seed=s) for s in range(100)), n_tokens=2000, progress=False)
    assert 2000 <= col.n_tokens - 2 * 16 * 16 < 2000 + 8 * 16
    rep = col.report()
    row = rep["blocks.1.hook_resid_post"]
    assert row["status"].startswith(("ok", "not converged")) and row["n_atoms"] == 8 * 32 and row["d_in"] == 32
    assert row["normalized_loss"] > 0 and row["normalized_loss_se"] > 0 and 0 <= row["fvu"] < 1


def test_report_views_and_lossless_json_round_trip(model, tmp_path):
    col = SparsityCollector(model, hooks="resid_post,mlp_post", **OPTS)
    col.fit([_tokens(b=16, seed=s) for s in range(6)], progress=False)
    rep = col.report()
    df = rep.df
    assert list(df.index) == col.hook_names
    for c in ("layer", "site", "d_in", "n_atoms", "n_tokens", "n_heldout", "lam", "normalized_loss",
              "normalized_loss_se", "coef_norm", "nnz", "fvu"):
        assert c in df.columns
    assert set(df["site"]) == {"resid_post", "mlp_post"}
    assert "±" in rep.to_markdown() and "<table" in rep._repr_html_()
    meta = rep.meta["model"]
    assert meta["transformer_lens"] and meta["dtype"] == "float32"
    assert meta["bridge"] == (type(model).__name__ == "TransformerBridge")
    back = SparsityReport.load(rep.save(tmp_path / "r.json"))
    assert back == rep and back.meta == rep.meta
    assert back.to_markdown() == rep.to_markdown()


def test_report_before_any_data_is_a_clear_error_and_unfired_hooks_are_flagged(model):
    col = SparsityCollector(model, hooks="resid_post", **OPTS)
    with pytest.raises(RuntimeError, match="no activations collected"):
        col.report()
    model.run_with_hooks(_tokens(b=16), fwd_hooks=col.fwd_hooks()[:1])
    with pytest.warns(UserWarning, match="never fired"):
        rows = col.report().rows
    assert rows[0]["status"].startswith("warming up") or rows[0]["status"].startswith(("ok", "not converged"))


def test_mask_of_the_wrong_shape_is_rejected(model):
    col = SparsityCollector(model, hooks="blocks.0.hook_resid_post", **OPTS)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.run_with_hooks(_tokens(), fwd_hooks=col.fwd_hooks(attention_mask=torch.ones(3, 3)))
    assert n_hooks(model) == 0


def test_collector_sees_another_tool_s_in_place_patch_only_when_that_hook_runs_first(model):
    # the order rule: hooks on one hook point run in the order they were added — fwd_hooks in list order, and
    # hooks added by col.start() / col.attach() before a run_with_hooks call before that call's fwd_hooks
    name = "blocks.0.hook_resid_post"
    tokens = _tokens()

    def patch(act, hook):
        act[:, 2] += 1.0

    _, cache = model.run_with_cache(tokens, names_filter=name)
    clean = cache[name].clone()
    patched = clean.clone()
    patched[:, 2] += 1.0
    for first, want in [(True, patched), (False, clean)]:
        col = SparsityCollector(model, hooks=name, **OPTS)
        got = _record(col)
        hooks = [(name, patch)] + col.fwd_hooks() if first else col.fwd_hooks() + [(name, patch)]
        model.run_with_hooks(tokens, fwd_hooks=hooks)
        assert torch.equal(got[name][0], want[:, 1:].reshape(-1, 32)), first
    col = SparsityCollector(model, hooks=name, **OPTS)
    got = _record(col)
    col.start()
    try:
        model.run_with_hooks(tokens, fwd_hooks=[(name, patch)])
    finally:
        col.stop()
    assert torch.equal(got[name][0], clean[:, 1:].reshape(-1, 32))
    assert n_hooks(model) == 0


def test_keep_mask_marks_exactly_the_positions_rows_keeps(model):
    col = SparsityCollector(model, hooks="blocks.0.hook_resid_post", **OPTS)
    act = torch.randn(3, 5, 2, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    keep = col.keep_mask(act, mask)
    want = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)  # BOS, padding dropped
    assert torch.equal(keep, want)
    assert torch.equal(col.rows(act, mask), act.reshape(3, 5, 8)[want])
    assert torch.equal(col.rows(act, keep=keep), col.rows(act, mask))
    no_bos = SparsityCollector(model, hooks="blocks.0.hook_resid_post", skip_bos=False, **OPTS)
    assert torch.equal(no_bos.keep_mask(act, mask), mask.bool()) and no_bos.keep_mask(act).all()


def test_rows_without_a_mask_are_the_rows_of_the_keep_mask_in_the_same_order(model):
    """Without a mask, rows() slices instead of indexing with the mask (no device sync); same rows, same order."""
    for skip_bos in (True, False):
        col = SparsityCollector(model, hooks="blocks.0.hook_resid_post", skip_bos=skip_bos, **OPTS)
        for shape in [(3, 5, 2, 4), (2, 1, 8), (0, 4, 8), (2, 0, 8)]:
            act = torch.randn(*shape).half()  # a half-precision model: rows are float32 copies
            got, want = col.rows(act), col.rows(act, keep=col.keep_mask(act))
            assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), (skip_bos, shape)
            assert got.numel() == 0 or got.data_ptr() != act.data_ptr()


def test_fit_passes_the_padding_mask_to_the_model_so_left_padding_does_not_change_real_tokens(model):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(1, 200, (1, 10), generator=gen), torch.randint(1, 200, (1, 6), generator=gen)
    padded = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])  # b left-padded
    mask = torch.ones_like(padded)
    mask[1, :4] = 0
    together = SparsityCollector(model, hooks="blocks.1.hook_resid_post", batch_size=4096, neurons=False)
    together.fit([(padded, mask)], progress=False)
    alone = SparsityCollector(model, hooks="blocks.1.hook_resid_post", batch_size=4096, neurons=False)
    alone.fit([a, b], progress=False)
    got = torch.cat(together.learners["blocks.1.hook_resid_post"]._pending)
    want = torch.cat(alone.learners["blocks.1.hook_resid_post"]._pending)
    assert got.shape == want.shape == (9 + 5, 32)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_collector_on_a_cpu_takes_short_learner_batches_unless_told(model):
    """On a CPU, one forward's learning stays short (tl_sparsity.coding.cpu): learner batches of 256 rows and 1 replay
    step, the same 8 dictionary steps per 1 024 rows as the defaults; either option given keeps the given options."""
    from tl_sparsity.coding.options import LearnerOptions

    name = "blocks.0.hook_resid_post"
    got = {k: SparsityCollector(model, hooks=name, **kw).learners[name] for k, kw in
           {"cpu": {}, "batch": {"batch_size": 512}, "replay": {"replay": 3}}.items()}
    assert (got["cpu"].batch_size, got["cpu"].replay) == (256, 1)
    assert (got["batch"].batch_size, got["batch"].replay) == (512, LearnerOptions().replay)
    assert (got["replay"].batch_size, got["replay"].replay) == (LearnerOptions().batch_size, 3)
