"""Sliding-window and per-document perplexity against single-forward hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from bitdelta.evaluate import perplexity, perplexity_of_documents
from conftest import make_bpe_tokenizer, make_tiny_llama, manual_logprobs

TEXT = (
    "The quick brown fox jumps over the lazy dog. She poured milk in the bowl and lost her appetite. "
    "The man turned on the faucet, therefore water flowed from the spout."
)


def test_window_covering_text_equals_full_context(tiny_llama, bpe_tokenizer):
    ids = bpe_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    expected = -manual_logprobs(tiny_llama, ids).sum().item()
    r = perplexity(tiny_llama, bpe_tokenizer, TEXT, window=len(ids) + 5, stride=3, progress=False)
    assert r.n_windows == 1
    assert r.n_tokens == len(ids) - 1
    assert r.nll_sum == pytest.approx(expected, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(expected / (len(ids) - 1)), rel=1e-5)
    assert (r.window, r.stride) == (len(ids) + 5, 3)


@pytest.mark.parametrize("window,stride", [(16, 5), (16, 16), (10, 1), (12, 7)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_window_scores_each_token_once(tiny_llama, bpe_tokenizer, window, stride, batch_size):
    ids = bpe_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    n = len(ids)
    assert n > 3 * window
    # Independent per-token reference: token j is scored by the first window (starts at multiples
    # of stride) that contains it and is not the window's first token.
    expected, scored = 0.0, 0
    for j in range(1, n):
        k = 0
        while not (k * stride <= j < k * stride + window):
            k += 1
        begin = k * stride
        if stride == window and j == begin:
            continue
        expected -= manual_logprobs(tiny_llama, ids[begin : j + 1])[-1].item()
        scored += 1
    r = perplexity(tiny_llama, bpe_tokenizer, TEXT, window=window, stride=stride, batch_size=batch_size,
                   progress=False)
    assert r.n_windows == math.ceil(max(n - window, 0) / stride) + 1
    if stride < window:
        assert r.n_tokens == n - 1  # every token but the first, exactly once
    else:
        assert r.n_tokens == n - r.n_windows  # disjoint chunks: each chunk's first token unscored
    assert r.n_tokens == scored
    assert r.nll_sum == pytest.approx(expected, rel=1e-5)


def test_bos_is_context_not_scored():
    tok = make_bpe_tokenizer(add_bos=True)
    model = make_tiny_llama(len(tok), seed=1)
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id
    r = perplexity(model, tok, TEXT, window=1000, progress=False)
    assert r.n_tokens == len(ids) - 1  # every text token, conditioned on BOS
    assert r.nll_sum == pytest.approx(-manual_logprobs(model, ids).sum().item(), rel=1e-5)
    r_nobos = perplexity(model, tok, TEXT, window=1000, add_bos=False, progress=False)
    assert r_nobos.n_tokens == len(ids) - 2


def test_bad_stride(tiny_llama, bpe_tokenizer):
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_llama, bpe_tokenizer, TEXT, window=8, stride=9, progress=False)


DOCS = [
    "The quick brown fox.",
    "She poured milk in the bowl and lost her appetite, and the man turned on the faucet.",
    "x",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
    "Which gas do plants absorb?",
]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_documents_padding_never_counted(tiny_llama, bpe_tokenizer, batch_size):
    enc = [bpe_tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    expected = sum(-manual_logprobs(tiny_llama, e).sum().item() for e in enc if len(e) > 1)
    r = perplexity_of_documents(tiny_llama, bpe_tokenizer, DOCS, max_length=200, batch_size=batch_size,
                                progress=False)
    assert r.n_tokens == sum(len(e) - 1 for e in enc)
    assert r.n_docs == len(DOCS)
    assert r.nll_sum == pytest.approx(expected, rel=1e-5)


def test_documents_truncated_to_max_length(tiny_llama, bpe_tokenizer):
    enc = [bpe_tokenizer(d, add_special_tokens=False)["input_ids"][:6] for d in DOCS]
    expected = sum(-manual_logprobs(tiny_llama, e).sum().item() for e in enc if len(e) > 1)
    r = perplexity_of_documents(tiny_llama, bpe_tokenizer, DOCS, max_length=6, batch_size=4, progress=False)
    assert r.n_tokens == sum(len(e) - 1 for e in enc)
    assert r.nll_sum == pytest.approx(expected, rel=1e-5)
    d = r.to_dict()
    assert d["max_length"] == 6 and d["ppl"] == pytest.approx(math.exp(expected / r.n_tokens), rel=1e-5)


def test_restores_training_mode(bpe_tokenizer):
    model = make_tiny_llama(len(bpe_tokenizer)).train()
    perplexity_of_documents(model, bpe_tokenizer, DOCS, max_length=32, progress=False)
    assert model.training
    assert torch.is_grad_enabled()  # no_grad did not leak
