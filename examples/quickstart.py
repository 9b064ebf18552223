"""Quickstart: per-hook feature sparsity of a small TransformerLens model, on CPU, in well under a minute.

    python examples/quickstart.py

The model is built from a config with random weights (no download), so the numbers demonstrate the API, not a
finding about real models: for real weights see the README's main job.
"""

from __future__ import annotations

import warnings

import torch

from tl_sparsity import SparsityCollector

CFG = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, n_ctx=128, d_vocab=1000, act_fn="gelu_new",
           normalization_type="LN")


def tiny_model():
    """A 2-layer model from whichever TransformerLens generation is installed."""
    import transformer_lens

    torch.manual_seed(0)
    try:  # TL 2.x / 3.x
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return transformer_lens.HookedTransformer(transformer_lens.HookedTransformerConfig(**CFG))
    except (ImportError, AttributeError):  # TL 4.x: bridge only
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_native(TransformerBridgeConfig(**CFG))


def main(n_batches: int = 10) -> None:
    warnings.filterwarnings("ignore", message=".*have not converged")  # the tables below carry the flag
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1000, (16, 64), generator=gen) for _ in range(n_batches)]

    # the three lines
    col = SparsityCollector(model, hooks=["resid_post", "mlp_post"], batch_size=512)
    for tokens in batches:
        model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks())  # add other tools' hooks to this list freely
    report = col.report()  # warns: 10 forwards are far from enough, and the table marks every row ⚠
    print(report.to_markdown())

    # the residual stream, fed until every learner's held-out number has converged (converged hooks are frozen)
    stream = (torch.randint(0, 1000, (16, 64), generator=gen) for _ in range(400))
    col = SparsityCollector(model, hooks="resid_post", batch_size=512)
    col.fit(stream, until="converged", max_tokens=300_000, progress=False)
    print()
    print(col.report().to_markdown())


if __name__ == "__main__":
    main()
