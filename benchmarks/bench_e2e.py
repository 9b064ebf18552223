"""End to end: a GPT-2-small-shaped model (12 layers, d=768, random weights) with one learner per hook, vs the plain
forward, in one run on one device.

    PYTHONPATH=$PWD python benchmarks/bench_e2e.py                        # resid_post ×12, then mlp_post ×12
    PYTHONPATH=$PWD python benchmarks/bench_e2e.py --hooks resid_post --batch 64 --seq 128 --iters 10

The model is Hugging Face ``GPT2LMHeadModel`` built from ``GPT2Config()`` when ``transformers`` imports (no weights are
downloaded), else a plain torch GPT-2 block stack. Hooks are ordinary ``register_forward_hook``s doing what
``SparsityCollector``'s hook does (drop the BOS position, flatten, copy to float32, ``partial_fit``); TransformerLens
is not needed. ``resid_post`` = each block's output, ``mlp_post`` = each MLP's activation output (d=3072, m=24 576).

Learners: ``shipped`` = ``OnlineSparseCoder`` as in the repository (its greedy pursuit dispatches to the Triton kernel
on CUDA); ``proposed`` = ``ProposedCoder`` from ``bench_pursuit.py`` (the learner diff in the report). λ adapts during
``--warmup-tokens`` rows and is then frozen; timing starts after warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_pursuit import ProposedCoder
from torch import nn

from tl_sparsity import OnlineSparseCoder


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
    def __init__(self, layers=12, d=768, heads=12, vocab=50257, ctx=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.h:
            h = blk(h)
        return self.head(self.ln_f(h))


def build_model(kind, dev, dtype, layers, d):
    if kind == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d)).to(dev, dtype).eval()
        blocks = model.transformer.h
        return model, blocks, [b.mlp.act for b in blocks], lambda ids: model(ids, use_cache=False).logits
    model = TorchGPT2(layers=layers, d=d).to(dev, dtype).eval()
    return model, model.h, [b.act for b in model.h], model


def attach(modules, coders):
    def make(coder):
        def hook(_mod, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            rows = t[:, 1:].reshape(-1, t.shape[-1]).float().clone()  # as the collector: drop BOS, fp32 copy
            coder.partial_fit(rows)

        return hook

    return [m.register_forward_hook(make(c)) for m, c in zip(modules, coders)]


def _n_capped(coder):
    base = coder.capped_  # read first: a learner that counts on the device folds its count in here
    extra = getattr(coder, "_capped_dev", None)
    return base + (int(extra) if extra is not None else 0)


def timed(fn, dev, iters):
    torch.cuda.synchronize(dev) if dev.type == "cuda" else None
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize(dev) if dev.type == "cuda" else None
    return (time.perf_counter() - t) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=["auto", "hf", "torch"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--hooks", default="resid_post,mlp_post")
    p.add_argument("--learners", default="shipped,proposed")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=10, help="timed forwards (resid_post); mlp_post uses a third")
    p.add_argument("--warmup-tokens", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=4096, help="learner batch_size")
    args = p.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    kind = args.model
    if kind == "auto":
        try:
            import transformers  # noqa: F401

            kind = "hf"
        except ImportError:
            kind = "torch"
    try:
        import transformer_lens  # noqa: F401

        tl_note = "transformer_lens importable (not used: plain forward hooks)"
    except ImportError:
        tl_note = "transformer_lens not installed here: plain forward hooks on the model's modules"
    torch.manual_seed(0)
    _, blocks, acts, forward = build_model(kind, dev, dtype, args.layers, args.d_model)
    ids = torch.randint(0, 50257, (args.batch, args.seq), device=dev)
    ntok = args.batch * args.seq
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device: {name}; model: {kind} GPT-2 shape ({args.layers} layers, d={args.d_model}), random weights, "
          f"{args.dtype}; {tl_note}")
    print(f"batch {args.batch}×{args.seq} = {ntok} tokens per forward ({ntok - args.batch} rows per hook, BOS dropped)")
    rows = []
    with torch.inference_mode():
        forward(ids)
        t_plain = timed(lambda: forward(ids), dev, args.iters)
        for hook in args.hooks.split(","):
            mods = blocks if hook == "resid_post" else acts
            d = args.d_model if hook == "resid_post" else 4 * args.d_model
            iters = args.iters if hook == "resid_post" else max(2, args.iters // 3)
            for lname in args.learners.split(","):
                cls = OnlineSparseCoder if lname == "shipped" else ProposedCoder
                coders = [cls(d_in=d, expansion=8, seed=i, device=dev, batch_size=args.batch_size,
                              warmup_tokens=args.warmup_tokens) for i in range(len(mods))]
                handles = attach(mods, coders)
                try:
                    t0 = time.perf_counter()
                    while coders[0].n_tokens_ < args.warmup_tokens + args.batch_size:
                        forward(ids)
                    warm_s = time.perf_counter() - t0
                    t = timed(lambda: forward(ids), dev, iters)
                finally:
                    for h in handles:
                        h.remove()
                capped = sum(_n_capped(c) for c in coders)
                rows.append((f"{hook} ×{len(mods)}", lname, d, t, warm_s, capped, coders[0].lam_))
                del coders
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"  {hook} {lname}: {t * 1e3:.1f} ms per forward (warm-up {warm_s:.1f} s)", flush=True)
        t_plain = min(t_plain, timed(lambda: forward(ids), dev, args.iters))  # again, after: the lower of two
    rows.insert(0, ("plain forward", "-", 0, t_plain))
    print("\n| hooks | learner | d | ms / forward | M tokens/s | × plain forward time | learner M rows/s per hook |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        hooks, lname, d, t = r[:4]
        nh = len(blocks)
        per_hook = "" if d == 0 else f"{(ntok - args.batch) * nh / max(t - t_plain, 1e-12) / 1e6:.3g}"
        print(f"| {hooks} | {lname} | {d or ''} | {t * 1e3:.2f} | {ntok / t / 1e6:.3g} | {t / t_plain:.2f} | "
              f"{per_hook} |")
    print("(learner rows/s per hook = rows per hook per forward × hooks / (collected − plain forward time))")


if __name__ == "__main__":
    main()
