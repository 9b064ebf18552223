"""``tl-sparsity run --checkpoint-every N`` and ``--resume DIR``: where a run keeps its checkpoints, and how a killed
run is continued with the arguments it was started with.

A run with ``--checkpoint-every N`` writes ``<out>/checkpoint/run.json`` (its arguments) before it starts, and a
collector checkpoint (:mod:`tl_sparsity.tl.checkpoint`) there every N forwards and when the fit ends.
``--resume <out>`` reads ``run.json``, takes every argument from it (an option given again must have the saved value,
or the run stops with an error naming each difference), and fits the same batches again from the start of the
stream: the collector skips those its newest checkpoint had consumed (``SparsityCollector.fit``'s resume), so the
report equals an uninterrupted run's (the learners continue bit for bit). Only ``--no-progress``, ``--max-minutes``
(wall-clock) and ``--checkpoint-every`` may change.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT", "RUN_FILE", "prepare"]

CHECKPOINT, RUN_FILE = "checkpoint", "run.json"
#: Arguments a resumed run may change (they change no number), and those that are not the run's to save.
_FREE = {"no_progress", "max_minutes", "checkpoint_every"}
_NOT_SAVED = {"command", "argv", "resume", "force", "out", "checkpoint_dir"}


def out_folder(args: argparse.Namespace) -> Path:
    """``run``'s output folder: ``--out``, or ``runs/<model's folder name>``."""
    return Path(args.out or f"runs/{Path(args.model).name}")


def prepare(args: argparse.Namespace, given: set[str]) -> None:
    """Set ``args.checkpoint_dir`` (None without checkpoints) and, for ``--resume``, every argument from the saved
    run; ``given`` names the arguments given on the command line. Raises :class:`ValueError` naming the problem."""
    args.checkpoint_dir = None
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1 forward, got {args.checkpoint_every}.")
    if args.resume is not None:
        _resume(args, given)
    elif args.checkpoint_every is not None:
        _fresh(args)


def _fresh(args: argparse.Namespace) -> None:
    """A new checkpointed run: refuse a folder that holds another run's checkpoints (unless ``--force``), then
    record this run's arguments."""
    from .tl.checkpoint_layout import exists

    out = out_folder(args)
    folder = out / CHECKPOINT
    if folder.exists() and exists(folder):
        if not args.force:
            raise ValueError(f"{folder} holds the checkpoints of an earlier run: continue it with tl-sparsity run "
                             f"--resume {out}, or pass --force to discard them and start again.")
        shutil.rmtree(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for report.json, the other outputs and the "
                         "checkpoints.")
    folder.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SAVED}
    (folder / RUN_FILE).write_text(json.dumps({"format": "tl_sparsity.cli_run", "args": saved}, indent=1))
    args.out, args.checkpoint_dir = str(out), str(folder)


def _resume(args: argparse.Namespace, given: set[str]) -> None:
    """Take the saved run's arguments into ``args``; check those given again agree with them."""
    root = Path(args.resume)
    if not root.exists():
        raise ValueError(f"--resume {root}: no such folder; give the --out folder of the run to continue (the one "
                         "holding checkpoint/).")
    if not root.is_dir():
        raise ValueError(f"--resume {root} is a file; give the --out folder of the run to continue.")
    if root.name == CHECKPOINT and (root / RUN_FILE).is_file():  # the checkpoint folder itself
        root = root.parent
    saved = _saved(root)
    out = root
    if "out" in given and Path(args.out).resolve() != out.resolve():
        raise ValueError(f"--resume {root} writes into the run's own folder; drop --out {args.out}.")
    diff = [f"--{k.replace('_', '-')} {getattr(args, k)!r} here, {v!r} in the saved run" for k, v in saved.items()
            if k in given and k not in _FREE and getattr(args, k) != v]
    unknown = sorted(given - set(saved) - _FREE - _NOT_SAVED)
    if diff or unknown:
        raise ValueError(f"--resume {root}: the options differ from the run's ({'; '.join(diff + unknown)}); a "
                         "resumed run takes them all from the saved run: drop them, or start a new run in another "
                         "--out folder.")
    if (out / "report.json").exists() and not args.force:
        raise ValueError(f"--resume {root}: the run has finished (its report.json is there); pass --force to "
                         "fit it again from its last checkpoint and overwrite the report.")
    for k, v in saved.items():
        if k not in given:
            setattr(args, k, v)
    if args.checkpoint_every is None:  # a resumed run goes on writing checkpoints
        args.checkpoint_every = saved.get("checkpoint_every") or 1
    args.out, args.checkpoint_dir, args.force = str(out), str(out / CHECKPOINT), True
    logging.getLogger("tl_sparsity").info("--resume %s: the saved run's options, from its last checkpoint (the batches "
                                          "it had taken are skipped)", root)


def _saved(root: Path) -> dict[str, Any]:
    """The arguments in ``root/checkpoint/run.json``; :class:`ValueError` when it is missing or not one."""
    path = root / CHECKPOINT / RUN_FILE
    if not path.is_file():
        raise ValueError(f"--resume {root}: not a checkpointed run ({path} is missing); only a run started with "
                         "--checkpoint-every N can be resumed, with the --out folder it wrote to.")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume {root}: {path} is not readable JSON ({e}).") from e
    if not isinstance(data, dict) or data.get("format") != "tl_sparsity.cli_run" or not isinstance(
            data.get("args"), dict):
        raise ValueError(f"--resume {root}: {path} is not a tl-sparsity run's record (format marker missing).")
    return data["args"]
