"""Text sources and fixed-length token windows for streaming a model over real text, offline by default.

``load_texts("pydoc")`` gives the standard library's own documentation (no install, no network); a ``.txt`` file or
a folder of ``*.txt``/``*.md`` files works the same way, and a Hugging Face dataset name streams through ``datasets``
where that is installed and the hub is reachable. :func:`token_windows` turns texts into ``[batch, ctx_len]`` token
batches that start with BOS (``[CLS]`` for BERT-style tokenizers), so that the collector's default of dropping the
first position drops exactly that token.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = [
    "TokenCount",
    "count_tokens",
    "iter_texts",
    "load_texts",
    "separator_token_id",
    "start_token_id",
    "text_batches",
    "token_windows",
]

logger = logging.getLogger("tl_sparsity")

_TEXT_SUFFIXES = (".txt", ".md")
_TOKENIZE_CHUNK = 64  # texts per tokenizer call


def iter_texts(source: str = "pydoc") -> Iterator[str]:
    """Yield the non-empty texts of ``source``, lazily (a Hugging Face dataset streams).

    ``source``: ``"pydoc"`` (the stdlib's ``pydoc_data.topics``: 79 documents, ~465 kB of English); a file (one
    text); a folder (every ``*.txt`` and ``*.md`` below it, recursively, sorted by relative path, one text per file);
    otherwise a Hugging Face dataset ``"name"`` or ``"name:config"`` (split ``train``, column ``text``; needs
    ``datasets`` and the hub).
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"a text source is 'pydoc', a file, a folder or a dataset name; got {source!r}.")
    if source == "pydoc":
        from pydoc_data.topics import topics

        yield from (topics[k] for k in sorted(topics) if topics[k].strip())
        return
    path = Path(source).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text
        return
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"no *.txt or *.md files under {path}; point at a folder of text files, or a file.")
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        return
    if source.startswith(("/", ".", "~")) or source.lower().endswith(_TEXT_SUFFIXES) or "\\" in source:
        raise FileNotFoundError(f"no such file or folder: {path}. Text sources are 'pydoc', a file, a folder of "
                                f"*.txt/*.md files, or a Hugging Face dataset name.")
    yield from _hf_dataset(source)


def _hf_dataset(source: str) -> Iterator[str]:
    name, _, config = source.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{source!r} is not a file or folder here, so it was read as a Hugging Face dataset name, which needs "
            "`pip install datasets` (and access to the hub). Offline, use 'pydoc', a .txt file or a folder."
        ) from e
    logger.info("streaming the Hugging Face dataset %s (split train, column text)", source)
    try:
        rows = iter(datasets.load_dataset(name, config or None, split="train", streaming=True))
        first = next(rows, None)
    except Exception as e:  # datasets raises many types (connection, missing config, ...)
        raise RuntimeError(
            f"could not load the Hugging Face dataset {source!r} ({type(e).__name__}: {e}). Check the name "
            "('name' or 'name:config') and that the hub is reachable; offline, use 'pydoc', a .txt file or a folder."
        ) from e
    if first is None:
        return
    if "text" not in first:
        raise ValueError(f"dataset {source!r} has no 'text' column (columns: {sorted(first)}); pick a text dataset.")
    for row in itertools.chain([first], rows):
        text = row["text"]
        if isinstance(text, str) and text.strip():
            yield text


def load_texts(source: str = "pydoc", *, max_texts: int | None = None) -> list[str]:
    """The non-empty texts of ``source`` (see :func:`iter_texts`), at most ``max_texts`` of them.

    Raises ``ValueError`` when the source holds no text.
    """
    if max_texts is not None and int(max_texts) <= 0:
        raise ValueError(f"max_texts must be a positive integer or None, got {max_texts!r}.")
    texts = list(itertools.islice(iter_texts(source), max_texts))
    if not texts:
        raise ValueError(f"the text source {source!r} is empty (no non-blank text); pick another source.")
    return texts


# ---------------------------------------------------------------------------------------------------- special tokens
def start_token_id(tokenizer: Any) -> int | None:
    """The id that starts each window: ``[CLS]`` when the tokenizer has one (BERT-style), else BOS, else None."""
    for attr in ("cls_token_id", "bos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return None


def separator_token_id(tokenizer: Any) -> int | None:
    """The id placed between texts: ``[SEP]`` for BERT-style tokenizers (with a CLS token), else EOS, else None."""
    if getattr(tokenizer, "cls_token_id", None) is not None and getattr(tokenizer, "sep_token_id", None) is not None:
        return int(tokenizer.sep_token_id)
    eos = getattr(tokenizer, "eos_token_id", None)
    return None if eos is None else int(eos)


# ---------------------------------------------------------------------------------------------------- windows
def _token_stream(tokenizer: Any, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each non-empty text, with the separator (if any) placed before every text but the first."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list (or iterable) of strings, not one string; wrap it: [text].")
    sep = separator_token_id(tokenizer)
    first = True
    it = iter(texts)
    while chunk := list(itertools.islice(it, _TOKENIZE_CHUNK)):
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if not ids:
                continue
            yield list(ids) if first or sep is None else [sep, *ids]
            first = False


def _windows(tokenizer: Any, texts: Iterable[str], body: int) -> Iterator[list[int]]:
    """Consecutive ``body``-token slices of the concatenated stream; the trailing partial slice is dropped."""
    buf: list[int] = []
    for ids in _token_stream(tokenizer, texts):
        buf.extend(ids)
        n = len(buf) // body
        for i in range(n):
            yield buf[i * body:(i + 1) * body]
        del buf[:n * body]


def _check(ctx_len: int, batch_size: int, bos: bool, tokenizer: Any) -> tuple[int, int | None]:
    if int(ctx_len) < (2 if bos else 1):
        raise ValueError(f"ctx_len must be >= {2 if bos else 1} (BOS plus at least one token), got {ctx_len!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    start = start_token_id(tokenizer) if bos else None
    if bos and start is None:
        raise ValueError("this tokenizer has neither a CLS nor a BOS token: pass bos=False, and build the collector "
                         "with skip_bos=False so that it keeps the first position.")
    return int(ctx_len) - (1 if bos else 0), start


def token_windows(
    tokenizer: Any,
    texts: Iterable[str],
    *,
    ctx_len: int = 128,
    batch_size: int = 16,
    bos: bool = True,
    max_tokens: int | None = None,
    seed: int | None = None,
) -> Iterator[Int[Tensor, "batch ctx_len"]]:
    """Cut ``texts`` into token windows and yield them as ``[batch, ctx_len]`` int64 batches.

    The texts are tokenized without special tokens and concatenated, with the tokenizer's separator between texts
    (``[SEP]`` for BERT-style tokenizers, else EOS, else nothing). The stream is cut into consecutive windows of
    ``ctx_len - 1`` tokens and each gets the start token (``[CLS]`` if the tokenizer has one, else BOS) in front,
    so the collector's ``skip_bos=True`` drops exactly that token. With ``bos=False`` windows are ``ctx_len``
    stream tokens (then use ``skip_bos=False``).

    Every window is full, so no padding or attention mask is ever needed: the stream's trailing tokens that do not
    fill a window are dropped, and the last batch may have fewer than ``batch_size`` rows.

    Args:
        tokenizer: a Hugging Face tokenizer (``model.tokenizer`` of a TransformerLens model).
        texts: strings, e.g. :func:`load_texts` (any iterable; read lazily unless ``seed`` is given).
        max_tokens: stop once at least this many stream tokens (BOS not counted — what the collector counts) are
            out, i.e. after ``ceil(max_tokens / (ctx_len - 1))`` windows; None = all.
        seed: shuffle the order of all windows with this seed (reads every text first); None = stream order.

    Deterministic for given inputs. Raises ``ValueError`` when the texts do not fill a single window.
    """
    body, start = _check(ctx_len, batch_size, bos, tokenizer)
    if max_tokens is not None and int(max_tokens) <= 0:
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}.")
    n_max = None if max_tokens is None else math.ceil(int(max_tokens) / body)
    windows: Iterable[list[int]] = _windows(tokenizer, texts, body)
    if seed is not None:
        every = list(windows)
        order = torch.randperm(len(every), generator=torch.Generator().manual_seed(int(seed))).tolist()
        windows = [every[i] for i in order]
    windows = itertools.islice(windows, n_max)
    prefix = [] if start is None else [start]
    n = 0
    while rows := list(itertools.islice(windows, int(batch_size))):
        n += len(rows)
        yield torch.tensor([prefix + w for w in rows], dtype=torch.long)
    if n == 0:
        raise ValueError(f"the texts hold fewer tokens than one window of {body} (ctx_len={ctx_len}); lower ctx_len "
                         "or use a larger text source.")


def text_batches(tokenizer: Any, texts: Iterable[str], *, ctx_len: int = 128, batch_size: int = 16,
                 bos: bool = True) -> Iterator[Int[Tensor, "batch pos"]]:
    """Like :func:`token_windows` (no shuffling, no budget), but the stream's trailing tokens are not dropped: they
    come last as one shorter window of their own (a batch of one row, so no padding). For text given to
    ``SparsityCollector.fit``: every token of a short text is seen. Yields nothing for texts without tokens."""
    body, start = _check(ctx_len, batch_size, bos, tokenizer)
    prefix = [] if start is None else [start]
    stream = list(itertools.chain.from_iterable(_token_stream(tokenizer, texts)))
    full, tail = divmod(len(stream), body)
    for i in range(0, full, int(batch_size)):
        rows = [prefix + stream[j * body:(j + 1) * body] for j in range(i, min(i + int(batch_size), full))]
        yield torch.tensor(rows, dtype=torch.long)
    if tail:
        yield torch.tensor([prefix + stream[full * body:]], dtype=torch.long)


class TokenCount(NamedTuple):
    """How much text a source gives a tokenizer (see :func:`count_tokens`)."""

    stream: int  #: tokens of the concatenated stream, separators included, no BOS
    windows: int  #: full windows :func:`token_windows` yields
    usable: int  #: stream tokens inside those windows (BOS not counted) — the most ``collector.fit`` can see


def count_tokens(tokenizer: Any, texts: Iterable[str], *, ctx_len: int = 128, bos: bool = True) -> TokenCount:
    """Count what :func:`token_windows` can yield, e.g. to say "pydoc gives N tokens; asked for M"."""
    body, _ = _check(ctx_len, 1, bos, tokenizer)
    stream = sum(len(ids) for ids in _token_stream(tokenizer, texts))
    return TokenCount(stream=stream, windows=stream // body, usable=(stream // body) * body)
