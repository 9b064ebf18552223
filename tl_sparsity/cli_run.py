"""``tl-sparsity run``'s work (the command's front end and flags are in :mod:`tl_sparsity.cli`): load the model, cut
the text into windows, fit a collector with a progress bar, train every learner on its last, short batch too
(``SparsityCollector.flush``: every row collected is trained on or held out), print the table and write the outputs.
It returns what ``cli.py`` prints.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

__all__ = ["hook_spec", "run", "write_outputs"]


def hook_spec(hooks: str, n_layers: int, max_layers: int | None = None, layers: str | None = None) -> list[str]:
    """Expand ``--hooks`` for ``--layers`` / ``--max-layers``: per-layer aliases become names at those layers;
    other aliases, names and globs pass through (and are checked by the collector)."""
    from .tl.hook_select import parse_layers
    from .tl.hooks import ALIASES

    parts = [h.strip() for h in hooks.split(",") if h.strip()]
    if not parts:
        raise ValueError("--hooks is empty; give e.g. --hooks resid_post,mlp_post.")
    chosen = parse_layers(layers, n_layers, max_layers, name="--layers")
    out: list[str] = []
    for h in parts:
        template = ALIASES.get(h)
        if template is not None and "{L}" in template:
            out += [template.format(L=layer) for layer in chosen]
        else:
            out.append(h)
    return out


def run(args: argparse.Namespace, options: dict[str, Any]) -> list[str]:
    """``tl-sparsity run`` (see :mod:`tl_sparsity.cli`), with the learners' keyword arguments ``options``; returns
    what the command prints (the table, then a summary line)."""
    import torch

    from . import text
    from .coding.devices import check_device
    from .coding.options import LearnerOptions
    from .tl import hooks as tl_hooks, models
    from .tl.collector import SparsityCollector

    for name in ("tokens", "ctx_len", "batch_size", "expansion", "learner_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}.")
    if args.ctx_len < 2:
        raise ValueError("--ctx-len must be >= 2 (one BOS plus at least one text token).")
    LearnerOptions(**options)  # check them before loading the model
    check_device(args.device)  # --device cuda without CUDA: said here, not by torch mid-load
    out = Path(args.out or f"runs/{Path(args.model).name}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for report.json and the other outputs.")
    if (out / "report.json").exists() and not args.force:
        raise ValueError(f"--out {out} already holds a report (report.json): pass --force to overwrite it, or give "
                         "another --out folder.")
    t0 = time.perf_counter()
    model, tokenizer = models.load_model(args.model, backend=args.backend, device=args.device,
                                         dtype=getattr(torch, args.dtype))
    t_load = time.perf_counter() - t0
    local = args.text == "pydoc" or Path(args.text).exists()  # small enough to shuffle windows across documents
    texts = text.load_texts(args.text) if local else text.iter_texts(args.text)
    batches = list(text.token_windows(tokenizer, texts, ctx_len=args.ctx_len, batch_size=args.batch_size,
                                      max_tokens=args.tokens, seed=args.seed if local else None))
    batches = [b.to(args.device) for b in batches]  # token ids where the model is (a bridge does not move them)
    available = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    if available < args.tokens and args.until == "tokens":
        logging.getLogger("tl_sparsity").warning(
            "%s gives %d tokens in windows of %d (one BOS each), fewer than --tokens %d: using them all.",
            args.text, available, args.ctx_len, args.tokens)
    hooks = hook_spec(args.hooks, int(tl_hooks.model_info(model)["n_layers"]), args.max_layers, args.layers)
    neurons = {"auto": None, "all": True, "none": False}.get(args.neurons, args.neurons)
    if isinstance(neurons, str):
        neurons = [h.strip() for h in neurons.split(",") if h.strip()]
    col = SparsityCollector(model, hooks=hooks, controls=args.controls, neurons=neurons, **options)
    t1 = time.perf_counter()
    ckpt = getattr(args, "checkpoint_dir", None)  # --checkpoint-every / --resume (cli_resume.py)
    col.fit(_timed(batches, args.max_minutes), n_tokens=args.tokens, progress=not args.no_progress,
            until=None if args.until == "tokens" else "converged", checkpoint_dir=ckpt,
            checkpoint_every=args.checkpoint_every if ckpt else None)
    col.flush()  # the rows short of a last learner batch: trained on (or held out) too, none left pending
    t_fit = time.perf_counter() - t1
    report = col.report()
    if args.param_activation:
        from .tl.parameters import parameter_activation

        windows = torch.cat(batches)[: args.param_activation]
        pa = parameter_activation(model, windows.to(args.device))
        report.tables["parameter_activation"] = [{k: _plain(v) for k, v in r.items()} for r in pa.to_dict("records")]
        report.meta["parameter_activation"] = {k: _plain(v) for k, v in pa.attrs.items() if k != "unused"}
    report.meta["run"] = {"command": "tl-sparsity " + " ".join(args.argv),
                          "text": args.text, "ctx_len": args.ctx_len, "batch_size": args.batch_size,
                          "tokens_requested": args.tokens, "until": args.until, "max_minutes": args.max_minutes,
                          "load_seconds": round(t_load, 1), "fit_seconds": round(t_fit, 1), "device": args.device}
    write_outputs(report, out)
    n_conv = sum(bool(r.get("converged")) for r in report.rows)
    counts = sorted({int(r["n_rows"]) for r in report.rows})
    per_hook = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]} (converged hooks stop early)"
    return [report.to_markdown(), f"\n{len(report)} hooks, {n_conv} converged; {per_hook} tokens per hook (n_rows: "
            f"trained on, n_tokens, plus held out, n_heldout, and set aside) in {t_fit:.0f} s of fitting "
            f"(model load {t_load:.0f} s, {available} tokens of text available). Wrote {out}/report.json, "
            "report.csv, report.html, profile.png"]


def _timed(batches: list[Any], max_minutes: float | None) -> Any:
    """``batches``, stopping once ``max_minutes`` of wall-clock time have passed since the first was taken."""
    end = None if max_minutes is None else time.perf_counter() + 60 * max_minutes
    for batch in batches:
        if end is not None and time.perf_counter() > end:
            logging.getLogger("tl_sparsity").warning("--max-minutes %g reached: stopping the fit.", max_minutes)
            return
        yield batch


def write_outputs(report: Any, out: Path) -> None:
    """``report.json``, ``report.csv``, ``report.html`` and ``profile.png`` (normalized loss by layer) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # the command line draws to files only
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    report.save(out / "report.json")
    if "parameter_activation" in report.tables:
        import pandas as pd

        from .tl.parameters import plot_parameter_activation

        df = pd.DataFrame(report.tables["parameter_activation"])
        df.attrs.update(report.meta.get("parameter_activation", {}))
        ax = plot_parameter_activation(df)
        ax.figure.savefig(out / "param_activation.png", dpi=120)
        plt.close(ax.figure)
    report.to_csv(out / "report.csv")
    (out / "report.html").write_text(report.to_html())
    ax = report.plot()
    ax.figure.savefig(out / "profile.png", dpi=120)
    plt.close(ax.figure)


def _plain(v: Any) -> Any:
    """numpy / torch scalars → Python numbers (JSON-able)."""
    return v.item() if hasattr(v, "item") else v
