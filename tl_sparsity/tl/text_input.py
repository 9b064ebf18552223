"""Text given to ``SparsityCollector.fit``: a string, a list of strings, or a text file / folder path becomes token
windows through the model's own tokenizer (:func:`tl_sparsity.text.text_batches`), as the command line does; lists
of numbers and the like raise, naming what ``fit`` takes, instead of running one forward per element."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import text as _text

__all__ = ["as_batches", "CTX_LEN", "BATCH_SIZE"]

CTX_LEN = 128  #: tokens per window (BOS included) for text given to ``fit``, at most the model's ``n_ctx``
BATCH_SIZE = 16  #: windows per forward for text given to ``fit``


def as_batches(col: Any, token_batches: Any) -> Any:
    """``token_batches`` unchanged when they are batches; token windows when they are text (see the module)."""
    texts = _texts(token_batches)
    if texts is None:
        return token_batches
    tokenizer = getattr(col.model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("fit got text, but this model has no tokenizer (model.tokenizer is None): load it with one "
                         "(tl_sparsity.load_model, or set model.tokenizer), or pass token ids [batch, pos] instead.")
    n_ctx = getattr(getattr(col.model, "cfg", None), "n_ctx", None) or CTX_LEN
    return _on_device(_text.text_batches(tokenizer, texts, ctx_len=min(CTX_LEN, int(n_ctx)), batch_size=BATCH_SIZE,
                                         bos=col.skip_bos), model_device(col.model))


def _texts(batches: Any) -> list[str] | None:
    if isinstance(batches, os.PathLike) or (isinstance(batches, str) and _is_path(batches)):
        return _text.load_texts(str(batches))
    if isinstance(batches, str):
        if not batches.strip():
            raise ValueError("fit got an empty string; give text, a list of texts, a text file, or token batches.")
        return [batches]
    if isinstance(batches, (list, tuple)) and batches:
        if all(isinstance(b, str) for b in batches):
            return list(batches)
        if any(isinstance(b, (str, int, float)) for b in batches):  # bool is an int
            raise TypeError(f"fit takes token batches (tensors [batch, pos] of token ids, (tokens, attention_mask) "
                            f"pairs or dicts with input_ids) or text (a string, a list of strings, a text file); got a "
                            f"list holding {type(next(b for b in batches if not hasattr(b, 'shape'))).__name__}. "
                            "Wrap token ids as torch.tensor([[...]]).")
    return None


def _is_path(s: str) -> bool:
    if "\n" in s or len(s) > 4096:
        return False
    try:
        return Path(s).expanduser().is_file() or Path(s).expanduser().is_dir()
    except OSError:  # a name too long for the file system, ...
        return False


def model_device(model: Any) -> Any:
    """The device of ``model``'s first parameter; None for a model without parameters."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return None


def _on_device(batches: Iterator[Any], device: Any) -> Iterator[Any]:
    for b in batches:
        yield b if device is None else b.to(device)
