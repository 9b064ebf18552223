"""Text sources and token windows: offline, with tokenizers trained in-process (no hub, no download)."""

from __future__ import annotations

import itertools
import sys
import types

import pytest
import torch

from helpers import CORPUS, train_tokenizer
from tl_sparsity.text import count_tokens, iter_texts, load_texts, start_token_id, token_windows



@pytest.fixture(scope="module")
def gpt_tok():
    return train_tokenizer("gpt")


@pytest.fixture(scope="module")
def bert_tok():
    return train_tokenizer("bert")


def reference_stream(tok, texts, sep):
    """The concatenated stream by a plain loop: each text encoded on its own, ``sep`` between texts."""
    out: list[int] = []
    for i, t in enumerate(texts):
        if i and sep is not None:
            out.append(sep)
        out += tok.encode(t, add_special_tokens=False)
    return out


# ---------------------------------------------------------------------------------------------------- sources
def test_pydoc_source_is_the_stdlib_topics_in_key_order():
    from pydoc_data.topics import topics

    texts = load_texts("pydoc")
    assert texts == [topics[k] for k in sorted(topics) if topics[k].strip()]
    assert len(texts) > 50 and sum(map(len, texts)) > 200_000


def test_file_source_is_one_text_and_folder_source_reads_txt_and_md_sorted_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.md").write_text("# ay")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "skip.py").write_text("print('not text')")
    assert load_texts(str(tmp_path)) == ["# ay", "bee", "sea"]
    assert load_texts(str(tmp_path / "b.txt")) == ["bee"]
    assert load_texts(str(tmp_path), max_texts=2) == ["# ay", "bee"]


def test_missing_paths_and_empty_sources_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_texts(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_texts("./missing_corpus")
    with pytest.raises(ValueError, match=r"no \*.txt or \*.md files"):
        load_texts(str(tmp_path))
    (tmp_path / "blank.md").write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        load_texts(str(tmp_path))
    with pytest.raises(ValueError, match="text source"):
        load_texts("")
    with pytest.raises(ValueError, match="max_texts"):
        load_texts("pydoc", max_texts=0)


def test_dataset_names_without_datasets_installed_say_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_texts("someone/some-corpus")


def _fake_datasets(rows=None, error=None):
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if error is not None:
            raise error
        return list(rows)  # re-iterable, like a datasets.IterableDataset

    return types.SimpleNamespace(load_dataset=load_dataset), calls


def test_dataset_names_stream_the_text_column_with_an_optional_config(monkeypatch):
    fake, calls = _fake_datasets([{"text": "one"}, {"text": ""}, {"text": "two"}, {"text": "three"}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_texts("org/corpus:cfg", max_texts=2) == ["one", "two"]
    assert load_texts("org/corpus") == ["one", "two", "three"]  # each row once
    assert calls == [("org/corpus", "cfg", "train", True), ("org/corpus", None, "train", True)]


def test_dataset_errors_name_the_problem_and_the_offline_alternatives(monkeypatch):
    fake, _ = _fake_datasets(error=ConnectionError("hub unreachable"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(RuntimeError, match="hub unreachable.*offline, use 'pydoc'"):
        load_texts("org/corpus")
    fake, _ = _fake_datasets([{"content": "x"}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match="no 'text' column.*content"):
        load_texts("org/corpus")


# ---------------------------------------------------------------------------------------------------- windows
def test_windows_start_with_bos_and_reassemble_the_token_stream(gpt_tok):
    texts = load_texts("pydoc")[:6]
    ctx, bs = 33, 5
    stream = reference_stream(gpt_tok, texts, sep=gpt_tok.eos_token_id)
    batches = list(token_windows(gpt_tok, texts, ctx_len=ctx, batch_size=bs))
    n_win = len(stream) // (ctx - 1)
    assert [b.shape[0] for b in batches] == [bs] * (n_win // bs) + ([n_win % bs] if n_win % bs else [])
    rows = torch.cat(batches)
    assert rows.dtype == torch.long and rows.shape == (n_win, ctx)
    assert (rows[:, 0] == gpt_tok.bos_token_id).all()
    assert rows[:, 1:].reshape(-1).tolist() == stream[: n_win * (ctx - 1)]
    assert stream.count(gpt_tok.eos_token_id) >= len(texts) - 1  # separators are in the stream


def test_bert_style_tokenizers_get_cls_in_front_and_sep_between_texts(bert_tok):
    assert start_token_id(bert_tok) == bert_tok.cls_token_id
    stream = reference_stream(bert_tok, CORPUS, sep=bert_tok.sep_token_id)
    rows = torch.cat(list(token_windows(bert_tok, CORPUS, ctx_len=9, batch_size=4)))
    assert (rows[:, 0] == bert_tok.cls_token_id).all()
    assert rows[:, 1:].reshape(-1).tolist() == stream[: rows.shape[0] * 8]
    assert bert_tok.sep_token_id in rows[:, 1:]


def test_bos_false_gives_plain_stream_windows_of_ctx_len(gpt_tok):
    stream = reference_stream(gpt_tok, CORPUS, sep=gpt_tok.eos_token_id)
    rows = torch.cat(list(token_windows(gpt_tok, CORPUS, ctx_len=10, bos=False)))
    assert rows.shape == (len(stream) // 10, 10)
    assert rows.reshape(-1).tolist() == stream[: rows.numel()]


def test_max_tokens_counts_non_bos_tokens_rounded_up_to_whole_windows(gpt_tok):
    texts = load_texts("pydoc")[:4]
    full = torch.cat(list(token_windows(gpt_tok, texts, ctx_len=33)))
    for max_tokens, n_win in [(300, 10), (320, 10), (321, 11), (1, 1)]:
        part = torch.cat(list(token_windows(gpt_tok, texts, ctx_len=33, max_tokens=max_tokens)))
        assert torch.equal(part, full[:n_win]), max_tokens


def test_seed_shuffles_window_order_deterministically(gpt_tok):
    texts = load_texts("pydoc")[:4]
    plain = torch.cat(list(token_windows(gpt_tok, texts, ctx_len=17)))
    a = torch.cat(list(token_windows(gpt_tok, texts, ctx_len=17, seed=3)))
    b = torch.cat(list(token_windows(gpt_tok, texts, ctx_len=17, seed=3)))
    c = torch.cat(list(token_windows(gpt_tok, texts, ctx_len=17, seed=4)))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    perm = torch.randperm(plain.shape[0], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, plain[perm])  # the same windows, reordered
    sub = torch.cat(list(token_windows(gpt_tok, texts, ctx_len=17, seed=3, max_tokens=5 * 16)))
    assert torch.equal(sub, a[:5])  # a seeded subset is a random sample of the whole source
    assert torch.equal(torch.cat(list(token_windows(gpt_tok, texts, ctx_len=17))), plain)  # unseeded: deterministic


def test_windows_read_texts_lazily_without_a_seed(gpt_tok):
    def texts():
        yield from load_texts("pydoc")
        raise AssertionError("read past what the first batch needed")

    first = next(token_windows(gpt_tok, itertools.islice(texts(), 10**6), ctx_len=65, batch_size=4))
    assert first.shape == (4, 65)


def test_count_tokens_agrees_with_the_windows(gpt_tok, bert_tok):
    texts = load_texts("pydoc")[:5]
    for tok in (gpt_tok, bert_tok):
        sep = tok.sep_token_id if tok.cls_token_id is not None else tok.eos_token_id
        n = count_tokens(tok, texts, ctx_len=65)
        rows = torch.cat(list(token_windows(tok, texts, ctx_len=65)))
        assert n.stream == len(reference_stream(tok, texts, sep))
        assert n.windows == rows.shape[0] == n.stream // 64
        assert n.usable == rows[:, 1:].numel()


def test_window_errors_are_clear(gpt_tok):
    with pytest.raises(ValueError, match="ctx_len must be >= 2"):
        next(token_windows(gpt_tok, CORPUS, ctx_len=1))
    with pytest.raises(ValueError, match="batch_size"):
        next(token_windows(gpt_tok, CORPUS, batch_size=0))
    with pytest.raises(ValueError, match="max_tokens"):
        next(token_windows(gpt_tok, CORPUS, max_tokens=0))
    with pytest.raises(ValueError, match="fewer tokens than one window"):
        list(token_windows(gpt_tok, ["tiny"], ctx_len=128))
    with pytest.raises(TypeError, match="not one string"):
        next(token_windows(gpt_tok, "a single string", ctx_len=4))
    bare = train_tokenizer("bare", vocab_size=280)
    with pytest.raises(ValueError, match="skip_bos=False"):
        next(token_windows(bare, CORPUS, ctx_len=8))
    rows = next(token_windows(bare, CORPUS, ctx_len=8, bos=False))  # no BOS needed without bos
    assert rows.shape[1] == 8


def test_iter_texts_is_lazy_for_local_sources(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"text {i}")
    it = iter_texts(str(tmp_path))
    assert next(it) == "text 0"
