"""What the report's standard error covers: rows treated as independent vs. tokens blocked by sequence.

Trains a collector on SmolLM2-135M (the built-in offline model) until its hooks converge, then codes fresh text
windows (never seen by the learners) and computes the normalized loss L = Σ loss_j / Σ λ·max_j with two standard
errors of that ratio: the report's (delta method, every token independent) and a sequence-blocked one (the same
delta method over per-sequence sums, so correlation between the tokens of one window is covered). Prints both and
their ratio per hook.

    PYTHONPATH=$PWD python benchmarks/se_blocking.py --device cuda --text kjv.txt --layers 0,10,20,29
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from tl_sparsity import SparsityCollector
from tl_sparsity.coding.metrics import per_sample_terms
from tl_sparsity.tl.models import load_model
from tl_sparsity.text import load_texts, token_windows


def ratio_se(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Σa/Σb and its delta-method standard error, the units (rows or sequences) being independent."""
    a, b = a.double(), b.double()
    n = a.numel()
    r = float(a.sum() / b.sum())
    var = float(((a - r * b) ** 2).sum()) * n / (n - 1) / float(b.sum()) ** 2
    return r, math.sqrt(var)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text", default="pydoc")
    p.add_argument("--layers", default="0,10,20,29")
    p.add_argument("--train-tokens", type=int, default=1_000_000)
    p.add_argument("--eval-windows", type=int, default=400)
    args = p.parse_args(argv)
    print("command:", "python benchmarks/se_blocking.py " + " ".join(sys.argv[1:] if argv is None else argv))
    dev = torch.device(args.device)
    print("device:", torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "| torch", torch.__version__,
          "|", time.strftime("%Y-%m-%d"))
    model, tok = load_model("smollm2-135m", device=dev)
    hooks = [f"blocks.{int(v)}.hook_resid_post" for v in args.layers.split(",")]
    windows = list(token_windows(tok, load_texts(args.text), ctx_len=128, batch_size=8, seed=0))
    n_eval = -(-args.eval_windows // 8)
    train, fresh = windows[:-n_eval], windows[-n_eval:]  # the last windows are never fed to the learners
    col = SparsityCollector(model, hooks=hooks, device=dev)
    col.fit([w.to(dev) for w in train], until="converged", max_tokens=args.train_tokens, progress=False)
    print(f"trained on at most {col.n_tokens} tokens; evaluating {sum(w.shape[0] for w in fresh)} fresh windows")
    print("| hook | converged | normalized loss | SE (tokens independent) | SE (blocked by sequence) | ratio |")
    print("|---|---|---|---|---|---|")
    for name in hooks:
        lr = col.learners[name]
        a_rows, b_rows, a_seq, b_seq = [], [], [], []
        for w in fresh:
            _, cache = model.run_with_cache(w.to(dev), names_filter=[name])
            act = cache[name][:, 1:]  # drop BOS, as the collector does
            for seq in act:
                xn = lr.normalize(seq.float())
                t = per_sample_terms(xn, lr.dictionary_, lr.transform(seq.float()), lr.lam_)
                a = t["sq_err"] + lr.lam_ * t["l1"]
                b = lr.lam_ * t["max"]
                a_rows.append(a), b_rows.append(b)
                a_seq.append(a.sum()), b_seq.append(b.sum())
        r, se_tok = ratio_se(torch.cat(a_rows), torch.cat(b_rows))
        _, se_seq = ratio_se(torch.stack(a_seq), torch.stack(b_seq))
        print(f"| {name} | {lr.converged_} | {r:.3f} | {se_tok:.4f} | {se_seq:.4f} | {se_seq / se_tok:.2f} |")


if __name__ == "__main__":
    main()
