"""Neuron-level profile of a real model: dead neurons, token detectors and positional neurons per layer (Voita et
al.), and parameter activation per layer (Wang et al.), offline on the built-in SmolLM2-135M and the pydoc text.

    python examples/neuron_profile.py                        # SmolLM2-135M, 20 k tokens, every layer
    python examples/neuron_profile.py --model minilm --site post

Neuron statistics need no dictionary learning, so this streams :class:`tl_sparsity.NeuronStats` directly at every
layer's MLP hook (the collector does the same next to its learners, see ``SparsityCollector(neurons=...)``). For
SmolLM2's SwiGLU MLP the default ``--site pre`` reads ``mlp.hook_pre``, the gate's pre-activation: "active" means
gate > 0, i.e. SiLU(gate) > 0, the region where a ReLU would fire. The BOS position of every window is excluded.
"""

from __future__ import annotations

import argparse
import time

import torch

from tl_sparsity import NeuronStats, parameter_activation, text
from tl_sparsity.tl import models


def main(argv: list[str] | None = None) -> tuple:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default="pydoc")
    p.add_argument("--site", default="pre", choices=("pre", "post"), help="mlp.hook_pre or mlp.hook_post")
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--param-samples", type=int, default=8, help="windows for parameter activation (0: skip)")
    p.add_argument("--threshold", type=float, default=2e-5, help="parameter-activation threshold")
    args = p.parse_args(argv)

    model, tok = models.load_model(args.model)
    batches = list(text.token_windows(tok, text.load_texts(args.text), ctx_len=args.ctx_len, batch_size=8,
                                      max_tokens=args.tokens, seed=0))
    n_layers = int(model.cfg.n_layers)
    names = [f"blocks.{layer}.mlp.hook_{args.site}" for layer in range(n_layers)]
    stats: dict[str, NeuronStats] = {}
    current: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(act: torch.Tensor, hook=None) -> None:
            if name not in stats:
                stats[name] = NeuronStats(act.shape[-1], vocab_size=len(tok))
            stats[name].update(act.detach(), current["tokens"], current["mask"])

        return hook

    t0 = time.perf_counter()
    with torch.no_grad():
        for tokens in batches:
            mask = torch.ones_like(tokens, dtype=torch.bool)
            mask[:, 0] = False  # BOS / CLS
            current.update(tokens=tokens, mask=mask)
            model.run_with_hooks(tokens, fwd_hooks=[(n, make_hook(n)) for n in names], return_type=None)
    seconds = time.perf_counter() - t0
    n_tok = sum(int(b.shape[0] * (b.shape[1] - 1)) for b in batches)
    print(f"# {model.cfg.model_name}: {n_tok} tokens of {args.text} ({seconds:.0f} s), mlp.hook_{args.site}, "
          f"active = value > 0")
    print("| layer | neurons | dead | dead frac | median firing rate | token detectors | trigram detectors | "
          "positional |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for layer, name in enumerate(names):
        s = stats[name].summary()
        rows.append(dict(layer=layer, **s))
        print(f"| {layer} | {stats[name].n_neurons} | {s['n_dead']} | {s['dead_frac']:.4f} | "
              f"{s['firing_rate_median']:.3f} | {s['n_token_detectors']} | {s['n_trigram_detectors']} | "
              f"{s['n_positional']} |")
    pa = None
    if args.param_samples > 0:
        windows = torch.cat(batches)[: args.param_samples]
        pa = parameter_activation(model, windows, threshold=args.threshold)
        print(f"\n# parameter activation over {windows.shape[0]} windows, threshold {args.threshold:g}")
        print("| layer | parameters | share above threshold | mean A |")
        print("|---|---|---|---|")
        for r in pa.to_dict("records"):
            print(f"| {r['layer']} | {r['n_params']} | {r['share']:.4f} | {r['mean_activation']:.3g} |")
    return rows, pa


if __name__ == "__main__":
    main()
