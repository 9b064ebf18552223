"""End to end: a GPT-2-small-shaped model (12 layers, d=768, random weights) with one learner per hook, vs the plain
forward of the same model, in one run on one device.

    PYTHONPATH=$PWD python benchmarks/bench_e2e.py                        # resid_post ×12, then mlp_post ×12
    PYTHONPATH=$PWD python benchmarks/bench_e2e.py --hooks resid_post --batch 64 --seq 128 --iters 10
    PYTHONPATH=$PWD python benchmarks/bench_e2e.py --device cpu --layers 2 --d-model 64 --batch 2 --seq 16 \\
        --iters 1 --warmup-tokens 64 --batch-size 64                      # a smoke test on CPU

``--model tl`` (the default when ``transformer_lens`` imports): a real TransformerLens model, collected with the real
``tl_sparsity.SparsityCollector``. A random ``GPT2LMHeadModel(GPT2Config(n_layer, n_embd))`` and a byte-level BPE
tokenizer trained in-process are saved into a temporary folder and loaded with ``tl_sparsity.tl.models.load_model``:
a ``TransformerBridge`` (TL 4.x; ``--backend auto``) or, on TL 3.x, ``--backend hooked`` for a ``HookedTransformer``
with the same weights. Collection is ``col.fit(batch)`` (``--collect fit``, the streaming loop a user runs) or
``model.run_with_hooks(ids, fwd_hooks=col.fwd_hooks())`` (``--collect run_with_hooks``); the plain forward is
``model(ids, return_type=None)``, the forward ``fit`` runs. Learner options (``--batch-size``, ``--warmup-tokens``,
``--expansion``) reach every ``OnlineSparseCoder`` through the collector's keyword arguments; neuron statistics are
off unless ``--neurons`` (the collector's default turns them on for ``mlp_post``).

``--model hf`` / ``--model torch``: Hugging Face ``GPT2LMHeadModel`` / a plain torch GPT-2 block stack with ordinary
``register_forward_hook``s doing what the collector's hook does (drop BOS, flatten, float32 copy, ``partial_fit``).

``resid_post`` = each block's output, ``mlp_post`` = each MLP's activation output (d=3072, m=24 576). λ adapts
during ``--warmup-tokens`` rows and is then frozen; timing starts after every learner's warm-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network; everything here is local

import torch
from torch import nn

from tl_sparsity import OnlineSparseCoder

VOCAB = 50257


# ---------------------------------------------------------------------------------------------------- plain torch
class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.act, self.out = nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, h):
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln_1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.out(self.act(self.fc(self.ln_2(h))))


class TorchGPT2(nn.Module):
    def __init__(self, layers=12, d=768, heads=12, vocab=VOCAB, ctx=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.h:
            h = blk(h)
        return self.head(self.ln_f(h))


def _heads(d):
    return max(1, d // 64)  # GPT-2 small: 12 heads of 64


def build_model(kind, dev, dtype, layers, d):
    """``hf`` / ``torch`` models: (model, blocks, MLP activation modules, forward(ids))."""
    if kind == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=_heads(d))).to(dev, dtype).eval()
        blocks = model.transformer.h
        return model, blocks, [b.mlp.act for b in blocks], lambda ids: model(ids, use_cache=False).logits
    model = TorchGPT2(layers=layers, d=d, heads=_heads(d)).to(dev, dtype).eval()
    return model, model.h, [b.act for b in model.h], model


# ---------------------------------------------------------------------------------------------------- TransformerLens
def tl_version():
    try:
        return metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        return None


def train_tokenizer(vocab_size=300):
    """A byte-level BPE tokenizer (BOS ``<s>``, EOS ``</s>``) trained here on the stdlib's docs: no download."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([topics[k] for k in sorted(topics)[:10]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def write_gpt2_folder(folder, layers=12, d=768, seed=0):
    """Save a random GPT-2 (``GPT2Config`` defaults but ``n_layer``, ``n_embd``, ``n_head``) and a tokenizer into
    ``folder``, a local Hugging Face folder for :func:`tl_sparsity.tl.models.load_model`. Returns ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=_heads(d), n_positions=1024, n_ctx=1024,  # TL 3.9 reads n_ctx
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def load_tl(folder, dev, dtype, backend="auto"):
    """(model, description) of a TransformerLens model loaded from ``folder`` the way a user would."""
    from tl_sparsity.tl.models import load_model, resolve_backend

    backend = resolve_backend(backend)
    model, _ = load_model(str(folder), backend=backend, device=dev, dtype=dtype)
    return model, f"{type(model).__name__} (backend={backend}, TransformerLens {tl_version()})"


def build_tl(dev, dtype, layers, d, backend="auto", seed=0):
    """A GPT-2-shaped TransformerLens model with random weights: (model, description)."""
    folder = tempfile.mkdtemp(prefix="bench_e2e_gpt2_")
    try:
        write_gpt2_folder(folder, layers, d, seed)
        return load_tl(folder, dev, dtype, backend)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def default_model_kind():
    for kind, module in (("tl", "transformer_lens"), ("hf", "transformers")):
        try:
            __import__(module)
            return kind
        except ImportError:
            continue
    return "torch"


# ---------------------------------------------------------------------------------------------------- timing
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, iters):
    sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / iters


def _n_capped(coder):
    base = coder.capped_  # read first: a learner that counts on the device folds its count in here
    extra = getattr(coder, "_capped_dev", None)
    return base + (int(extra) if extra is not None else 0)


def warm_up(step, learners, warmup_tokens, batch_size, max_forwards=100_000):
    """Run ``step`` until every learner has trained past λ's warm-up (λ frozen); returns (seconds, forwards)."""
    t0, n = time.perf_counter(), 0
    while min(lr.n_tokens_ for lr in learners) < warmup_tokens + batch_size:
        if n >= max_forwards:
            raise RuntimeError(f"learners still warming up after {n} forwards: check --warmup-tokens.")
        step()
        n += 1
    return time.perf_counter() - t0, n


# ---------------------------------------------------------------------------------------------------- runs
def run_tl(args, dev, dtype, ids):
    """Plain forward vs ``SparsityCollector`` collection on a TransformerLens model; rows of the table."""
    from tl_sparsity import SparsityCollector

    torch.manual_seed(0)
    model, desc = build_tl(dev, dtype, args.layers, args.d_model, args.backend)
    print(f"model: {desc}; GPT-2 shape ({args.layers} layers, d={args.d_model}), random weights, {args.dtype}; "
          f"collection: {args.collect}; neuron statistics: {'collector default' if args.neurons else 'off'}")
    fkw = {"return_type": None}  # what fit() runs: blocks + final LayerNorm, no unembed on HookedTransformer
    rows, plain = [], lambda: model(ids, **fkw)
    with torch.no_grad():
        plain()
        t_plain = timed(plain, dev, args.iters)
        for hook in args.hooks.split(","):
            opts = {"batch_size": args.batch_size, "warmup_tokens": args.warmup_tokens, "expansion": args.expansion}
            col = SparsityCollector(model, hook, neurons=None if args.neurons else False, **opts)
            learners = list(col.learners.values())
            if args.collect == "fit":
                def step(col=col):
                    col.fit(ids, progress=False)
            else:
                def step(col=col):
                    model.run_with_hooks(ids, fwd_hooks=col.fwd_hooks(), **fkw)
            warm_s, _ = warm_up(step, learners, args.warmup_tokens, args.batch_size)
            iters = args.iters if hook != "mlp_post" else max(2, args.iters // 3)
            t = timed(step, dev, iters)
            rep = col.report() if args.report else None
            nl = "" if rep is None else f"{rep[col.hook_names[0]]['normalized_loss']:.3f}"
            d = learners[0].d_in
            rows.append((f"{hook} ×{len(learners)}", "OnlineSparseCoder", d, t, warm_s,
                         sum(_n_capped(lr) for lr in learners), learners[0].lam_, nl))
            print(f"  {hook}: {t * 1e3:.1f} ms per forward (warm-up {warm_s:.1f} s; "
                  f"hook 0 normalized_loss {nl or 'not evaluated'})", flush=True)
            del col, learners, rep
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        t_plain = min(t_plain, timed(plain, dev, args.iters))  # again, after: the lower of two
    return rows, t_plain, args.layers


def attach(modules, coders):
    def make(coder):
        def hook(_mod, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            rows = t[:, 1:].reshape(-1, t.shape[-1]).float().clone()  # as the collector: drop BOS, fp32 copy
            coder.partial_fit(rows)

        return hook

    return [m.register_forward_hook(make(c)) for m, c in zip(modules, coders)]


def run_plain_hooks(args, dev, dtype, ids):
    """``hf`` / ``torch`` models with plain forward hooks; rows of the table."""
    torch.manual_seed(0)
    _, blocks, acts, forward = build_model(args.model, dev, dtype, args.layers, args.d_model)
    print(f"model: {args.model} GPT-2 shape ({args.layers} layers, d={args.d_model}), random weights, {args.dtype}; "
          "plain torch forward hooks (no TransformerLens)")
    rows = []
    with torch.inference_mode():
        forward(ids)
        t_plain = timed(lambda: forward(ids), dev, args.iters)
        for hook in args.hooks.split(","):
            mods = blocks if hook == "resid_post" else acts
            d = args.d_model if hook == "resid_post" else 4 * args.d_model
            iters = args.iters if hook == "resid_post" else max(2, args.iters // 3)
            coders = [OnlineSparseCoder(d_in=d, expansion=args.expansion, seed=i, device=dev,
                                        batch_size=args.batch_size, warmup_tokens=args.warmup_tokens)
                      for i in range(len(mods))]
            handles = attach(mods, coders)
            try:
                warm_s, _ = warm_up(lambda: forward(ids), coders, args.warmup_tokens, args.batch_size)
                t = timed(lambda: forward(ids), dev, iters)
            finally:
                for h in handles:
                    h.remove()
            rows.append((f"{hook} ×{len(mods)}", "OnlineSparseCoder", d, t, warm_s,
                         sum(_n_capped(c) for c in coders), coders[0].lam_, ""))
            del coders
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            print(f"  {hook}: {t * 1e3:.1f} ms per forward (warm-up {warm_s:.1f} s)", flush=True)
        t_plain = min(t_plain, timed(lambda: forward(ids), dev, args.iters))
    return rows, t_plain, len(blocks)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options this benchmark shares with ``bench_distributed.py``: device, model shape and learner settings."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=["auto", "bridge", "hooked"], default="auto",
                   help="TransformerLens model: TransformerBridge (auto on TL >= 3) or HookedTransformer (TL < 4)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=4096, help="learner batch_size")
    p.add_argument("--expansion", type=float, default=8, help="learner expansion (atoms = expansion × d)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--model", choices=["auto", "tl", "hf", "torch"], default="auto",
                   help="auto: tl when transformer_lens imports, else hf when transformers does, else torch")
    p.add_argument("--collect", choices=["fit", "run_with_hooks"], default="fit", help="--model tl: how hooks run")
    p.add_argument("--neurons", action="store_true", help="--model tl: the collector's default neuron statistics")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="--model tl: evaluate the report after timing (hook 0's normalized_loss)")
    p.add_argument("--hooks", default="resid_post,mlp_post")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10, help="timed forwards (resid_post); mlp_post uses a third")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for h in args.hooks.split(","):
        if h not in ("resid_post", "mlp_post"):
            raise SystemExit(f"--hooks takes resid_post and/or mlp_post, got {h!r}")
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model == "auto":
        args.model = default_model_kind()
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), device=dev)
    ntok = args.batch * args.seq
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; transformer_lens {tl_version() or 'not installed'}")
    print(f"batch {args.batch}×{args.seq} = {ntok} tokens per forward ({ntok - args.batch} rows per hook, BOS dropped); "
          f"learner batch_size {args.batch_size}, warmup_tokens {args.warmup_tokens}, expansion {args.expansion:g}")
    run = run_tl if args.model == "tl" else run_plain_hooks
    rows, t_plain, nh = run(args, dev, dtype, ids)
    print("\n| hooks | learner | d | ms / forward | M tokens/s | × plain forward time | learner M rows/s per hook "
          "| capped rows | λ (hook 0) | normalized_loss (hook 0) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| plain forward | - | | {t_plain * 1e3:.2f} | {ntok / t_plain / 1e6:.3g} | 1.00 | | | | |")
    for hooks, lname, d, t, _warm, capped, lam, nl in rows:
        extra = t - t_plain  # below timing noise when not positive
        per_hook = f"{(ntok - args.batch) * nh / extra / 1e6:.3g}" if extra > 0.01 * t_plain else "n/a (noise)"
        print(f"| {hooks} | {lname} | {d} | {t * 1e3:.2f} | {ntok / t / 1e6:.3g} | {t / t_plain:.2f} | "
              f"{per_hook} | {capped} | {lam:.3g} | {nl} |")
    print("(learner rows/s per hook = rows per hook per forward × hooks / (collected − plain forward time))")


if __name__ == "__main__":
    main()
