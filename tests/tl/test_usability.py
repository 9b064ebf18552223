"""Issue 18 (items 3, 4, 6): text into ``fit``, ``layers=``, the CLI's budget accounting and flags, and errors that
arrive early and say what happened. Tiny offline models only."""

from __future__ import annotations

import time

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from conftest import make_model  # noqa: E402

from tl_sparsity import SparsityCollector, SparsityReport, cli  # noqa: E402
from tl_sparsity.tl import models  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog."  # 44 characters


@pytest.fixture(scope="module")
def text_model(gpt2_folder):
    model, tok = models.load_model(str(gpt2_folder))
    return model


def _count_forwards(monkeypatch, model) -> list[tuple]:
    shapes: list[tuple] = []
    run = model.run_with_hooks

    def counting(tokens, *a, **kw):
        shapes.append(tuple(tokens.shape))
        return run(tokens, *a, **kw)

    monkeypatch.setattr(model, "run_with_hooks", counting)
    return shapes


def _n_text_tokens(model, texts: list[str]) -> int:
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return sum(len(i) for i in ids) + len(ids) - 1  # one separator (EOS) between texts


def test_fit_takes_a_string_a_list_of_strings_or_a_text_file(text_model, monkeypatch, tmp_path):
    shapes = _count_forwards(monkeypatch, text_model)
    col = SparsityCollector(text_model, hooks="resid_post", batch_size=16).fit(TEXT, progress=False)
    assert len(shapes) == 1 and shapes[0][0] == 1  # one forward of one window, not 44 one-character forwards
    assert col.n_tokens == _n_text_tokens(text_model, [TEXT])
    texts = [TEXT, "Another sentence, somewhat longer than the first one. " * 6]
    col = SparsityCollector(text_model, hooks="resid_post", batch_size=16).fit(texts, progress=False)
    assert col.n_tokens == _n_text_tokens(text_model, texts)
    path = tmp_path / "t.txt"
    path.write_text(texts[1])
    col = SparsityCollector(text_model, hooks="resid_post", batch_size=16).fit(str(path), progress=False)
    assert col.n_tokens == _n_text_tokens(text_model, [texts[1]])
    col = SparsityCollector(text_model, hooks="resid_post", batch_size=16).fit(path, progress=False)
    assert col.n_tokens == _n_text_tokens(text_model, [texts[1]])


def test_fit_on_text_without_a_tokenizer_says_so():
    model = make_model("hooked" if models._has_hooked() else "bridge")
    model.tokenizer = None
    col = SparsityCollector(model, hooks="resid_post")
    with pytest.raises(ValueError, match="tokenizer"):
        col.fit("some text", progress=False)
    with pytest.raises(TypeError, match="token"):
        col.fit([1.5, 2.5], progress=False)


def test_layers_pick_layers_like_the_cli(model):
    col = SparsityCollector(model, hooks="resid_post,mlp_post", layers=[1])
    assert sorted(col.hook_names) == ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    assert SparsityCollector(model, hooks="resid_post", layers="0:2").hook_names == [
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert "hook_embed" in SparsityCollector(model, hooks="hook_embed,resid_post", layers=[0]).hook_names
    with pytest.raises(ValueError, match=r"layers \[5\] out of range"):
        SparsityCollector(model, hooks="resid_post", layers=[5])


def test_hook_suggestions_include_the_site_of_the_same_layer(model):
    with pytest.raises(KeyError, match=r"blocks\.0\.mlp\.hook_post"):
        SparsityCollector(model, hooks="blocks.0.hook_mlp_post")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_raises_at_construction(model):
    with pytest.raises(ValueError, match="CUDA"):
        SparsityCollector(model, hooks="resid_post", device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_without_cuda_exits_2_before_loading(tmp_path, capsys):
    assert cli.main(["run", "--model", str(tmp_path / "missing"), "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_bos_only_batches_say_that_only_bos_was_there(model):
    col = SparsityCollector(model, hooks="resid_post").fit(torch.zeros(4, 1, dtype=torch.long), progress=False)
    with pytest.raises(RuntimeError, match="only one position"):
        col.report()


def test_load_model_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="offline"):
        models.load_model("tl-sparsity-tests/not-a-cached-model")
    assert time.perf_counter() - t0 < 3


def test_progress_bar_ends_at_its_total(model, capsys):
    tokens = torch.randint(0, 200, (4, 16))
    SparsityCollector(model, hooks="resid_post", batch_size=64).fit([tokens] * 5, n_tokens=100)
    assert capsys.readouterr().err.rstrip().splitlines()[-1].split("|")[-1].strip().startswith("100/100")
    SparsityCollector(model, hooks="resid_post", batch_size=64).fit([tokens] * 2, n_tokens=1000)
    assert capsys.readouterr().err.rstrip().splitlines()[-1].split("|")[-1].strip().startswith("120/120")


def _run(gpt2_folder, out, *extra):
    return cli.main(["run", "--model", str(gpt2_folder), "--hooks", "resid_post,mlp_post", "--tokens", "2000",
                     "--ctx-len", "32", "--out", str(out), "--no-progress", *extra])


def test_cli_trains_on_every_row_and_reports_one_count(gpt2_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(gpt2_folder, out) == 0  # learner batches of 1024: the old code trained on one of them only
    rep = SparsityReport.load(out / "report.json")
    collected = 31 * -(-2000 // 31)  # whole windows of 31 tokens after BOS
    for r in rep.rows:
        assert r["n_rows"] == collected
        assert r["n_tokens"] + r["n_heldout"] + r["n_massive"] + r["n_dropped"] == collected
    printed = capsys.readouterr().out
    assert f"{collected} tokens per hook" in printed and "| n_rows |" in printed.replace(" n_rows ", " n_rows ")


def test_cli_refuses_to_overwrite_without_force_and_has_version(gpt2_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert _run(gpt2_folder, out, "--tokens", "300") == 2
    assert "--force" in capsys.readouterr().err and (out / "report.json").read_text() == "{}"
    assert _run(gpt2_folder, out, "--tokens", "300", "--learner-batch-size", "64", "--force") == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and "tl-sparsity" in capsys.readouterr().out


def test_learning_inside_a_forward_shows_a_bar_and_fit_shows_only_its_own(model, capsys, monkeypatch):
    from tl_sparsity.tl import learn_progress

    monkeypatch.setattr(learn_progress, "DELAY", 0)  # tiny learners finish before the default delay
    tokens = torch.randint(0, 200, (4, 17))  # 64 rows per hook and forward
    col = SparsityCollector(model, hooks="resid_post", batch_size=32).start()
    try:
        model(tokens)
    finally:
        col.stop()
    err = capsys.readouterr().err
    assert "tl_sparsity: learning (2 hooks)" in err and "0/4 [" in err  # 2 hooks x 2 learner batches
    assert all(lr.n_pending_ == 0 and lr.n_tokens_ + lr.n_heldout_ + lr.n_massive_ == 64
               for lr in col.learners.values())
    col.progress = False
    with col.attach():
        model(tokens)
    assert "learning" not in capsys.readouterr().err
    col.progress = True
    with col.attach():  # attach(), like start(), learns once the forward has returned: one bar for all hooks
        model(tokens)
    assert "tl_sparsity: learning (2 hooks)" in capsys.readouterr().err
    hooks = col.fwd_hooks()  # fwd_hooks() learns inside each hook: one bar per hook that completes a batch
    model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert capsys.readouterr().err.count("tl_sparsity: learning (1 hook)") >= 2
    SparsityCollector(model, hooks="resid_post", batch_size=32).fit(tokens, n_tokens=64)
    assert "learning" not in capsys.readouterr().err
