"""Zero-shot task scoring: hand-computed log-likelihoods, acc vs acc_norm, the three JSONL formats,
batching/padding invariance, BOS handling and left truncation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bitdelta.evaluate import TASKS, evaluate_task, evaluate_tasks, loglikelihood
from conftest import SuccessorLM, make_bpe_tokenizer, make_tiny_llama, manual_logprobs

SHARED_TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tasks"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# Word tokenizer ids: <pad>=0 <s>=1 </s>=2 <unk>=3, w{i} = 4 + i; V = 32. SuccessorLM predicts id+1.
def h_m(vocab=32):
    return SuccessorLM.logp(vocab, True), SuccessorLM.logp(vocab, False)


def test_successor_closed_form_and_acc_vs_acc_norm(tmp_path, word_tokenizer):
    model = SuccessorLM(len(word_tokenizer))
    h, m = h_m()
    # BOS w0 w1 | w2 -> hit; w2 w3 -> 2 hits; w5 -> miss; w2 w9 -> hit + miss
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "w0 w1", "choices": ["w2", "w2 w3", "w5", "w2 w9"], "gold": 1}])
    lls = loglikelihood(model, word_tokenizer, [("w0 w1 ", c) for c in ["w2", "w2 w3", "w5", "w2 w9"]],
                        progress=False)
    assert [r.n_tokens for r in lls] == [1, 2, 1, 2]
    assert [r.logprob for r in lls] == pytest.approx([h, 2 * h, m, h + m], rel=1e-5)
    assert [r.is_greedy for r in lls] == [True, True, False, False]
    # acc: argmax of sums is choice 0 (h); acc_norm: per character h/2 < 2h/5, so choice 1 wins.
    assert h > 2 * h and h / 2 < 2 * h / 5
    r = evaluate_task(model, word_tokenizer, "mc", tmp_path, progress=False)
    assert (r.n, r.acc, r.acc_norm) == (1, 0.0, 1.0)
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "w0 w1", "choices": ["w2", "w2 w3", "w5", "w2 w9"], "gold": 0}])
    r = evaluate_task(model, word_tokenizer, "mc", tmp_path, progress=False)
    assert (r.acc, r.acc_norm) == (1.0, 0.0)


def test_winogrande_format(tmp_path, word_tokenizer):
    model = SuccessorLM(len(word_tokenizer))
    rows = [
        # option 1 ends in w5 -> "w6 w7" is 2 hits; option 0 ends in w1 -> miss + hit. gold 1: correct
        {"context_options": ["w0 w1", "w0 w5"], "continuation": "w6 w7", "gold": 1},
        # option 1 ends in w4 -> "w5" hit; gold 0: wrong
        {"context_options": ["w3 w9", "w3 w4"], "continuation": "w5", "gold": 0},
        {"context_options": ["w3 w9", "w3 w4"], "continuation": "w5", "gold": 1},
    ]
    write_jsonl(tmp_path / "winogrande.jsonl", rows)
    r = evaluate_task(model, word_tokenizer, "winogrande", tmp_path, batch_size=2, progress=False)
    assert r.format == "schema" and r.delimiter == " "
    assert r.n == 3 and r.acc == pytest.approx(2 / 3)
    assert r.acc_norm is None
    h, m = h_m()
    lls = loglikelihood(model, word_tokenizer, [("w0 w1 ", "w6 w7"), ("w0 w5 ", "w6 w7")], progress=False)
    assert [x.logprob for x in lls] == pytest.approx([m + h, 2 * h], rel=1e-5)


def test_lambada_format(tmp_path, word_tokenizer):
    model = SuccessorLM(len(word_tokenizer))
    rows = [
        {"context": "w0 w1 w2", "continuation": "w3"},  # greedy
        {"context": "w0 w1 w2", "continuation": "w3 w4"},  # greedy, two tokens
        {"context": "w0 w1 w2", "continuation": "w3 w9"},  # second token not the argmax
        {"context": "w0 w1 w2", "continuation": "w7"},  # miss
    ]
    write_jsonl(tmp_path / "lambada_openai.jsonl", rows)
    r = evaluate_task(model, word_tokenizer, "lambada_openai", tmp_path, batch_size=3, progress=False)
    h, m = h_m()
    assert r.n == 4 and r.acc == 0.5 and r.acc_norm is None
    assert r.ppl == pytest.approx(math.exp(-(h + 2 * h + (h + m) + m) / 4), rel=1e-5)
    r2 = evaluate_task(model, word_tokenizer, "lambada_openai", tmp_path, limit=2, progress=False)
    assert (r2.n, r2.acc) == (2, 1.0)


MC_ROWS = [
    {"query": "Question: Which gas do plants absorb from the air?",
     "choices": ["carbon dioxide", "milk", "the lazy dog", "a clear stone inside the bowl"], "gold": 0},
    {"query": "Question: What did the man turn on?", "choices": ["the faucet", "the fox"], "gold": 1},
    {"query": "Question: Who got the harder cases?",
     "choices": ["Maria", "Sarah was", "the quick brown fox jumps over"], "gold": 2},
]


def _manual_mc(model, tok, rows, delimiter, bos):
    """Single unpadded forward per choice: context tokens, then the tokens of ' ' + choice."""
    correct = correct_norm = 0
    all_lls = []
    for row in rows:
        ctx = tok((row["query"] + delimiter).rstrip(" "), add_special_tokens=False)["input_ids"]
        if bos:
            ctx = [tok.bos_token_id] + ctx
        lls = []
        for c in row["choices"]:
            cont = tok(" " + c, add_special_tokens=False)["input_ids"]
            lls.append(manual_logprobs(model, ctx + cont)[-len(cont):].sum().item())
        all_lls += lls
        correct += max(range(len(lls)), key=lambda i: lls[i]) == row["gold"]
        normed = [ll / len(c) for ll, c in zip(lls, row["choices"])]
        correct_norm += max(range(len(lls)), key=lambda i: normed[i]) == row["gold"]
    return all_lls, correct / len(rows), correct_norm / len(rows)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_multiple_choice_matches_manual_tiny_llama(tmp_path, bos, batch_size):
    tok = make_bpe_tokenizer(add_bos=bos)
    model = make_tiny_llama(len(tok), seed=2)
    write_jsonl(tmp_path / "arc_easy.jsonl", MC_ROWS)
    delim = TASKS["arc_easy"][1]
    assert delim == "\nAnswer: "
    lls_manual, acc, acc_norm = _manual_mc(model, tok, MC_ROWS, delim, bos)
    reqs = [(r["query"] + delim, c) for r in MC_ROWS for c in r["choices"]]
    lls = loglikelihood(model, tok, reqs, batch_size=batch_size, progress=False)
    assert [x.logprob for x in lls] == pytest.approx(lls_manual, rel=1e-4, abs=1e-4)
    r = evaluate_task(model, tok, "arc_easy", tmp_path, batch_size=batch_size, progress=False)
    assert (r.acc, r.acc_norm) == (pytest.approx(acc), pytest.approx(acc_norm))
    assert r.delimiter == delim and r.n == 3


def test_context_truncated_from_left(bpe_tokenizer, tiny_llama):
    context = "Sarah was a much better surgeon than Maria so Maria always got the harder"
    cont = " cases."
    ctx_ids = bpe_tokenizer(context, add_special_tokens=False)["input_ids"]
    cont_ids = bpe_tokenizer(cont, add_special_tokens=False)["input_ids"]
    full = ctx_ids + cont_ids
    max_length = 6
    assert len(full) > max_length + 1
    kept = full[-(max_length + 1):]  # input = kept[:-1] (max_length tokens), targets = its shift
    expected = manual_logprobs(tiny_llama, kept)[-len(cont_ids):].sum().item()
    untruncated = manual_logprobs(tiny_llama, full)[-len(cont_ids):].sum().item()
    [r] = loglikelihood(tiny_llama, bpe_tokenizer, [(context + " ", "cases.")], max_length=max_length, progress=False)
    assert r.logprob == pytest.approx(expected, rel=1e-5)
    assert abs(r.logprob - untruncated) > 1e-3


def test_add_bos_without_bos_token_is_an_error():
    tok = make_bpe_tokenizer(with_bos_token=False)
    model = make_tiny_llama(len(tok))
    with pytest.raises(ValueError, match="bos_token"):
        loglikelihood(model, tok, [("a ", "b")], add_bos=True, progress=False)
    [r] = loglikelihood(model, tok, [("the quick ", "brown")], progress=False)  # no BOS: works
    assert r.n_tokens >= 1 and r.logprob < 0


def test_evaluate_tasks_many_and_unknown_keys(tmp_path, word_tokenizer):
    model = SuccessorLM(len(word_tokenizer))
    write_jsonl(tmp_path / "copa.jsonl", [{"query": "w0 w1", "choices": ["w5", "w2"], "gold": 1}])
    write_jsonl(tmp_path / "lambada_openai.jsonl", [{"context": "w0", "continuation": "w1"}])
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "w0", "answer": "w1"}])
    res = evaluate_tasks(model, word_tokenizer, "copa, lambada_openai", tmp_path, progress=False)
    assert list(res.to_dict()) == ["copa", "lambada_openai"]
    assert res["copa"].acc == 1.0 and res["lambada_openai"].acc == 1.0
    with pytest.raises(ValueError, match="unknown task row keys"):
        evaluate_tasks(model, word_tokenizer, ["bad"], tmp_path, progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate_tasks(model, word_tokenizer, ["nope"], tmp_path, progress=False)


@pytest.mark.skipif(not SHARED_TASKS.is_dir(), reason="../shared/data/tasks not present")
def test_real_task_files_parse_and_score(bpe_tokenizer):
    model = make_tiny_llama(len(bpe_tokenizer), max_positions=128)
    res = evaluate_tasks(model, bpe_tokenizer, list(TASKS), SHARED_TASKS, limit=3, batch_size=8, progress=False)
    for name, r in res.results.items():
        assert r.n == 3, name
        assert 0.0 <= r.acc <= 1.0
        assert (r.acc_norm is None) == (name in ("winogrande", "lambada_openai")), name
    assert res["lambada_openai"].ppl > 1.0
