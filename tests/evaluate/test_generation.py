"""Greedy-generation agreement and generated-answer accuracy (bitdelta.evaluate.generation)."""

from pathlib import Path

import pytest
import torch

from bitdelta.evaluate import answer_accuracy, compare_generations, greedy_agreement, greedy_generations, gsm8k_answer
from bitdelta.hf import load_model, load_tokenizer

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny"
PROMPTS = ["Question: Tom has 3 boxes with 12 apples each. How many apples?\nAnswer:",
           "Question: A train goes 60 miles in 2 hours. How fast?\nAnswer:", "Question: 2 + 2?\nAnswer:"]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    tok = load_tokenizer(TINY / "gsm8k")
    return load_model(TINY / "gsm8k", device="cpu"), load_model(TINY / "base", device="cpu"), tok


def test_greedy_generations_match_unbatched_and_hf_generate(models):
    ft, _, tok = models
    batched = greedy_generations(ft, tok, PROMPTS, max_new_tokens=10, batch_size=3)
    alone = [greedy_generations(ft, tok, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == alone  # left padding with explicit positions changes nothing
    enc = tok(PROMPTS[0], return_tensors="pt")
    ref = ft.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    want = ref[0, enc["input_ids"].shape[1]:].tolist()
    assert batched[0] == want[: len(batched[0])] and len(batched[0]) == min(10, len(want))


def test_agreement_of_a_model_with_itself_and_with_the_base(models):
    ft, base, tok = models
    same = greedy_agreement(ft, ft, tok, PROMPTS, max_new_tokens=12)
    assert same.exact_match == 1.0 and same.token_agreement == 1.0 and same.n_prompts == 3
    ref = greedy_generations(ft, tok, PROMPTS, max_new_tokens=12)
    other = greedy_agreement(base, None, tok, PROMPTS, max_new_tokens=12, reference=ref)
    assert other.exact_match < 1.0 and other.mean_prefix_tokens < same.mean_prefix_tokens


def test_compare_generations_counts_prefixes_and_eos():
    r = compare_generations([[1, 2, 3], [5, 9], [7, 1]], [[1, 2, 3], [5, 6], [7]], max_new_tokens=3)
    assert r.exact_match == pytest.approx(1 / 3) and r.mean_prefix_tokens == pytest.approx((3 + 1 + 1) / 3)
    assert r.token_agreement == pytest.approx(5 / 6)
    assert compare_generations([[1, 2, 3, 4]], [[1, 2, 3, 9]], max_new_tokens=3).exact_match == 1.0  # first 3 only
    with pytest.raises(ValueError):
        compare_generations([[1]], [[1], [2]], 3)


def test_gsm8k_answers_and_accuracy(models):
    assert gsm8k_answer("so 3 * 4 = 12\n#### 1,200") == "1200"
    assert gsm8k_answer("she has 5 then 7.50 left") == "7.5"
    assert gsm8k_answer("no digits") is None
    ft, _, tok = models
    gens = greedy_generations(ft, tok, PROMPTS[:2], max_new_tokens=40)
    # references built from the model's own answers score 1.0; a wrong number scores 0
    mine = [tok.decode(g, skip_special_tokens=True) for g in gens]
    own = answer_accuracy(ft, tok, PROMPTS[:2], mine, max_new_tokens=40)
    answered = [m for m in mine if gsm8k_answer(m) is not None]
    assert own["n"] == len(answered) and (own["accuracy"] == 1.0 if answered else True)
    wrong = answer_accuracy(ft, tok, PROMPTS[:2], ["#### 123456789"] * 2, max_new_tokens=40)
    assert wrong["accuracy"] == 0.0 and wrong["n"] == 2
