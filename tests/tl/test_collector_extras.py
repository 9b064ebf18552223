"""Side statistics of the collector: covariance-matched controls and neuron statistics, in reports and checkpoints."""

import json
import math

import pytest
import torch

from conftest import make_model, n_hooks
from helpers import P_STAR, X, _set_planted_weights, assert_same_collector
from tl_sparsity import SparsityCollector, SparsityReport
from tl_sparsity.stats import side as extras_module
from tl_sparsity.tl.checkpoint import CheckpointError
from tl_sparsity.stats.controls import control_metrics
from tl_sparsity.stats.neurons import NeuronStats

# one learner batch per forward (4 sequences × 16 positions after BOS), short pursuits: fast on 2 CPU cores
OPTS = dict(batch_size=64, warmup_tokens=256, reservoir_size=48, expansion=2, max_steps=32)
NOPTS = dict(trigram_slots=64, sketch_width=4096, max_positions=32)  # small sketches: small checkpoints
RESID, MLP = "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"
HOOKS = f"{RESID},{MLP}"


def _tokens(seed, b=4, p=17):
    return torch.randint(1, 200, (b, p), generator=torch.Generator().manual_seed(seed))


BATCHES = [_tokens(s) for s in range(6)]


@pytest.fixture(scope="module")
def bridge():
    m = make_model("bridge")
    m.eval()
    return m


# ------------------------------------------------------------------------------------------------- controls
def test_covariance_holds_exactly_the_rows_the_learner_got_in_every_way_of_attaching(model):
    col = SparsityCollector(model, hooks=HOOKS, controls=True, **OPTS)
    calls = [_tokens(10 + i) for i in range(4)]
    masks = [torch.ones(4, 17, dtype=torch.long) for _ in calls]
    masks[0][0, :3] = 0  # left padding: BOS is the first attended position
    masks[3][1, -4:] = 0  # right padding
    model.run_with_hooks(calls[0], fwd_hooks=col.fwd_hooks(attention_mask=masks[0], tokens=calls[0]))
    with col.attach(attention_mask=masks[1], tokens=calls[1]):
        model(calls[1])
    col.attention_mask, col.tokens = masks[2], calls[2]
    col.start()
    try:
        model(calls[2])
    finally:
        col.stop()
    col.fit([(calls[3], masks[3])], progress=False)
    assert n_hooks(model) == 0
    for name in col.hook_names:
        want = []
        for tokens, mask in zip(calls, masks):
            _, cache = model.run_with_cache(tokens, names_filter=lambda n, name=name: n == name)
            keep = mask.bool().clone()
            keep[torch.arange(4), mask.argmax(1)] = False
            want.append(cache[name][keep].double())
        want = torch.cat(want)
        cov, lr = col.extras[name].cov, col.learners[name]
        assert cov.n == want.shape[0] == lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_
        torch.testing.assert_close(cov.mean, want.mean(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(cov.cov(), torch.cov(want.T), rtol=1e-10, atol=1e-12)
    assert col.extras[MLP].neurons.n_tokens == col.extras[MLP].cov.n  # the same positions


def test_rows_the_learner_drops_as_non_finite_are_left_out_of_the_covariance(bridge):
    col = SparsityCollector(bridge, hooks=RESID, controls=True, **OPTS)

    def poison(act, hook):
        act[1, 5, 0] = float("nan")
        act[2, 7, 3] = float("inf")

    bridge.run_with_hooks(BATCHES[0], fwd_hooks=[(RESID, poison)] + col.fwd_hooks())
    _, cache = bridge.run_with_cache(BATCHES[0], names_filter=RESID)
    keep = torch.ones(4, 17, dtype=torch.bool)
    keep[:, 0] = keep[1, 5] = keep[2, 7] = False
    cov, lr = col.extras[RESID].cov, col.learners[RESID]
    assert lr.n_dropped_ == 2 and cov.n == lr.n_tokens_ + lr.n_heldout_ + lr.n_pending_ == 62
    torch.testing.assert_close(cov.cov(), torch.cov(cache[RESID][keep].double().T), rtol=1e-10, atol=1e-12)


def test_control_columns_are_the_gaussian_learner_s_metrics_and_ratio_is_control_over_actual(bridge):
    col = SparsityCollector(bridge, hooks=HOOKS, controls=True, seed=3, **OPTS).fit(BATCHES, progress=False)
    rep = col.report()
    for name in col.hook_names:
        row, lr = rep[name], col.learners[name]
        assert row["status"].startswith(("ok", "not converged"))
        params = lr.get_params()
        assert params["d_in"] == row["d_in"] and params["seed"] == 3
        ref = control_metrics(col.extras[name].cov, params, n_rows=lr.n_tokens_ + lr.n_heldout_, seed=3)
        assert row["control_normalized_loss"] == ref["normalized_loss"]
        assert row["control_normalized_loss_se"] == ref["normalized_loss_se"]
        assert row["sparsity_ratio"] == row["control_normalized_loss"] / row["normalized_loss"]
    assert rep.meta["controls"]["computed"] and "covariance" in rep.meta["controls"]["method"]
    assert rep.meta["controls"]["n_rows"][RESID] == 6 * 64
    assert list(rep.df.columns)[-3:] == ["control_normalized_loss", "control_normalized_loss_se", "sparsity_ratio"]
    skipped = col.report(controls=False)
    assert "sparsity_ratio" not in skipped.df.columns and skipped.meta["controls"]["computed"] is False
    back = SparsityReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back == rep


def test_control_is_trained_once_per_row_count_and_not_at_all_when_skipped(bridge, monkeypatch):
    calls = []
    real = extras_module.control_metrics
    monkeypatch.setattr(extras_module, "control_metrics",
                        lambda *a, **k: calls.append(k["n_rows"]) or real(*a, **k))
    col = SparsityCollector(bridge, hooks=HOOKS, controls=True, **OPTS).fit(BATCHES[:4], progress=False)
    col.report(controls=False)
    assert calls == []
    first = col.report()
    assert calls == [256, 256]
    assert col.report() == first and calls == [256, 256]  # the second report is free
    col.fit(BATCHES[4:], progress=False)
    col.report()
    assert calls == [256, 256, 384, 384]
    with pytest.raises(ValueError, match="controls=True"):
        SparsityCollector(bridge, hooks=HOOKS, **OPTS).fit(BATCHES[:4], progress=False).report(controls=True)


# ------------------------------------------------------------------------------------------------- neurons
def test_neurons_default_to_mlp_post_hooks_and_can_be_chosen(bridge):
    hooks = "resid_post,mlp_pre,mlp_post"
    assert SparsityCollector(bridge, hooks=hooks).neuron_hooks == ["blocks.0.mlp.hook_post", MLP]
    assert SparsityCollector(bridge, hooks=hooks, neurons=False).neuron_hooks == []
    assert len(SparsityCollector(bridge, hooks=hooks, neurons=True).neuron_hooks) == 6
    assert SparsityCollector(bridge, hooks=hooks, neurons="mlp_pre").neuron_hooks == [
        "blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_pre"]
    assert SparsityCollector(bridge, hooks=hooks, neurons=[RESID]).neuron_hooks == [RESID]
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_attn_out.*add it to hooks="):
        SparsityCollector(bridge, hooks=hooks, neurons="blocks.0.hook_attn_out")
    with pytest.raises(ValueError, match="neuron_options.*valid keys"):
        SparsityCollector(bridge, hooks=hooks, neuron_options={"treshold": 0.1})


def test_report_has_neuron_columns_and_tables_for_neuron_hooks_only(bridge, tmp_path):
    col = SparsityCollector(bridge, hooks=HOOKS, neuron_options=NOPTS, **OPTS).fit(BATCHES, progress=False)
    rep = col.report()
    assert list(rep.tables) == [f"neurons/{MLP}"]
    ref = NeuronStats(64, **NOPTS)
    for tokens in BATCHES:
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n == MLP)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, 0] = False
        ref.update(cache[MLP], tokens, mask)
    s = ref.summary()
    for c in extras_module.NEURON_COLUMNS:
        assert rep[MLP][c] == s[c], c
    assert math.isnan(rep[RESID]["dead_frac"]) and rep[RESID]["n_dead"] is None
    df, want = rep.neurons(MLP), ref.result()
    assert rep.tables[f"neurons/{MLP}"] == json.loads(json.dumps(want.to_dict("records"), default=lambda v: v.item()))
    assert list(df.index) == list(range(64)) and df["kind"].tolist() == want["kind"].tolist()
    assert "covering_token_strings" not in df  # the tiny model has no tokenizer
    json.dumps(rep.tables)  # plain Python types only
    back = SparsityReport.load(rep.save(tmp_path / "r.json"))
    assert back == rep and back.neurons(MLP).equals(df)
    with pytest.raises(KeyError, match="no neuron statistics"):
        rep.neurons(RESID)
    assert rep.meta["neurons"]["hooks"] == [MLP] and rep.meta["neurons"]["n_tokens_seen"][MLP] == 6 * 64


class _Vocab:
    """A stand-in for a Hugging Face tokenizer."""

    def convert_ids_to_tokens(self, ids):
        return [f"<{i}>" for i in ids]


class _DecodeOnly:
    def decode(self, ids):
        assert len(ids) == 1  # every token on its own
        return f"[{ids[0]}]"


@pytest.mark.parametrize("tokenizer,fmt", [(_Vocab(), "<{}>"), (_DecodeOnly(), "[{}]")])
def test_covering_tokens_are_decoded_one_by_one_with_the_model_s_tokenizer(tokenizer, fmt):
    model = make_model("bridge")
    model.eval()
    _set_planted_weights(model)
    model.tokenizer = tokenizer
    col = SparsityCollector(model, hooks="blocks.0.mlp.hook_post", neuron_options=NOPTS, **OPTS)
    col.fit(_planted_batches(), progress=False)
    df = col.report().neurons("blocks.0.mlp.hook_post")
    assert df.loc[1, "covering_tokens"] == [X] and df.loc[1, "covering_token_strings"] == [fmt.format(X)]
    for ids, text in zip(df["covering_tokens"], df["covering_token_strings"]):
        assert text == [fmt.format(i) for i in ids]
    for tris, text in zip(df["covering_trigrams"], df["covering_trigram_strings"]):
        assert text == [[None if i is None else fmt.format(i) for i in tri] for tri in tris]


def _planted_batches():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 200, (64, 16), generator=g)
    tokens[torch.rand(64, 16, generator=g) < 0.15] = X
    return list(tokens.split(16))


def test_planted_neurons_found_through_the_collector_as_by_neuron_stats_fed_directly():
    model = make_model("bridge")
    model.eval()
    _set_planted_weights(model)
    name = "blocks.0.mlp.hook_post"
    col = SparsityCollector(model, hooks=name, neuron_options={"max_positions": 16}, **OPTS)
    batches = _planted_batches()
    col.fit(batches, progress=False)
    direct = NeuronStats(64, max_positions=16)
    for tokens in batches:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, 0] = False  # BOS
        direct.update(cache[name], tokens, mask)
    got, want = col.extras[name].neurons.state_dict(), direct.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k], k
    df = col.report().neurons(name)
    assert df["kind"].tolist()[:3] == ["dead", "token", "positional"] and (df["kind"][3:] == "other").all()
    assert df.loc[1, "covering_tokens"] == [X]
    assert df.loc[2, "position_mi"] > 0.05 and sorted(P_STAR) == [3, 7]


def test_tokens_given_on_some_calls_only_is_a_clear_error_that_changes_nothing(bridge):
    col = SparsityCollector(bridge, hooks=HOOKS, **OPTS)
    bridge.run_with_hooks(BATCHES[0], fwd_hooks=col.fwd_hooks(tokens=BATCHES[0]))
    before = col.extras[MLP].neurons.state_dict()
    hint = r"blocks\.1\.mlp\.hook_post.*pass tokens= to fwd_hooks/attach, or set col\.tokens, on every call, or on none"
    with pytest.raises(ValueError, match=hint), col.attach():
        bridge(BATCHES[1])
    with col.attach(attention_mask=torch.zeros(4, 17)):  # every position masked: nothing counted, tokens moot
        bridge(BATCHES[1])
    col.start()  # col.tokens not set
    try:
        with pytest.raises(ValueError, match="set col.tokens"):
            bridge(BATCHES[1])
        col.tokens = BATCHES[1][:, :5]
        with pytest.raises(ValueError, match=r"hook blocks\.1\.mlp\.hook_post: neuron statistics: tokens must be"):
            bridge(BATCHES[1])
    finally:
        col.stop()
    assert torch.equal(col.extras[MLP].neurons.state_dict()["fire_count"], before["fire_count"])
    col.fit(BATCHES[1:2], progress=False)  # fit passes its tokens: consistent
    assert col.extras[MLP].neurons.n_tokens == 2 * 64
    without = SparsityCollector(bridge, hooks=HOOKS, **OPTS)
    with torch.inference_mode():
        bridge.run_with_hooks(BATCHES[0], fwd_hooks=without.fwd_hooks())
    with pytest.warns(UserWarning, match="started without token ids, so fit goes on without them"):
        without.fit(BATCHES[1:2], progress=False)  # fit's tokens are implicit: dropped, not an error
    assert without.extras[MLP].neurons.n_tokens == 2 * 64 and not without.extras[MLP].neurons.track_tokens


def test_fit_feeds_side_statistics_only_after_the_forward_and_never_the_model_s_tensor(bridge):
    col = SparsityCollector(bridge, hooks=HOOKS, controls=True, **OPTS)
    forwards, model_acts, fed, real = [], [], [], col.extras[MLP].update
    col.extras[MLP].update = lambda rows, acts, *a: fed.append(acts.data_ptr()) or real(rows, acts, *a)

    def boom(act, hook):
        forwards.append(1)
        if len(forwards) == 2:
            raise KeyboardInterrupt  # Ctrl-C inside the second forward, after the collector's first hook ran

    bridge.hook_dict["blocks.1.hook_resid_pre"].add_hook(boom, is_permanent=True)
    bridge.hook_dict[MLP].add_hook(lambda act, hook: model_acts.append(act.data_ptr()),
                                   is_permanent=True)  # runs just before the collector's, on the same tensor
    try:
        with pytest.raises(KeyboardInterrupt):
            col.fit(BATCHES, progress=False)
    finally:
        bridge.reset_hooks(including_permanent=True)
    assert len(model_acts) == len(fed) == 1 and fed[0] != model_acts[0]  # a copy, not the model's tensor
    assert_same_collector(col, SparsityCollector(bridge, hooks=HOOKS, controls=True, **OPTS).fit(BATCHES[:1],
                                                                                            progress=False))


# ------------------------------------------------------------------------------------------------- checkpoints
def _interrupting(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise KeyboardInterrupt
        yield b


def test_resume_after_interrupt_is_bit_identical_including_covariance_and_neuron_statistics(bridge, tmp_path):
    kw = dict(hooks=HOOKS, controls=True, neuron_options=NOPTS, **OPTS)
    whole = SparsityCollector(bridge, **kw).fit(BATCHES, progress=False)
    col = SparsityCollector(bridge, **kw)
    with pytest.raises(KeyboardInterrupt):
        col.fit(_interrupting(BATCHES, 5), progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert_same_collector(col, SparsityCollector(bridge, **kw).fit(BATCHES[:5], progress=False))
    manifest = json.loads((tmp_path / "ckpt-000002" / "manifest.json").read_text())
    assert manifest["controls"] is True and manifest["neurons"] == [MLP] and manifest["neuron_options"] == NOPTS
    assert sorted(f["file"] for f in manifest["extras"].values()) == ["extra_000.safetensors",
                                                                     "extra_001.safetensors"]
    fresh = SparsityCollector(bridge, **kw).fit(BATCHES, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert_same_collector(whole, fresh)
    assert whole.report() == fresh.report()
    back = SparsityCollector.load(tmp_path, bridge)
    assert (back.controls, back.neuron_hooks, back.neuron_options) == (True, [MLP], NOPTS)
    assert_same_collector(whole, back)
    assert back.report().neurons(MLP).equals(whole.report().neurons(MLP))


def test_checkpoint_of_other_side_statistics_or_a_damaged_extras_file_is_refused_by_name(bridge, tmp_path):
    kw = dict(hooks=HOOKS, controls=True, neuron_options=NOPTS, **OPTS)
    SparsityCollector(bridge, **kw).fit(BATCHES[:2], progress=False, checkpoint_dir=tmp_path)
    for change, msg in [({"controls": False}, r"controls: saved True, here False"),
                        ({"neurons": False}, r"neurons: saved \['blocks\.1\.mlp\.hook_post'\], here \[\]"),
                        ({"neuron_options": {**NOPTS, "threshold": 0.5}}, r"neuron_options: saved .*threshold")]:
        col = SparsityCollector(bridge, **{**kw, **change})
        with pytest.raises(CheckpointError, match=msg):
            col.fit(BATCHES, progress=False, checkpoint_dir=tmp_path)
        assert col.n_tokens == 0
    f = next(tmp_path.glob("ckpt-*")) / "extra_001.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"extra_001\.safetensors \(hook blocks\.1\.mlp\.hook_post\) is corrupt"):
        SparsityCollector.load(tmp_path, bridge)
