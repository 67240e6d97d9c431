"""The fidelity suite on the bundled tiny models: every measure, the three models scored the same way,
the delta applied only for its own measures, and a perfect stand-in (the fine-tune itself) scoring perfectly;
the per-model Scorer on its own: the parts asked for, each timed, the fine-tune's generations made once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bitdelta
from bitdelta.errors import ConfigError
from bitdelta.evaluate import fidelity, recovery, suite
from bitdelta.evaluate.suite import Scorer, SuiteData, SuiteResult, SuiteSettings, evaluate_delta
from bitdelta.hf import load_model, load_tokenizer

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny"
SETTINGS = SuiteSettings(max_length=64, batch_size=4, agree_prompts=3, agree_tokens=6, qa_limit=3, qa_new_tokens=8,
                         task_limit=4, window=32, stride=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    rows = [json.loads(line) for line in (TINY / "heldout" / "gsm8k.jsonl").read_text().splitlines()[:6]]
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "arc_easy.jsonl").write_text("\n".join(json.dumps(
        {"query": f"Question: {r['question'][:60]}", "choices": ["yes", "no", "four"], "gold": i % 3})
        for i, r in enumerate(rows)) + "\n")
    text = tmp / "text.txt"
    text.write_text((TINY / "heldout" / "stdlib.txt").read_text()[:1500])
    return SuiteData(heldout=[f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows],
                     prompts=[f"Question: {r['question']}\nAnswer:" for r in rows],
                     qa=TINY / "heldout" / "gsm8k.jsonl", tasks=("arc_easy",), tasks_dir=tasks, text=text)


def test_every_measure_for_base_finetune_and_delta(data, tmp_path):
    bitdelta.compress(TINY / "base", TINY / "gsm8k", scale="row", progress=False).save_pretrained(tmp_path / "d")
    base = load_model(TINY / "base", device="cpu")
    r = evaluate_delta(base, TINY / "gsm8k", tmp_path / "d", data, SETTINGS, device="cpu")
    assert isinstance(r, SuiteResult) and not hasattr(base, "_bitdelta_restore")  # the delta was removed
    # the held-out perplexities are those fidelity measures on the same tokens, and recovery follows from them
    tok = load_tokenizer(tmp_path / "d")
    ft = load_model(TINY / "gsm8k", device="cpu")
    ref = fidelity(base, ft, tok, data.heldout, max_length=64, progress=False)
    assert r.base.heldout_ppl == pytest.approx(ref.ppl_student)
    assert r.finetuned.heldout_ppl == pytest.approx(ref.ppl_teacher)
    assert r.recovery == pytest.approx(recovery(r.base.heldout_ppl, r.finetuned.heldout_ppl, r.delta.heldout_ppl))
    assert r.delta.heldout_ppl == pytest.approx(r.fidelity.ppl_student) and 0 < r.recovery < 1.2
    assert r.fidelity.kl > 0 and r.fidelity.n_docs == 6
    assert r.greedy_agreement.n_prompts == 3 and r.base_greedy_agreement.n_prompts == 3
    for scores in (r.base, r.finetuned, r.delta):
        assert scores.answer_accuracy["n"] == 3 and scores.tasks["arc_easy"].n == 4 and scores.text.ppl > 1
    assert json.loads(json.dumps(r.to_dict()))["settings"]["agree_tokens"] == 6


def test_a_perfect_stand_in_scores_perfectly_and_missing_data_is_skipped(data):
    ft = load_model(TINY / "gsm8k", device="cpu")
    tok = load_tokenizer(TINY / "gsm8k")
    only_text = SuiteData(heldout=data.heldout, prompts=data.prompts)
    r = evaluate_delta(TINY / "base", ft, ft, only_text, SETTINGS, tokenizer=tok)
    assert r.fidelity.kl == pytest.approx(0, abs=1e-6) and r.fidelity.top1_agreement == 1.0
    assert r.recovery == pytest.approx(1.0) and r.greedy_agreement.exact_match == 1.0
    assert r.delta.answer_accuracy is None and r.delta.tasks is None and r.delta.text is None
    with pytest.raises(ValueError, match="tokenizer="):
        evaluate_delta(ft, ft, ft, only_text, SETTINGS)


def test_the_scorer_scores_the_finetune_against_itself_perfectly(data, monkeypatch):
    ft = load_model(TINY / "gsm8k", device="cpu")
    base = load_model(TINY / "base", device="cpu")
    generated, real = [], suite.greedy_generations

    def counted(model, *args, **kwargs):
        generated.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(suite, "greedy_generations", counted)
    syncs = []
    scorer = Scorer(ft, load_tokenizer(TINY / "gsm8k"), data, SETTINGS, sync=lambda: syncs.append(1))
    base_scores = scorer.score(base, parts=("fidelity",))
    s = scorer.score(ft)
    assert s.fidelity.kl == pytest.approx(0, abs=1e-6) and s.fidelity.top1_agreement == 1.0
    assert s.heldout_ppl == s.fidelity.ppl_student == pytest.approx(base_scores.fidelity.ppl_teacher)
    assert recovery(base_scores.heldout_ppl, base_scores.fidelity.ppl_teacher, s.heldout_ppl) == pytest.approx(1.0)
    assert s.greedy_agreement.exact_match == 1.0 and s.greedy_agreement.n_prompts == 3
    assert s.answer_accuracy["n"] == 3 and s.tasks["arc_easy"].n == 4 and s.text.ppl > 1
    assert list(s.times) == ["fidelity_s", "generation_s", "text_s", "tasks_s"] and len(syncs) == 5
    # only the parts asked for; the fine-tune's reference generations were made once, the base's each time asked
    again = scorer.score(base, parts=("generation",))
    assert again.greedy_agreement.n_prompts == 3 and again.fidelity is None and again.text is None
    assert list(again.times) == ["generation_s"] and generated == [ft, base]
    assert base_scores.greedy_agreement is None and base_scores.tasks is None
    assert list(base_scores.times) == ["fidelity_s"]
    with pytest.raises(ConfigError, match="unknown suite part"):
        scorer.score(ft, parts=("wikitext",))
    with pytest.raises(ConfigError, match="tasks_dir"):
        Scorer(ft, scorer.tok, SuiteData(heldout=data.heldout, tasks=("arc_easy",)))


def test_the_suite_imports_nothing_of_the_benchmarks():
    code = "import sys, bitdelta.evaluate.suite; print([m for m in sys.modules if m.split('.')[0] == 'benchmarks'])"
    run = subprocess.run([sys.executable, "-c", code], cwd=TINY.parents[1], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
