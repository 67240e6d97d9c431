"""Fidelity (KL, top-1 agreement, perplexities) and recovery, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from bitdelta.evaluate import fidelity, perplexity_of_documents, recovery
from conftest import make_tiny_llama

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "She poured milk.",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
    "In my palm is a clear stone.",
    "Which gas do plants absorb from the air?",
]


def test_model_against_itself(tiny_llama, bpe_tokenizer):
    r = fidelity(tiny_llama, tiny_llama, bpe_tokenizer, DOCS, max_length=64, batch_size=2, progress=False)
    assert r.kl == pytest.approx(0.0, abs=1e-6)
    assert r.top1_agreement == 1.0
    assert r.ppl_student == pytest.approx(r.ppl_teacher, rel=1e-6)
    p = perplexity_of_documents(tiny_llama, bpe_tokenizer, DOCS, max_length=64, progress=False)
    assert r.n_tokens == p.n_tokens
    assert r.ppl_teacher == pytest.approx(p.ppl, rel=1e-5)


def _manual(student, teacher, tok, docs):
    kl, agree, n, nll_s, nll_t = 0.0, 0, 0, 0.0, 0.0
    for d in docs:
        ids = torch.tensor([tok(d, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ls = torch.log_softmax(student(input_ids=ids).logits[0, :-1].double(), -1)
            lt = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1)
        kl += (lt.exp() * (lt - ls)).sum().item()
        agree += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
        tgt = ids[0, 1:, None]
        nll_s -= ls.gather(-1, tgt).sum().item()
        nll_t -= lt.gather(-1, tgt).sum().item()
        n += ids.shape[1] - 1
    return kl / n, agree / n, math.exp(nll_s / n), math.exp(nll_t / n), n


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_two_models_match_manual_and_padding_not_counted(tiny_llama, bpe_tokenizer, batch_size):
    other = make_tiny_llama(len(bpe_tokenizer), seed=7)
    kl, agree, ppl_s, ppl_t, n = _manual(other, tiny_llama, bpe_tokenizer, DOCS)
    r = fidelity(other, tiny_llama, bpe_tokenizer, DOCS, max_length=64, batch_size=batch_size, progress=False)
    assert r.n_tokens == n
    assert r.kl > 0.01
    assert r.kl == pytest.approx(kl, rel=1e-4)
    assert r.top1_agreement == pytest.approx(agree)
    assert r.ppl_student == pytest.approx(ppl_s, rel=1e-5)
    assert r.ppl_teacher == pytest.approx(ppl_t, rel=1e-5)
    assert set(r.to_dict()) >= {"kl", "top1_agreement", "ppl_student", "ppl_teacher", "n_tokens"}


def test_kl_direction_is_teacher_to_student(tiny_llama, bpe_tokenizer):
    other = make_tiny_llama(len(bpe_tokenizer), seed=3)
    kl_ts = fidelity(other, tiny_llama, bpe_tokenizer, DOCS, max_length=64, progress=False).kl
    kl_st = fidelity(tiny_llama, other, bpe_tokenizer, DOCS, max_length=64, progress=False).kl
    expected = _manual(other, tiny_llama, bpe_tokenizer, DOCS)[0]
    assert kl_ts == pytest.approx(expected, rel=1e-4)
    assert abs(kl_ts - kl_st) > 1e-4 * kl_ts  # KL is asymmetric, so the direction is tested


def test_recovery():
    assert recovery(20.0, 10.0, 10.0) == pytest.approx(1.0)
    assert recovery(20.0, 10.0, 20.0) == pytest.approx(0.0)
    assert recovery(math.e**2, math.e, math.e**1.5) == pytest.approx(0.5)
    assert recovery(20.0, 10.0, 25.0) < 0
    with pytest.raises(ValueError, match="undefined"):
        recovery(10.0, 10.0, 12.0)
