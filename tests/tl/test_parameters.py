import warnings

import pytest
import torch

from tl_sparsity.tl.parameters import (
    _classify,
    parameter_activation,
    parameter_groups,
    parameter_scores,
    plot_parameter_activation,
)


def _tokens(b=3, p=10, vocab=200, seed=0):
    return torch.randint(1, vocab, (b, p), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["hooked", "bridge"])
def plain_model(request):
    """The tiny models without weight processing (bridge compatibility mode only changes weights, not names)."""
    from conftest import make_model

    return make_model(request.param).eval()


@pytest.mark.parametrize("include_biases", [False, True])
def test_groups_count_exactly_the_attention_and_mlp_parameters_of_each_layer(model, include_biases):
    c = model.cfg
    expect = 4 * c.d_model * c.n_heads * c.d_head + 2 * c.d_model * c.d_mlp
    if include_biases:
        expect += 3 * c.n_heads * c.d_head + c.d_model + c.d_mlp + c.d_model  # b_Q, b_K, b_V, b_O, b_in, b_out
    params = dict(model.named_parameters())
    groups = parameter_groups(model, include_biases=include_biases)
    for layer in range(c.n_layers):
        assert sum(params[n].numel() for n, (lay, _) in groups.items() if lay == layer) == expect
    assert {k for _, k in groups.values()} == {"Q", "K", "V", "O", "MLP_in", "MLP_out"}
    if include_biases:
        df = parameter_activation(model, _tokens(b=1), include_biases=True)
        assert df["layer"].tolist() == list(range(c.n_layers)) and (df["n_params"] == expect).all()


def test_scores_equal_central_finite_differences(plain_model):
    m = plain_model.to(torch.float64)
    tokens = _tokens(b=1)
    scores = parameter_scores(m, tokens)
    params = dict(m.named_parameters())
    g = torch.Generator().manual_seed(0)

    def d_of():
        with torch.no_grad():
            return float(m(tokens)[0, -1].max())

    for name, a in scores.items():
        w = params[name].data.view(-1)
        for i in torch.randint(0, w.numel(), (3,), generator=g).tolist():
            w0, eps = float(w[i]), 1e-6
            w[i] = w0 + eps
            up = d_of()
            w[i] = w0 - eps
            down = d_of()
            w[i] = w0
            assert float(a.reshape(-1)[i]) == pytest.approx(abs(w0 * (up - down) / (2 * eps)), rel=1e-5, abs=1e-10)


def _autograd_scores(model, tokens, names):
    """The reference: |w · ∂D/∂w| per sample by autograd (D = the largest last-position logit), averaged."""
    params, n_samples = dict(model.named_parameters()), tokens.shape[0]
    out = {n: torch.zeros_like(params[n]) for n in names}
    for s in range(n_samples):
        model.zero_grad(set_to_none=True)
        model(tokens[s: s + 1])[0, -1].max().backward()
        for n in out:
            out[n] += (params[n] * params[n].grad).abs().detach() / n_samples
    model.zero_grad(set_to_none=True)
    return out


def test_scores_average_per_sample_autograd_products(plain_model):
    model = plain_model
    tokens = _tokens(b=3)
    scores = parameter_scores(model, tokens, include_biases=True)
    expect = _autograd_scores(model, tokens, scores)
    for n in scores:
        torch.testing.assert_close(scores[n], expect[n], rtol=1e-5, atol=1e-9)


def test_rows_count_parameters_above_the_threshold(plain_model):
    model = plain_model
    tokens = _tokens(b=2)
    scores, groups = parameter_scores(model, tokens), parameter_groups(model)
    thr = float(torch.cat([a.reshape(-1) for a in scores.values()]).median())
    df = parameter_activation(model, tokens, threshold=thr)
    by_kind = parameter_activation(model, tokens, threshold=thr, by_kind=True)
    for layer in range(model.cfg.n_layers):
        a = torch.cat([scores[n].reshape(-1) for n, (lay, _) in groups.items() if lay == layer])
        row = df[df["layer"] == layer].iloc[0]
        assert row["n_active"] == int((a > thr).sum()) and row["share"] == pytest.approx(float((a > thr).double().mean()))
        assert row["mean_activation"] == pytest.approx(float(a.double().mean()), rel=1e-9)
        part = by_kind[by_kind["layer"] == layer]
        assert part["n_active"].sum() == row["n_active"] and part["n_params"].sum() == row["n_params"]
    assert df.attrs["threshold"] == thr and df.attrs["n_samples"] == 2 and df.attrs["unused"] == []


def test_model_is_left_as_found_even_under_inference_mode(plain_model):
    model = plain_model
    model.train()
    names = list(parameter_groups(model))
    params = dict(model.named_parameters())
    params[names[0]].grad = torch.full_like(params[names[0]], 7.0)
    params[names[1]].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in params.items()}
    tokens = _tokens(b=2)
    with torch.inference_mode():
        inside = parameter_activation(model, tokens)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(params[names[0]].grad, torch.full_like(params[names[0]], 7.0))
    assert all(p.grad is None for n, p in params.items() if n != names[0])
    with torch.no_grad():
        assert inside.equals(parameter_activation(model, tokens))
    assert inside.equals(parameter_activation(model, tokens))


def test_lengths_drop_right_padding():
    from conftest import make_model

    model = make_model("bridge")
    tokens = _tokens(b=2, p=10)
    padded = torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], 1)
    a = parameter_activation(model, tokens)
    b = parameter_activation(model, padded, lengths=torch.tensor([10, 10]))
    assert a.equals(b)


def test_bad_inputs_raise_errors_that_name_the_fix():
    with pytest.raises(ValueError, match="no attention/MLP parameters recognised"):
        parameter_groups(torch.nn.Linear(2, 2))
    from conftest import make_model

    model = make_model("bridge")
    with pytest.raises(ValueError, match=r"tokens must be integer ids \[batch, pos\]"):
        parameter_activation(model, torch.zeros(4))
    with pytest.raises(ValueError, match="lengths must be"):
        parameter_activation(model, _tokens(b=2), lengths=torch.tensor([0, 3]))


@pytest.mark.parametrize("name, expect", [
    ("blocks.3.attn.W_Q", (3, "Q", False)), ("blocks.3.attn._W_K", (3, "K", False)),
    ("blocks.0.attn._b_V", (0, "V", True)), ("blocks.1.mlp.W_gate", (1, "MLP_gate", False)),
    ("blocks.1.mlp.experts.2.W_out", (1, "MLP_out", False)), ("blocks.0.ln1.w", None), ("embed.W_E", None),
    ("unembed.W_U", None), ("transformer.h.2._original_component.attn.qkv._original_component.weight", (2, "QKV", False)),
    ("transformer.h.2.attn.c_proj.bias", (2, "O", True)), ("transformer.h.2.mlp.c_proj.weight", (2, "MLP_out", False)),
    ("transformer.h.2.ln_1.weight", None), ("model.layers.5.self_attn.k_proj.weight", (5, "K", False)),
    ("model.layers.5.mlp.gate_proj.weight", (5, "MLP_gate", False)), ("model.layers.5.input_layernorm.weight", None),
    ("model.layers.5.self_attn.q_norm.weight", None), ("model.decoder.layers.1.fc1.weight", (1, "MLP_in", False)),
    ("model.decoder.layers.1.self_attn.out_proj.weight", (1, "O", False)),
    ("gpt_neox.layers.4.attention.query_key_value.weight", (4, "QKV", False)),
    ("gpt_neox.layers.4.attention.dense.weight", (4, "O", False)),
    ("gpt_neox.layers.4.mlp.dense_4h_to_h.weight", (4, "MLP_out", False)),
    ("encoder.layer.0.attention.self.query.weight", (0, "Q", False)),
    ("encoder.layer.0.attention.output.dense.weight", (0, "O", False)),
    ("encoder.layer.0.attention.output.LayerNorm.weight", None),
    ("encoder.layer.0.intermediate.dense.weight", (0, "MLP_in", False)),
    ("encoder.layer.0.output.dense.weight", (0, "MLP_out", False)), ("model.embed_tokens.weight", None),
    ("lm_head.weight", None), ("model.norm.weight", None)])
def test_parameter_names_of_every_model_family_map_to_layer_and_kind(name, expect):
    assert _classify(name) == expect


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["hello world, the tokenizer of a test"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _hf(arch: str, vocab: int):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64,
                                                resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64, vocab_size=vocab,
                                              max_position_embeddings=64)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bridges_of_hugging_face_models_pool_the_expected_parameters(arch, saved_tokenizer):
    pytest.importorskip("transformer_lens.model_bridge", reason="this TransformerLens has no TransformerBridge (2.x)")
    from transformer_lens.model_bridge import TransformerBridge

    hf = _hf(arch, len(saved_tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(arch, hf_model=hf, tokenizer=saved_tokenizer)
    d, heads, d_head = 32, 4, 8
    # GPT-2: q, k, v, o d×d and MLP 2·d·4d; Llama (2 KV heads): q, o d×d, k, v d×(2·d_head), gate/up/down d×64
    expect = 4 * d * d + 2 * d * 4 * d if arch == "gpt2" else 2 * d * d + 2 * d * 2 * d_head + 3 * d * 64
    df = parameter_activation(bridge, _tokens(b=2, vocab=len(saved_tokenizer)), by_kind=True)
    assert df.groupby("layer")["n_params"].sum().tolist() == [expect, expect]
    kinds = {"gpt2": ["Q", "K", "V", "O", "MLP_in", "MLP_out"], "llama": ["Q", "K", "V", "O", "MLP_in", "MLP_gate",
                                                                            "MLP_out"]}[arch]
    assert df[df["layer"] == 0]["kind"].tolist() == kinds
    if arch == "gpt2":  # the fused qkv copy is kept beside q, k, v but not run: not counted
        assert len(df.attrs["unused"]) == 2 and all(".qkv." in n for n in df.attrs["unused"])
    assert heads * d_head == d


def test_hooked_transformer_and_bridge_agree_on_the_same_gpt2_weights(saved_tokenizer):
    import transformer_lens as tl

    try:
        HookedTransformer, Config = tl.HookedTransformer, tl.HookedTransformerConfig
    except (ImportError, AttributeError):
        pytest.skip("this TransformerLens has no HookedTransformer (4.x)")
    pytest.importorskip("transformer_lens.model_bridge", reason="this TransformerLens has no TransformerBridge (2.x)")
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = _hf("gpt2", len(saved_tokenizer))
    cfg = Config(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, n_ctx=64, d_vocab=len(saved_tokenizer),
                 act_fn="gelu_new", normalization_type="LN")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ht = HookedTransformer(cfg)
        ht.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
        bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=saved_tokenizer)
    tokens = _tokens(b=2, vocab=len(saved_tokenizer))
    torch.testing.assert_close(ht(tokens), bridge(tokens), rtol=1e-5, atol=1e-5)
    per = []
    for m in (ht, bridge):
        scores, groups = parameter_scores(m, tokens), parameter_groups(m)
        per.append({(lay, k): torch.cat([scores[n].reshape(-1) for n, g in groups.items() if g == (lay, k) and n in scores])
                    .sort().values for lay, k in set(groups.values()) if k != "QKV"})
    assert per[0].keys() == per[1].keys()
    for key in per[0]:
        torch.testing.assert_close(per[0][key], per[1][key], rtol=1e-4, atol=1e-9)


def test_plot_draws_share_by_layer_with_labelled_axes():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from conftest import make_model

    df = parameter_activation(make_model("bridge"), _tokens(b=1), by_kind=True)
    ax = plot_parameter_activation(df)
    assert ax.get_xlabel() == "layer" and "2e-05" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == set(df["kind"])
    assert list(lines["MLP_in"].get_ydata()) == df[df["kind"] == "MLP_in"]["share"].tolist()
    whole = plot_parameter_activation(parameter_activation(make_model("bridge"), _tokens(b=1)))
    assert len(whole.get_lines()) == 1
    with pytest.raises(ValueError, match="lacks columns"):
        plot_parameter_activation(df.drop(columns="share"))


def test_native_gated_bridge_pools_its_mlp_and_matches_autograd():
    pytest.importorskip("transformer_lens.model_bridge", reason="this TransformerLens has no TransformerBridge (2.x)")
    from conftest import TINY
    from transformer_lens.model_bridge import TransformerBridge

    try:
        from transformer_lens.config import TransformerBridgeConfig
    except ImportError:
        from transformer_lens.model_bridge import TransformerBridgeConfig
    torch.manual_seed(0)
    try:
        model = TransformerBridge.boot_native(TransformerBridgeConfig(**{**TINY, "gated_mlp": True, "act_fn": "silu",
                                                                          "normalization_type": "RMS"}))
    except (TypeError, ValueError) as e:
        pytest.skip(f"this TransformerLens builds no native gated bridge: {e}")
    tokens = _tokens(b=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out
        df = parameter_activation(model, tokens, by_kind=True)
    d, m = TINY["d_model"], TINY["d_mlp"]
    assert df.groupby("layer")["n_params"].sum().tolist() == [4 * d * d + 3 * d * m] * 2  # was 4·d·d: MLP skipped
    assert df[df["layer"] == 0]["kind"].tolist() == ["Q", "K", "V", "O", "MLP_in", "MLP_gate", "MLP_out"]
    assert df.attrs["unused"] == []
    scores = parameter_scores(model, tokens)
    want = _autograd_scores(model, tokens, scores)
    for n in scores:
        torch.testing.assert_close(scores[n], want[n], rtol=1e-5, atol=1e-9)


def test_unrecognised_weight_matrices_of_a_layer_are_warned_about_and_listed():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(200, 8)
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({
                "attn": torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), "router": torch.nn.Linear(8, 8),
                "norm": torch.nn.LayerNorm(8)})])
            self.head = torch.nn.Linear(8, 200)

        def forward(self, tokens):
            x = self.embed(tokens)
            for layer in self.layers:
                x = layer["norm"](x + layer["attn"]["q_proj"](x) + layer["router"](x))
            return self.head(x)

    model = Tiny()
    with pytest.warns(UserWarning, match=r"left out of parameter activation: \['layers.0.router.weight'\]"):
        assert set(parameter_groups(model)) == {"layers.0.attn.q_proj.weight"}
    with pytest.warns(UserWarning, match="router") as rec:
        df = parameter_activation(model, _tokens(b=1))
    assert len(rec) == 1 and df.attrs["unused"] == ["layers.0.router.weight"] and df["n_params"].tolist() == [64]
