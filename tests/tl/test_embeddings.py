"""The token-embedding matrix of every TransformerLens generation's models (the rows of the paper's token-embedding
measurement, benchmarks/token_embeddings.py)."""

from __future__ import annotations

import pytest
import torch

from tl_sparsity.tl.embeddings import token_embeddings


def test_token_embeddings_are_the_rows_the_model_looks_up(model):
    w = token_embeddings(model)
    assert w.dtype == torch.float32 and w.device.type == "cpu"
    assert w.shape == (model.cfg.d_vocab, model.cfg.d_model)
    tokens = torch.tensor([[3, 7, 7, 11]])
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
    torch.testing.assert_close(cache["hook_embed"][0].float().cpu(), w[tokens[0]])
    w[0] += 1.0  # a copy: the model's weights are untouched
    assert not torch.equal(model.W_E[0].detach().float().cpu(), w[0])


def test_token_embeddings_refuse_objects_without_an_embedding_matrix():
    with pytest.raises(TypeError, match="no token-embedding matrix W_E"):
        token_embeddings(torch.nn.Linear(3, 3))

    class Odd:
        W_E = torch.zeros(3)

    with pytest.raises(TypeError, match=r"not a \[d_vocab, d_model\] tensor"):
        token_embeddings(Odd())
