"""Files edited by hand or by a hostile party: every edit of a learner file's header is caught, old files still
load with their fields range-checked, swapped learner files are caught, JSON of the wrong shape raises the
package's own error naming the file, the CLI reports those errors in one line, and stale temporaries are swept."""

import json
import math
import os
import struct
import time

import pytest
import torch

from conftest import make_model
from tl_sparsity import OnlineSparseCoder, SparsityCollector
from tl_sparsity import cli
from tl_sparsity.coding.safe_io import sha256
from tl_sparsity.report import SparsityReport
from tl_sparsity.tl.checkpoint import CheckpointError

OPTS = dict(batch_size=64, warmup_tokens=256, reservoir_size=48, expansion=2, max_steps=32)
TWO = "blocks.0.hook_resid_post,blocks.1.hook_resid_post"  # two hooks of the same width


def _tokens(seed, b=4, p=17):
    return torch.randint(1, 200, (b, p), generator=torch.Generator().manual_seed(seed))


def _header(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def edit_meta(data: bytes, fn) -> bytes:
    """``data`` (a safetensors file of the package) with ``fn`` applied to its JSON meta; the tensors untouched."""
    header, body = _header(data)
    meta = json.loads(header["__metadata__"]["tl_sparsity"])
    fn(meta)
    header["__metadata__"]["tl_sparsity"] = json.dumps(meta)
    return _with_header(header, body)


def as_old(meta: dict) -> None:
    """A file written before the meta checksum and the hook name."""
    meta.pop("meta_sha256", None)
    meta.pop("hook", None)


def _learner_file(tmp_path):
    c = OnlineSparseCoder(expansion=2, batch_size=64, reservoir_size=48).partial_fit(torch.randn(300, 8))
    return c, c.save(tmp_path / "c.safetensors")


def _setter(part, key, value):
    def fn(meta):
        meta[part][key] = value(meta[part][key]) if callable(value) else value
    return fn


EDITS = {"lam_x1000": _setter("state", "lam_", lambda v: v * 1000), "scale_0": _setter("state", "scale_", 0.0),
         "cap_-1": _setter("state", "cap", -1), "n_tokens_-5": _setter("state", "n_tokens_", -5),
         "reservoir_2e8": _setter("params", "reservoir_size", 2e8), "d_in_9": _setter("params", "d_in", 9)}


@pytest.mark.parametrize("edit", EDITS)
def test_any_edit_of_a_learner_header_is_caught_as_corruption(tmp_path, edit):
    _, path = _learner_file(tmp_path)
    path.write_bytes(edit_meta(path.read_bytes(), EDITS[edit]))
    with pytest.raises(CheckpointError, match=r"c\.safetensors.*corrupt"):
        OnlineSparseCoder.load(path)


def test_a_learner_file_without_the_meta_checksum_still_loads(tmp_path):
    c, path = _learner_file(tmp_path)
    path.write_bytes(edit_meta(path.read_bytes(), as_old))
    back = OnlineSparseCoder.load(path)
    assert torch.equal(back.dictionary_, c.dictionary_) and back.n_tokens_ == c.n_tokens_ and back.lam_ == c.lam_


BAD = [("state", "scale_", 0.0), ("state", "scale_", math.inf), ("state", "lam_", -0.5), ("state", "lam_", math.nan),
       ("state", "cap", -1), ("state", "n_tokens_", -5), ("state", "n_steps_", 1.5), ("state", "res_fill", 1000),
       ("state", "probe_fill", -1), ("params", "reservoir_size", 2e8), ("params", "d_in", 9),
       ("params", "batch_size", 1), ("state", "trace", [])]


@pytest.mark.parametrize("part,key,value", BAD, ids=[f"{k}={v}" for _, k, v in BAD])
def test_an_old_learner_file_with_a_field_out_of_range_is_rejected_naming_file_and_field(tmp_path, part, key, value):
    _, path = _learner_file(tmp_path)

    def fn(meta):
        as_old(meta)
        meta[part][key] = value

    path.write_bytes(edit_meta(path.read_bytes(), fn))
    with pytest.raises(CheckpointError, match=rf"c\.safetensors.*{key}"):
        OnlineSparseCoder.load(path)


@pytest.mark.parametrize("meta", [[], 5, {"format": "tl_sparsity.learner", "version": 1, "params": [], "state": {}}])
def test_a_learner_meta_of_the_wrong_shape_is_a_checkpoint_error(tmp_path, meta):
    _, path = _learner_file(tmp_path)
    header, body = _header(path.read_bytes())
    header["__metadata__"]["tl_sparsity"] = json.dumps(meta)
    path.write_bytes(_with_header(header, body))
    with pytest.raises(CheckpointError, match=r"c\.safetensors"):
        OnlineSparseCoder.load(path)


# ------------------------------------------------------------------------------------------------- collector
@pytest.fixture(scope="module")
def tiny():
    for kind in ("bridge", "hooked"):
        try:
            m = make_model(kind)
        except pytest.skip.Exception:
            continue
        m.eval()
        return m
    pytest.skip("no TransformerLens model kind available")


def _saved(model, root, hooks=TWO):
    col = SparsityCollector(model, hooks=hooks, **OPTS).fit([_tokens(s) for s in range(2)], progress=False)
    return col, col.save(root)


def _rehash(folder, manifest):
    mbytes = json.dumps(manifest, indent=1).encode()
    (folder / "manifest.json").write_bytes(mbytes)
    (folder.parent / "LATEST").write_text(json.dumps({"checkpoint": folder.name, "manifest_sha256": sha256(mbytes)}))


def test_swapped_learner_files_are_caught_by_their_hook_names(tiny, tmp_path):
    _, folder = _saved(tiny, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    a, b = manifest["hooks"]
    manifest["files"][a], manifest["files"][b] = manifest["files"][b], manifest["files"][a]
    _rehash(folder, manifest)
    with pytest.raises(CheckpointError, match=rf"hook_001\.safetensors.*{a}.*{b}|hook_001\.safetensors.*{b}"):
        SparsityCollector.load(tmp_path, tiny)


def test_a_checkpoint_whose_learner_files_carry_no_hook_name_still_loads(tiny, tmp_path):
    col, folder = _saved(tiny, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert json.loads(_header((folder / "hook_000.safetensors").read_bytes())[0]["__metadata__"]["tl_sparsity"]
                      )["hook"] == manifest["hooks"][0]
    for f in manifest["files"].values():
        data = edit_meta((folder / f["file"]).read_bytes(), as_old)
        (folder / f["file"]).write_bytes(data)
        f["sha256"], f["bytes"] = sha256(data), len(data)
    _rehash(folder, manifest)
    back = SparsityCollector.load(tmp_path, tiny)
    for name in col.learners:
        assert torch.equal(back.learners[name].dictionary_, col.learners[name].dictionary_)


@pytest.mark.parametrize("latest", ["[]", '{"checkpoint": 5}', '{"checkpoint": "../elsewhere"}', '"ckpt-000001"',
                                    '{"checkpoint": "ckpt-000001", "manifest_sha256": 7}'])
def test_latest_of_the_wrong_shape_is_a_checkpoint_error_naming_it(tiny, tmp_path, latest):
    _saved(tiny, tmp_path)
    (tmp_path / "LATEST").write_text(latest)
    with pytest.raises(CheckpointError, match="LATEST"):
        SparsityCollector.load(tmp_path, tiny)


MANIFEST_EDITS = {"files=[]": ("files", []), "hooks=5": ("hooks", 5), "extras=5": ("extras", 5),
                  "d_in=[]": ("d_in", []), "model=3": ("model", 3), "options=[]": ("options", []),
                  "files entry": ("files", {"blocks.0.hook_resid_post": 5, "blocks.1.hook_resid_post": 5}),
                  "file path": ("files", {"blocks.0.hook_resid_post": {"file": "../x", "sha256": "0", "bytes": 1}}),
                  "fit=[]": ("fit", []), "skip_bos=str": ("skip_bos", "yes"), "manifest=[]": (None, [])}


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_a_manifest_of_the_wrong_shape_is_a_checkpoint_error_naming_it(tiny, tmp_path, edit):
    _, folder = _saved(tiny, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    key, value = MANIFEST_EDITS[edit]
    if key is None:
        manifest = value
    else:
        manifest[key] = value
    _rehash(folder, manifest)
    with pytest.raises(CheckpointError, match="manifest.json"):
        SparsityCollector.load(tmp_path, tiny)


def test_stale_temporaries_of_the_package_are_swept_when_a_checkpoint_is_written(tiny, tmp_path):
    col, _ = _saved(tiny, tmp_path)
    stale = [".LATEST.tmp-ab12cd_9", ".c.safetensors.tmp-zz00zz00"]
    fresh, other = ".LATEST.tmp-fresh123", [".LATEST.tmp-", "LATEST.tmp-ab12cd34", "notes.txt", ".x.tmp-toolong123"]
    old = time.time() - 3600
    for name in stale + [fresh] + other:
        (tmp_path / name).write_bytes(b"x")
        if name != fresh:
            os.utime(tmp_path / name, (old, old))
    col.save(tmp_path)
    left = set(os.listdir(tmp_path))
    assert not left & set(stale)
    assert {fresh, *other} <= left
    SparsityCollector.load(tmp_path, tiny)


# ------------------------------------------------------------------------------------------------- reports
def _report(tmp_path, **edits):
    rep = SparsityReport([{"hook": "blocks.0.hook_resid_post", "layer": 0, "normalized_loss": 0.5}])
    data = {**rep.to_dict(), **edits}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edits", [dict(rows=5), dict(rows=[5]), dict(rows=[{"layer": 0}]), dict(meta=[]),
                                   dict(tables=[]), dict(tables={"t": 5}), dict(tables={"t": [3]}),
                                   dict(rows=[{"hook": "h", "normalized_loss": "x"}]),
                                   dict(rows=[{"hook": 3}])], ids=str)
def test_a_report_of_the_wrong_shape_is_a_value_error_naming_the_file(tmp_path, edits):
    path = _report(tmp_path, **edits)
    with pytest.raises(ValueError, match=r"bad\.json"):
        SparsityReport.load(path)


@pytest.mark.parametrize("text", ["[]", "5", "{not json", '"report"'])
def test_a_report_file_that_is_not_a_report_object_is_a_value_error_naming_it(tmp_path, text):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=r"bad\.json"):
        SparsityReport.load(tmp_path / "bad.json")


def _one_line_error(capsys, *names):
    err = capsys.readouterr().err
    assert err.startswith("tl-sparsity: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(n in err for n in names), err


def test_cli_show_and_compare_report_bad_files_in_one_line(tmp_path, capsys):
    bad = _report(tmp_path, rows=5)
    good = SparsityReport([{"hook": "h", "layer": 0, "normalized_loss": 0.5}]).save(tmp_path / "good.json")
    assert cli.main(["show", str(bad)]) == 2
    _one_line_error(capsys, "bad.json")
    (tmp_path / "list.json").write_text("[]")
    assert cli.main(["show", str(tmp_path / "list.json")]) == 2
    _one_line_error(capsys, "list.json")
    assert cli.main(["compare", str(good), str(bad)]) == 2
    _one_line_error(capsys, "bad.json")
    assert cli.main(["show", str(tmp_path)]) == 2  # a folder
    _one_line_error(capsys, str(tmp_path))


def test_cli_run_with_an_out_that_is_a_file_fails_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "out.txt"
    out.write_text("x")
    assert cli.main(["run", "--model", str(tmp_path / "missing"), "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, "out.txt")


def test_cli_keeps_real_bugs_as_tracebacks(tmp_path, monkeypatch):
    good = SparsityReport([{"hook": "h", "layer": 0, "normalized_loss": 0.5}]).save(tmp_path / "good.json")

    def broken(self, columns=None):
        raise TypeError("a bug")

    monkeypatch.setattr(SparsityReport, "to_markdown", broken)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["show", str(good)])


def test_load_state_dict_checks_ranges_like_a_file_and_changes_nothing_on_failure():
    import copy

    import torch

    from tl_sparsity import OnlineSparseCoder
    from tl_sparsity.coding.state_io import CheckpointError

    c = OnlineSparseCoder(seed=0, batch_size=64).partial_fit(torch.randn(300, 8))
    state = c.state_dict()
    target = OnlineSparseCoder(seed=0, batch_size=64).partial_fit(torch.randn(200, 8))
    before = target.dictionary_.clone()
    for field, value in (("scale_", 0.0), ("lam_", float("nan")), ("n_tokens_", -5), ("cap", -1)):
        bad = copy.deepcopy(state)
        bad["meta"]["state"][field] = value
        with pytest.raises(CheckpointError, match=field):
            target.load_state_dict(bad)
        assert torch.equal(target.dictionary_, before)
    with pytest.raises(CheckpointError, match="state_dict"):
        target.load_state_dict({"tensors": [], "meta": {}})
    assert torch.equal(target.load_state_dict(state).dictionary_, c.dictionary_)
