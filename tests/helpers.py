"""Helpers several test modules share (imported as ``helpers``: the tests folder is on ``sys.path`` through its
``conftest.py``): a tokenizer trained in-process, bit-for-bit comparisons of learners and collectors with the small
options and batches the checkpoint tests use, a tiny model's planted MLP neurons, and the smallest collector model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from tl_sparsity import OnlineSparseCoder, SparsityCollector

ROOT = Path(__file__).resolve().parents[1]  # the repository


def load_script(relpath: str, name: str) -> ModuleType:
    """A script of the repository (e.g. ``benchmarks/convergence.py``) imported as module ``name``, without running
    its ``__main__`` block."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse coding writes each activation as a few dictionary atoms.",
    "Hooks stream activations; the collector keeps none of them.",
] * 4


def train_tokenizer(style: str = "gpt", vocab_size: int = 300):
    """A byte-level BPE tokenizer trained here. ``gpt``: BOS ``<s>``, EOS ``</s>``; ``bert``: ``[CLS]``/``[SEP]``;
    ``bare``: no special tokens at all."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"gpt": ["<s>", "</s>"], "bert": ["[CLS]", "[SEP]", "[PAD]"], "bare": []}[style]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([topics[k] for k in sorted(topics)[:10]] + CORPUS, trainer)
    kw = {"gpt": dict(bos_token="<s>", eos_token="</s>"),
          "bert": dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]"), "bare": {}}[style]
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


# one learner batch per forward (4 sequences × 16 positions after BOS), short pursuits: fast on 2 CPU cores
OPTS = dict(batch_size=64, warmup_tokens=256, reservoir_size=48, expansion=2, max_steps=32)
HOOKS = "blocks.0.hook_resid_post,blocks.1.mlp.hook_post"
TRANSIENT = {"_last_capped"}  # written by every pursuit call before it is read; not state


def assert_same_learner(a: OnlineSparseCoder, b: OnlineSparseCoder) -> None:
    """Every attribute equal, bit for bit — read from the objects, not through the checkpoint code."""
    va = {k: v for k, v in vars(a).items() if k not in TRANSIENT}
    vb = {k: v for k, v in vars(b).items() if k not in TRANSIENT}
    assert va.keys() == vb.keys()
    for k in va:
        x, y = va[k], vb[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y), k
        elif isinstance(x, torch.Generator):
            assert torch.equal(x.get_state(), y.get_state()), k
        elif k == "_pending":  # the same rows, however they are chunked
            assert torch.equal(torch.cat(x) if x else torch.zeros(0), torch.cat(y) if y else torch.zeros(0))
        else:
            assert type(x) is type(y) and x == y, (k, x, y)


def assert_same_extras(a: SparsityCollector, b: SparsityCollector) -> None:
    """Covariances and neuron statistics equal bit for bit (heavy-hitter slots in the same order, too)."""
    assert list(a.extras) == list(b.extras)
    for name in a.extras:
        x, y = a.extras[name], b.extras[name]
        assert (x.cov is None) == (y.cov is None) and (x.neurons is None) == (y.neurons is None), name
        if x.cov is not None:
            assert x.cov.n == y.cov.n and torch.equal(x.cov.mean, y.cov.mean), name
            assert torch.equal(x.cov.scatter, y.cov.scatter), name
        if x.neurons is not None:
            sa, sb = x.neurons.state_dict(), y.neurons.state_dict()
            assert sa.keys() == sb.keys()
            for k in sa:
                assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k], (name, k)


def assert_same_collector(a: SparsityCollector, b: SparsityCollector) -> None:
    """Learners and side statistics equal bit for bit."""
    assert list(a.learners) == list(b.learners)
    for name in a.learners:
        assert_same_learner(a.learners[name], b.learners[name])
    assert_same_extras(a, b)


def _tokens(seed, b=4, p=17):
    return torch.randint(1, 200, (b, p), generator=torch.Generator().manual_seed(seed))


BATCHES = [_tokens(s) for s in range(6)]


X, P_STAR = 5, (3, 7)


def _set_planted_weights(model):
    """Layer-0 MLP: neuron 0 never fires, neuron 1 fires on token X only, neuron 2 at positions P_STAR only; attention
    output zeroed, so the MLP reads LN(W_E[token] + W_pos[pos]); every residual has mean 0, so LN only rescales."""
    d, v, n_ctx, d_mlp = model.cfg.d_model, model.cfg.d_vocab, model.cfg.n_ctx, model.cfg.d_mlp
    g = torch.Generator().manual_seed(0)
    emb = torch.zeros(v, d)
    emb[:, 4:] = torch.randn(v, d - 4, generator=g)
    emb[:, 4:] -= emb[:, 4:].mean(1, keepdim=True)
    emb[X] = 0
    emb[X, 0], emb[X, 3] = 10.0, -10.0
    pos = torch.zeros(n_ctx, d)
    pos[list(P_STAR), 1], pos[list(P_STAR), 2] = 10.0, -10.0
    w_in, b_in = torch.zeros(d, d_mlp), torch.zeros(d_mlp)
    b_in[0] = -1.0
    w_in[0, 1], b_in[1] = 1.0, -1.0
    w_in[1, 2], b_in[2] = 1.0, -1.0
    w_in[4:, 3:] = torch.randn(d - 4, d_mlp - 3, generator=g)
    plan = {"embed.W_E": emb, "tok_embed.weight": emb, "pos_embed.W_pos": pos, "pos.weight": pos,
            "blocks.0.mlp.W_in": w_in, "layers.0.mlp.fc_in.weight": w_in.T, "blocks.0.mlp.b_in": b_in,
            "layers.0.mlp.fc_in.bias": b_in}
    done = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            short = name.replace("._original_component", "")
            if short in plan:
                p.copy_(plan[short].view_as(p))
                done.add(short)
            elif short.startswith(("blocks.0.attn.W_O", "blocks.0.attn.b_O", "layers.0.attn.o.")):
                p.zero_()
                done.add("attn_out")
            elif short.startswith(("blocks.0.ln2.", "layers.0.ln2.")):
                p.fill_(1.0 if short.endswith((".w", ".weight")) else 0.0)
                done.add("ln2")
    assert len(done) == 6, f"weights not found on this model: {sorted(done)}"


class StubModel:
    """The smallest object the collector accepts: one hook point, no forward (no TransformerLens needed)."""

    cfg = type("Cfg", (), {"n_layers": 1})()
    hook_dict = {"blocks.0.hook_resid_post": object()}

    def run_with_hooks(self, *args, **kwargs):
        raise AssertionError("not used")
