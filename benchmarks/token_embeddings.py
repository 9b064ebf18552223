"""Token embeddings (the paper's Table: "L_norm far below a Gaussian of the same d"): a model's token-embedding
matrix W_E, one row per vocabulary entry, against Gaussians with the same number of rows and the same d.

    python benchmarks/token_embeddings.py --model minilm                  # all-MiniLM-L6-v2 (d = 384, 30 522 rows)
    python benchmarks/token_embeddings.py --model smollm2-135m --device cuda
    python benchmarks/token_embeddings.py --quick                         # random rows, a smoke run

A vocabulary is a finite set of rows, so the held-out split is made once, here, not by the learner: a seeded 10 %
of the rows is the test set and is never fed; the learner (``OnlineSparseCoder(d, expansion=8,
holdout_frac=0, massive_ratio=None)``: the paper's 8d dictionary, every row kept) is fed the other 90 % in
reshuffled passes ("epochs") and the test set is coded after each pass. Verdict: converged when the test value
moved by at most ``--tol`` over each of the last two passes, with λ frozen and at least 400 dictionary steps.
The learner centres and scales the rows (mean 0, mean norm 1) as the paper does.

Controls, same shape and protocol: ``gauss`` (isotropic) and ``gauss-cov`` (the embedding's own mean and
covariance), both drawn once as finite sets of as many rows as the vocabulary.
"""

from __future__ import annotations

import argparse
import time

import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding.synthetic import CovarianceMatchedGaussian


def embedding_rows(model_name: str, quick: bool) -> tuple[str, torch.Tensor]:
    if quick:
        g = torch.Generator().manual_seed(0)
        return "random rows (quick)", torch.randn(1200, 16, generator=g) @ torch.randn(16, 16, generator=g)
    from tl_sparsity.tl.embeddings import token_embeddings
    from tl_sparsity.tl.models import load_model

    model, _ = load_model(model_name)
    return str(model.cfg.model_name), token_embeddings(model)


def sources(w: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    n, d = w.shape
    g = torch.Generator().manual_seed(seed + 1)
    w64 = w.double()
    cov_src = CovarianceMatchedGaussian(w64.mean(0), torch.cov(w64.T), seed=seed + 2)
    return {"embeddings": w, "gauss": torch.randn(n, d, generator=g), "gauss-cov": cov_src.sample(n)}


def measure(x: torch.Tensor, epochs: int, tol: float, device: str, seed: int, batch_size: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = len(x) // 10
    test, train = x[perm[:n_test]], x[perm[n_test:]]
    coder = OnlineSparseCoder(x.shape[1], expansion=8, holdout_frac=0.0, massive_ratio=None, batch_size=batch_size,
                              seed=seed, device=device)
    rows: list[dict] = []
    for epoch in range(1, epochs + 1):
        for chunk in train[torch.randperm(len(train), generator=g)].split(batch_size):
            coder.partial_fit(chunk.to(device))
        m = coder.evaluate(test.to(device))
        vals = [r["normalized_loss"] for r in rows[-2:]] + [m["normalized_loss"]]
        moves = [abs(b / a - 1) for a, b in zip(vals, vals[1:])]
        conv = (len(moves) == 2 and max(moves) <= tol and coder.n_steps_ >= 400 and not coder.lam_adapting)
        rows.append(dict(epoch=epoch, n_steps=coder.n_steps_, lam=coder.lam_, converged=conv, **m))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="smollm2-135m, minilm, or a local Hugging Face folder")
    p.add_argument("--epochs", type=int, default=12, help="passes over the 90 %% training rows")
    p.add_argument("--tol", type=float, default=0.02)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1024, help="learner batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1 200 random rows at d = 16, 2 passes")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.batch_size = 2, 128
    t0 = time.perf_counter()
    label, w = embedding_rows(a.model, a.quick)
    print(f"# {label}: {w.shape[0]} rows, d = {w.shape[1]}; device {a.device}; test = 10 % of rows, never fed")
    out = []
    for name, x in sources(w, a.seed).items():
        t1 = time.perf_counter()
        rows = measure(x, a.epochs, a.tol, a.device, a.seed, a.batch_size)
        print(f"\n## {name}  ({time.perf_counter() - t1:.1f} s)")
        print(" epoch  steps       λ   L_test ±    se     fvu  n_active  converged")
        for r in rows:
            print(f"{r['epoch']:6d} {r['n_steps']:6d} {r['lam']:.4f} {r['normalized_loss']:8.3f} ± {r['normalized_loss_se']:.3f}"
                  f" {r['fvu']:7.4f} {r['n_active']:9.2f}  {'yes' if r['converged'] else 'no'}")
        out.append(dict(source=name, **rows[-1]))
    print("\n## summary (last pass)")
    print("source        L_test ±    se  converged")
    for r in out:
        print(f"{r['source']:12s} {r['normalized_loss']:7.3f} ± {r['normalized_loss_se']:.3f}  {'yes' if r['converged'] else 'no'}")
    ratio = out[1]["normalized_loss"] / out[0]["normalized_loss"]
    print(f"gauss / embeddings = {ratio:.2f}; wall {time.perf_counter() - t0:.1f} s")
    return out


if __name__ == "__main__":
    main()
