"""Massive-activation rows in a model's residual stream: how long the longest rows are, and where they sit.

    python benchmarks/massive_rows.py --text kjv.txt --windows 64

For each layer's ``resid_post`` (BOS dropped, as the collector does) it prints the five longest rows' norms over the
median row norm, their positions, the 99th and 99.9th percentile of that ratio, and what the learner's default rule
(``massive_ratio`` = 3 × the 99th-percentile norm, :mod:`tl_sparsity.coding.massive`) would set aside. CPU is enough.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform

import torch

from tl_sparsity.coding.massive import massive_threshold
from tl_sparsity.text import load_texts, token_windows
from tl_sparsity.tl.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default="pydoc", help="pydoc, a .txt file or a folder (tl_sparsity.text.load_texts)")
    p.add_argument("--windows", type=int, default=64, help="128-token windows, in stream order")
    p.add_argument("--ratio", type=float, default=3.0, help="massive_ratio to apply")
    args = p.parse_args()
    model = load_model(args.model)
    model = model[0] if isinstance(model, tuple) else model
    wins = token_windows(model.tokenizer, load_texts(args.text), ctx_len=128, batch_size=16)
    x = torch.cat(list(itertools.islice(wins, -(-args.windows // 16))))[: args.windows]
    n_layers = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=lambda n: n in names)
    print(f"# {args.model}, {x.shape[0]} windows of 128 tokens of {args.text}; {platform.machine()} CPU; "
          f"{datetime.date.today()}")
    print(f"{'hook':28s} {'longest 5 / median':32s} {'positions':22s} {'q99':>6s} {'q999':>6s} {'set aside':>9s}")
    for name in names:
        rows = cache[name][:, 1:].float()
        width = rows.shape[-1]
        norms = rows.norm(dim=-1).reshape(-1)
        ratio = norms / norms.median()
        top = ratio.topk(5).indices
        q = torch.quantile(ratio, torch.tensor([0.99, 0.999]))
        limit = massive_threshold(rows.reshape(-1, width), args.ratio)
        aside = int((norms > limit).sum())
        print(f"{name:28s} {str([round(v, 1) for v in ratio[top].tolist()]):32s} "
              f"{str([(i % 127) + 1 for i in top.tolist()]):22s} {q[0]:6.2f} {q[1]:6.2f} {aside:9d}")


if __name__ == "__main__":
    main()
