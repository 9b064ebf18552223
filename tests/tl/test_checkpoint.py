import json
import os
import struct

import pytest
import torch

from conftest import TINY, n_hooks
from helpers import BATCHES, HOOKS, OPTS, _tokens, assert_same_collector, assert_same_learner
from tl_sparsity import OnlineSparseCoder, SparsityCollector
from tl_sparsity.tl import checkpoint as ckpt
from tl_sparsity.tl.checkpoint import CheckpointError

def _interrupting(batches, at):
    """Yield ``batches`` and raise KeyboardInterrupt instead of batch ``at`` (Ctrl-C between batches)."""
    for i, b in enumerate(batches):
        if i == at:
            raise KeyboardInterrupt
        yield b


# ------------------------------------------------------------------------------------------------- learner
@pytest.mark.parametrize("k", [0, 100, 256, 700, 1111, 2999])
def test_learner_resumed_from_a_file_at_any_row_continues_bit_identically(tmp_path, k):
    # k: fresh; before the first batch (pending rows only); exactly one batch; inside warm-up; warm-up just over;
    # late, with the reservoir full and replacing
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    opts = dict(expansion=4, seed=7, batch_size=256, reservoir_size=300, warmup_tokens=1000, max_steps=16)
    whole = OnlineSparseCoder(**opts).partial_fit(x)
    first = OnlineSparseCoder(**opts).partial_fit(x[:k])
    path = first.save(tmp_path / "learner.safetensors")
    resumed = OnlineSparseCoder.load(path)
    assert_same_learner(first, resumed)
    resumed.partial_fit(x[k:])
    assert_same_learner(whole, resumed)
    assert whole.evaluate() == resumed.evaluate()


def test_state_dict_round_trip_copies_and_checks_parameters():
    x = torch.randn(700, 8, generator=torch.Generator().manual_seed(1))
    a = OnlineSparseCoder(expansion=2, batch_size=128, lam=0.3).partial_fit(x)
    b = OnlineSparseCoder(expansion=2, batch_size=128, lam=0.3).load_state_dict(a.state_dict())
    assert_same_learner(a, b)
    a.partial_fit(x)  # training the original must not move the restored copy
    assert not torch.equal(a.dictionary_, b.dictionary_)
    with pytest.raises(CheckpointError, match=r"expansion: saved 2, here 4"):
        OnlineSparseCoder(expansion=4, batch_size=128, lam=0.3).load_state_dict(a.state_dict())


def test_learner_file_is_plain_safetensors_with_a_json_header(tmp_path):
    from safetensors import safe_open

    c = OnlineSparseCoder(expansion=2, batch_size=64).partial_fit(torch.randn(150, 8))
    path = c.save(tmp_path / "c.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["tl_sparsity"])
        names = set(f.keys())
    assert meta["format"] == "tl_sparsity.learner" and meta["version"] == 1
    assert meta["params"]["d_in"] == 8 and meta["state"]["n_tokens_"] + meta["state"]["n_heldout_"] == 128
    assert names == {"dictionary", "mean", "adam_m", "adam_v", "reservoir", "rng_state", "pending", "probe", "replay"}


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_learner_file_is_rejected_with_its_name(tmp_path, damage):
    c = OnlineSparseCoder(expansion=2, batch_size=64).partial_fit(torch.randn(150, 8))
    path = c.save(tmp_path / "c.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-7]
    else:
        data[-3] ^= 0x10  # one bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c\.safetensors.*(corrupt|truncated)"):
        OnlineSparseCoder.load(path)


# ------------------------------------------------------------------------------------------------- collector
def test_fit_interrupted_then_resumed_from_its_checkpoint_equals_an_uninterrupted_fit(model, tmp_path):
    whole = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES, progress=False)
    col = SparsityCollector(model, hooks=HOOKS, **OPTS)
    with pytest.raises(KeyboardInterrupt):
        col.fit(_interrupting(BATCHES, 5), progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert n_hooks(model) == 0
    assert_same_collector(col, SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:5], progress=False))
    assert json.loads((tmp_path / "LATEST").read_text())["checkpoint"] == "ckpt-000002"  # after batches 2 and 4
    col.report()  # usable after the interrupt
    fresh = SparsityCollector(model, hooks=HOOKS, **OPTS)
    fresh.fit(BATCHES, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert_same_collector(whole, fresh)
    assert whole.report() == fresh.report()
    # the finished run left a final checkpoint; fitting the same stream again resumes at its end: a no-op
    again = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES, progress=False, checkpoint_dir=tmp_path)
    assert_same_collector(whole, again)


def test_resume_honours_n_tokens_of_the_interrupted_run(model, tmp_path):
    kw = dict(progress=False, n_tokens=200, checkpoint_dir=tmp_path, checkpoint_every=1)
    whole = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES, progress=False, n_tokens=200)
    assert whole.n_tokens == 4 * 64  # stops after the batch that reaches 200 rows
    with pytest.raises(KeyboardInterrupt):
        SparsityCollector(model, hooks=HOOKS, **OPTS).fit(_interrupting(BATCHES, 2), **kw)
    resumed = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES, **kw)
    assert_same_collector(whole, resumed)


def test_save_then_load_gives_the_same_collector_and_report(model, tmp_path):
    col = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:3], progress=False)
    folder = col.save(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["hooks"] == col.hook_names and manifest["d_in"] == {HOOKS.split(",")[0]: 32,
                                                                         HOOKS.split(",")[1]: 64}
    assert manifest["model"]["n_layers"] == 2 and manifest["options"] == OPTS
    assert manifest["neurons"] == [HOOKS.split(",")[1]] and manifest["controls"] is False  # mlp_post: on by default
    assert list(manifest["extras"]) == [HOOKS.split(",")[1]]
    back = SparsityCollector.load(tmp_path, model)
    assert_same_collector(col, back)
    assert back.report() == col.report()
    col.fit(BATCHES[3:], progress=False)
    back.fit(BATCHES[3:], progress=False)
    assert_same_collector(col, back)


def test_a_collector_saves_to_a_folder_and_a_file_given_instead_is_refused_naming_it(model, tmp_path):
    col = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:2], progress=False)
    n = col.n_tokens
    learner_file = col.learners[col.hook_names[0]].save(tmp_path / "one.safetensors")
    with pytest.raises(NotADirectoryError, match=r"one\.safetensors is a file; a collector is saved to a folder"):
        col.save(learner_file)
    with pytest.raises(NotADirectoryError, match=r"one\.safetensors is a file"):  # also a folder under a file
        col.save(learner_file / "run")
    with pytest.raises(NotADirectoryError, match=r"one\.safetensors is a file"):  # before any forward
        col.fit(BATCHES[2:4], progress=False, checkpoint_dir=learner_file)
    assert col.n_tokens == n and sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors"]
    assert_same_learner(OnlineSparseCoder.load(learner_file), col.learners[col.hook_names[0]])  # untouched


def test_load_given_a_file_names_what_it_looks_like_and_what_to_pass(model, tmp_path):
    import warnings

    col = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:2], progress=False)
    learner_file = col.learners[col.hook_names[0]].save(tmp_path / "one.safetensors")
    with pytest.raises(CheckpointError, match=r"one\.safetensors is a file, not a collector checkpoint folder: it "
                                              r"looks like a learner file.*OnlineSparseCoder\.load"):
        SparsityCollector.load(learner_file, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a report of two batches: not converged
        report_file = col.report().save(tmp_path / "report.json")
    with pytest.raises(CheckpointError, match=r"report\.json is a file.*saved report.*SparsityReport\.load"):
        SparsityCollector.load(report_file, model)
    folder = col.save(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"manifest\.json is a file of a collector checkpoint.*pass the folder"):
        SparsityCollector.load(folder / "manifest.json", model)
    with pytest.raises(CheckpointError, match=r"LATEST is a file of a collector checkpoint.*pass the folder"):
        SparsityCollector.load(tmp_path / "run" / "LATEST", model)
    with pytest.raises(CheckpointError, match=r"hook_000\.safetensors .*learner file.*checkpoint it belongs to"):
        SparsityCollector.load(folder / "hook_000.safetensors", model)
    with pytest.raises(CheckpointError, match=r"extra_001\.safetensors is a file holding one hook's side statistics"):
        SparsityCollector.load(folder / "extra_001.safetensors", model)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.txt is a file, not a collector checkpoint folder\. "
                                              r"SparsityCollector\.load takes the folder given to"):
        SparsityCollector.load(tmp_path / "notes.txt", model)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*nowhere.*does not exist"):
        SparsityCollector.load(tmp_path / "nowhere", model)
    assert_same_collector(col, SparsityCollector.load(tmp_path / "run", model))


def test_damaged_checkpoint_is_rejected_and_the_previous_one_is_intact(model, tmp_path):
    col = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:4], progress=False, checkpoint_dir=tmp_path,
                                                             checkpoint_every=2)
    two = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:2], progress=False)
    assert sorted(os.listdir(tmp_path)) == ["LATEST", "ckpt-000001", "ckpt-000002"]
    latest = tmp_path / "ckpt-000002"
    f0 = latest / "hook_000.safetensors"
    f0.write_bytes(f0.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match=r"hook_000\.safetensors.*corrupt or truncated.*ckpt-000001"):
        SparsityCollector.load(tmp_path, model)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):  # fit does not resume from it either
        col.fit(BATCHES, progress=False, checkpoint_dir=tmp_path)
    assert_same_collector(col, SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:4], progress=False))
    assert_same_collector(two, SparsityCollector.load(tmp_path / "ckpt-000001", model))
    manifest = latest / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"skip_bos": true', '"skip_bos": false'))
    with pytest.raises(CheckpointError, match=r"manifest\.json is corrupt"):
        SparsityCollector.load(tmp_path, model)


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_current(model, tmp_path, monkeypatch):
    col = SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:2], progress=False)
    col.save(tmp_path)
    before = SparsityCollector.load(tmp_path, model)
    col.fit(BATCHES[2:4], progress=False)
    real, calls = ckpt._write, []

    def disk_full_on_second_file(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "_write", disk_full_on_second_file)
    with pytest.raises(OSError, match="No space"):
        col.save(tmp_path)
    monkeypatch.setattr(ckpt, "_write", real)
    assert sorted(os.listdir(tmp_path)) == ["LATEST", "ckpt-000001"]  # no half-written folder left behind
    assert_same_collector(before, SparsityCollector.load(tmp_path, model))
    # a crash after the new folder is complete but before LATEST moves: LATEST still names the previous one
    monkeypatch.setattr(ckpt, "_write_atomic", lambda path, data: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        col.save(tmp_path)
    assert_same_collector(before, SparsityCollector.load(tmp_path, model))


def _bridge(**changes):
    pytest.importorskip("transformer_lens.model_bridge", reason="this TransformerLens has no TransformerBridge (2.x)")
    from transformer_lens.model_bridge import TransformerBridge

    try:
        from transformer_lens.config import TransformerBridgeConfig
    except ImportError:  # older 3.x layout
        from transformer_lens.model_bridge import TransformerBridgeConfig
    torch.manual_seed(0)
    return TransformerBridge.boot_native(TransformerBridgeConfig(**{**TINY, **changes}))


def test_loading_into_another_model_hook_set_width_options_or_stream_names_the_mismatch(tmp_path):
    model = _bridge()
    SparsityCollector(model, hooks=HOOKS, **OPTS).fit(BATCHES[:2], progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"n_layers: expected 2 \(checkpoint\), found 3 \(this model\)"):
        SparsityCollector.load(tmp_path, _bridge(n_layers=3))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.hook_post has d_in=64.*d_mlp is 48"):
        SparsityCollector.load(tmp_path, _bridge(d_mlp=48))
    other_hooks = SparsityCollector(model, hooks="blocks.0.hook_resid_post", **OPTS)
    with pytest.raises(CheckpointError, match=r"another hook set.*missing \['blocks\.1\.mlp\.hook_post'\]"):
        other_hooks.fit(BATCHES, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"expansion: saved 2, here 4"):
        SparsityCollector(model, hooks=HOOKS, **{**OPTS, "expansion": 4}).fit(BATCHES, progress=False,
                                                                              checkpoint_dir=tmp_path)
    col = SparsityCollector(model, hooks=HOOKS, **OPTS)
    with pytest.raises(CheckpointError, match=r"batch 1 of this stream differs"):
        col.fit(BATCHES[::-1], progress=False, checkpoint_dir=tmp_path)
    assert col.n_tokens == 0  # nothing was changed by the failed resume


def test_fit_checkpoint_options_are_validated(model, tmp_path):
    col = SparsityCollector(model, hooks=HOOKS, **OPTS)
    with pytest.raises(ValueError, match="checkpoint_every"):
        col.fit(BATCHES, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every"):
        col.fit(BATCHES, checkpoint_dir=tmp_path, checkpoint_every=0)


def test_header_of_a_learner_file_is_json_under_a_length_prefix(tmp_path):
    # what other tools (and a human with a hex editor) see: safetensors' 8-byte length, then JSON
    path = OnlineSparseCoder(expansion=2, batch_size=64).partial_fit(torch.randn(64, 4)).save(tmp_path / "a")
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert set(header) >= {"__metadata__", "dictionary", "rng_state"}
    assert header["dictionary"]["dtype"] == "F32" and header["dictionary"]["shape"] == [8, 4]


UNTIL = dict(batch_size=64, reservoir_size=48, expansion=2, max_steps=32, replay=3, warmup_steps=8, min_steps=60,
             probe_size=16, tol=0.05)


def test_fit_until_converged_freezes_each_hook_when_it_converges_stops_when_all_have_and_resumes(model, tmp_path):
    batches = [_tokens(100 + s) for s in range(80)]  # 64 rows per forward: one learner batch per hook
    taken: list[int] = []

    def counted(bs):
        for i, b in enumerate(bs):
            taken.append(i)
            yield b

    whole = SparsityCollector(model, hooks=HOOKS, **UNTIL).fit(counted(batches), until="converged", progress=False)
    assert len(taken) < len(batches)  # stopped early: every hook converged
    for name, lr in whole.learners.items():
        assert lr.converged_, (name, lr.convergence_)
        # frozen at once: one learner batch (1 + replay steps) earlier it had not converged
        assert not lr.trace_.verdict(lr.n_steps_ - (1 + lr.replay))["converged"], name
    rep = whole.report()
    rows = rep.rows
    assert all(r["converged"] for r in rows)
    # the report names the rule's steps: λ's checks, since when λ is unchanged, the rate cuts
    for name, lr in whole.learners.items():
        events = rep.tables[f"rule/{name}"]
        assert [e["step"] for e in events] == sorted(e["step"] for e in events)
        assert [[e["step"], e["level"]] for e in events if e["event"] == "rate cut"] == lr.trace_.rate_cuts
        assert [e["step"] for e in events if e["event"] == "lam unchanged since"] == [lr.trace_.lam_frozen_at]
        assert len([e for e in events if e["event"] == "lam check"]) == len(lr.trace_.lam_checks)
    # each verdict came after at least one cut of the rate that moved the level by at most tol (the row's evidence)
    assert all(whole.learners[r["hook"]].trace_.rate_cuts and abs(r["rate_change"]) <= UNTIL["tol"] for r in rows)
    # interrupted mid-run and resumed from its checkpoint: the same learners, bit for bit
    col = SparsityCollector(model, hooks=HOOKS, **UNTIL)
    with pytest.raises(KeyboardInterrupt):
        col.fit(_interrupting(batches, 10), until="converged", progress=False, checkpoint_dir=tmp_path,
                checkpoint_every=3)
    resumed = SparsityCollector(model, hooks=HOOKS, **UNTIL)
    resumed.fit(batches, until="converged", progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert_same_collector(whole, resumed)
    # a hook converged before the fit is frozen from the start (not fed at all) while the other one learns
    early = SparsityCollector(model, hooks=HOOKS, **UNTIL)
    done = early.learners["blocks.1.mlp.hook_post"]
    for s in range(200):
        if done.converged_:
            break
        done.partial_fit(torch.randn(64, 64, generator=torch.Generator().manual_seed(s)))
    assert done.converged_
    before = done.state_dict()
    early.fit(batches, until="converged", progress=False)
    assert done.n_tokens_ == before["meta"]["state"]["n_tokens_"] and torch.equal(
        done.dictionary_, before["tensors"]["dictionary"])
    assert early.learners["blocks.0.hook_resid_post"].converged_
    with pytest.raises(ValueError, match="until must be"):
        whole.fit(batches, until="forever")
    with pytest.raises(ValueError, match="n_tokens or max_tokens"):
        whole.fit(batches, n_tokens=10, max_tokens=10)
