"""benchmarks/fidelity's CPU-cheap parts: held-out splits, packing, the schedule, the report.

The whole benchmark's CPU smoke run (minutes) is
``python -m benchmarks.fidelity --phase all --smoke --base-dir models/tiny/base --work /tmp/fid-smoke``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def fid():
    from benchmarks.fidelity import cli, data, report, settings, trainer

    return SimpleNamespace(main=cli.main, parse_args=settings.parse_args, DOMAINS=settings.DOMAINS,
                           HARD_RECIPES=settings.HARD_RECIPES, data_domain=data.data_domain,
                           domain_docs=data.domain_docs, heldout_prompts=data.heldout_prompts,
                           pack_blocks=data.pack_blocks, lr_at=trainer.lr_at, REPORT_START=report.REPORT_START)


@pytest.mark.skipif(not (SHARED / "finetune").is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("domain", ["gsm8k", "alpaca", "shakespeare"])
def test_heldout_never_overlaps_training(fid, domain):
    train, held = fid.domain_docs(SHARED, domain)
    assert len(held) >= 20 and len(train) > 5 * len(held)
    assert not set(train) & set(held)
    if domain == "shakespeare":  # the held-out part is the end of the plays, cut at a speech boundary
        text = (SHARED / "finetune" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        assert text.rstrip().endswith(held[-1].rstrip())
        assert held[0].split("\n")[0].endswith(":")


def test_pack_blocks_and_schedule(fid):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny" / "base")
    docs = ["ROMEO: what light", "Question: 2+2?\nAnswer: 4", "third document here"] * 5
    blocks = fid.pack_blocks(tok, docs, seq_len=8, seed=0)
    assert blocks.shape[1] == 8 and blocks.shape[0] >= 3
    assert int((blocks == tok.eos_token_id).sum()) >= 5  # one EOS after every document
    assert fid.pack_blocks(tok, docs, 8, 0).equal(blocks)  # seeded

    class A:
        ft_lr, ft_warmup, ft_min_lr_ratio = 3e-5, 0.1, 0.1

    lrs = [fid.lr_at(s, 100, A) for s in range(100)]
    assert lrs[9] == pytest.approx(3e-5) and lrs[0] < lrs[5] < lrs[9]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] >= 3e-6 * 0.999


def _record(domain, model, ppl, kl, weight_bytes=None):
    rec = {"domain": domain, "model": model, "heldout_ppl": ppl, "settings": {"smoke": False, "task_limit": 500},
           "device": "test", "fidelity": {"kl": kl, "top1_agreement": 0.9, "ppl_student": ppl, "ppl_teacher": 10.0},
           "wikitext": {"ppl": 20.0}, "tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.5}}}
    if weight_bytes:
        rec["delta"] = {"weight_bytes": weight_bytes, "compression_factor_weights_only": 15.9}
        rec.update(compress_s=1.0, distill_s=2.0, peak_gpu_build_bytes=2e9, peak_gpu_eval_bytes=3e9)
    return rec


def test_report_table_goals_and_doc_update(fid, tmp_path, capsys):
    import math

    rows = {"base": (20.0, 0.3), "finetune": (10.0, 0.0), "scalar-initial": (12.0, 0.05), "scalar": (11.0, 0.03),
            "auto": (10.2, 0.01), "auto-2bit": (10.01, 0.001)}
    for model, (ppl, kl) in rows.items():
        rec = _record("gsm8k", model, ppl, kl, None if model in ("base", "finetune") else 17_000_000)
        rec["recovery"] = (math.log(20.0) - math.log(ppl)) / (math.log(20.0) - math.log(10.0))
        (tmp_path / f"gsm8k__{model}.json").write_text(json.dumps(rec))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Kernels\n\ntext\n")
    argv = ["--phase", "report", "--results", str(tmp_path), "--report-dir", str(tmp_path), "--update-doc", str(doc)]
    assert fid.main(argv) == 0
    assert fid.main(argv) == 0  # a second report replaces the section instead of appending another
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n## Kernels\n\ntext\n")
    assert text.count(fid.REPORT_START) == 1 and text.count("| gsm8k | auto-2bit |") == 1
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("| gsm8k | auto-2bit |")  # the table is printed last
    checks = "\n".join(out)
    assert "1-bit recovery ≥ 95%: best auto 97.1% PASS" in checks
    assert "2-bit recovery ≥ 99%: 99.9% PASS" in checks
    assert "distilled > initial" in checks and "auto ≥ scalar" in checks


def test_report_merges_folders_and_marks_relative_lr_rows(fid, tmp_path, capsys):
    import math

    main, rel = tmp_path / "main", tmp_path / "rel"
    main.mkdir(), rel.mkdir()

    def write(folder, model, ppl, mode):
        rec = _record("alpaca", model, ppl, 0.01, None if model in ("base", "finetune") else 17_000_000)
        rec["settings"].update(distill_lr_mode=mode, distill_lr=1e-4 if mode == "absolute" else 3e-2)
        rec["recovery"] = (math.log(20.0) - math.log(ppl)) / (math.log(20.0) - math.log(10.0))
        (folder / f"alpaca__{model}.json").write_text(json.dumps(rec))

    for model, ppl in {"base": 20.0, "finetune": 10.0, "scalar": 11.0, "auto-2bit": 10.5}.items():
        write(main, model, ppl, "absolute")
    for model, ppl in {"base": 20.5, "finetune": 10.0, "scalar": 10.2, "auto-2bit": 10.05}.items():
        write(rel, model, ppl, "relative")
    argv = ["--phase", "report", "--results", f"{main},{rel}", "--report-dir", str(tmp_path)]
    assert fid.main(argv) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| alpaca |")]
    models = [line.split(" | ")[1] for line in table]
    # one base row (the first folder's), each relative row right after its plain variant
    assert models == ["base", "finetune", "scalar", "scalar (rel. lr 0.03)", "auto-2bit", "auto-2bit (rel. lr 0.03)"]
    assert "| alpaca | base | 20.000 |" in out
    assert "2-bit recovery ≥ 99%: 93.0% FAIL" in out
    assert "relative lr: scalar (rel. lr 0.03) 97.1% PASS (≥ 95%), auto-2bit (rel. lr 0.03) 99.3% PASS (≥ 99%)" in out
    md = (tmp_path / "fidelity.md").read_text()
    assert f"`{main}`, `{rel}`" in md


@pytest.mark.skipif(not (SHARED / "finetune").is_dir(), reason="../shared/data not present")
def test_prepare_makes_only_the_domains_asked_for(fid, tmp_path):
    work = tmp_path / "work"
    argv = ["--smoke", "--base-dir", str(ROOT / "models" / "tiny" / "base"), "--work", str(work)]
    assert fid.main(["--phase", "prepare", "--domain", "shakespeare", *argv]) == 0
    assert [d.name for d in (work / "finetunes").iterdir()] == ["shakespeare"]
    record = json.loads((work / "prepare.json").read_text())
    assert list(record["finetunes"]) == ["shakespeare"] and record["finetunes"]["shakespeare"]["steps"] >= 1
    with pytest.raises(SystemExit, match="run --phase prepare --domain gsm8k first"):
        fid.main(["--phase", "eval", "--domain", "gsm8k", *argv])


@pytest.mark.skipif(not (SHARED / "finetune").is_dir(), reason="../shared/data not present")
def test_hard_domains_and_agreement_prompts(fid):
    assert fid.data_domain("gsm8k-hard") == "gsm8k" and fid.data_domain("alpaca") == "alpaca"
    assert fid.domain_docs(SHARED, "gsm8k-hard") == fid.domain_docs(SHARED, "gsm8k")  # same data, harder recipe
    for name, recipe in fid.HARD_RECIPES.items():
        assert name in fid.DOMAINS and 6 <= recipe["epochs"] <= 10 and 1e-4 <= recipe["lr"] <= 3e-4
    args = fid.parse_args(["--phase", "eval", "--data", str(SHARED), "--agree-prompts", "5"])
    for domain in fid.DOMAINS:
        prompts = fid.heldout_prompts(args, domain)
        assert len(prompts) == 5 and all(p.strip() for p in prompts)
        held = set(fid.domain_docs(SHARED, domain)[1])
        train = fid.domain_docs(SHARED, domain)[0]
        # each prompt is the start of a held-out document, never of a training one
        assert all(any(h.startswith(p.rstrip()[:40]) for h in held) for p in prompts), domain
        assert not any(t.startswith(p.rstrip()) for p in prompts[:2] for t in train[:2000]), domain
    assert fid.heldout_prompts(args, "gsm8k")[0].endswith("\nAnswer:")
    assert fid.heldout_prompts(args, "alpaca-hard")[0].endswith("Response:")

    class A:
        ft_lr, ft_warmup, ft_min_lr_ratio = 3e-5, 0.1, 0.1

    assert fid.lr_at(9, 100, A, 2e-4) == pytest.approx(2e-4)  # a hard recipe's own peak lr


def test_report_marks_calibration_rows_with_agreement_columns_and_current_goals(fid, tmp_path, capsys):
    import math

    rows = {"base": 20.0, "finetune": 10.0, "scalar": 10.1, "row": 10.3, "col": 10.4, "auto": 10.2, "auto-2bit": 10.02}
    for model, ppl in rows.items():
        rec = _record("gsm8k-hard", model, ppl, 0.01, None if model in ("base", "finetune") else 17_000_000)
        rec["settings"].update(distill_lr_mode="relative", distill_lr=3e-2, calibration="self")
        rec["recovery"] = (math.log(20.0) - math.log(ppl)) / (math.log(20.0) - math.log(10.0))
        rec["greedy_agreement"] = {"exact_match": 0.42}
        rec["gsm8k"] = {"accuracy": 0.071}
        (tmp_path / f"gsm8k-hard__{model}.json").write_text(json.dumps(rec))
    assert fid.main(["--phase", "report", "--results", str(tmp_path), "--report-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| gsm8k-hard | auto (rel. lr 0.03, self cal.) | 10.200 | 97.1% | 0.01 | 90.0 | 42 | 7.1 |" in out
    assert "| gsm8k-hard | base | 20.000 | 0.0% | 0.01 | 90.0 | 42 | 7.1 |" in out
    goals = [line for line in out.splitlines() if "goals (rel. lr 0.03, self cal.)" in line]
    assert len(goals) == 1
    assert "1-bit ≥ 99%: best scalar 98.6% FAIL" in goals[0]
    assert "2-bit ≥ 99.5%: best auto-2bit 99.7% PASS" in goals[0]
    assert "auto ≥ best single − 0.2 pts: auto 97.1% vs scalar 98.6% (-1.4 pts) FAIL" in goals[0]


def test_the_evaluator_reports_the_suites_scores_under_the_benchmarks_fields(fid, tmp_path):
    """The benchmark measures nothing itself: each field is the library's measure with the benchmark's flags."""
    from benchmarks.fidelity.evaluator import Evaluator
    from bitdelta.evaluate import answer_accuracy, evaluate_tasks, fidelity, gsm8k_answer, perplexity
    from bitdelta.hf import load_model, load_tokenizer

    tiny = ROOT / "models" / "tiny"
    rows = [json.loads(line) for line in (tiny / "heldout" / "gsm8k.jsonl").read_text().splitlines()[:6]]
    data = tmp_path / "data"
    for folder in ("finetune", "eval", "tasks"):
        (data / folder).mkdir(parents=True)
    (data / "finetune" / "gsm8k_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = (tiny / "heldout" / "stdlib.txt").read_text()[:3000]
    (data / "eval" / "wikitext2_test.txt").write_text(text)
    (data / "tasks" / "arc_easy.jsonl").write_text("\n".join(json.dumps(
        {"query": f"Question: {r['question'][:60]}", "choices": ["yes", "no", "four"], "gold": i % 3})
        for i, r in enumerate(rows)) + "\n")
    args = fid.parse_args(["--phase", "eval", "--smoke", "--data", str(data), "--tasks", "arc_easy", "--device", "cpu",
                           "--work", str(tmp_path / "work")])
    tok, base, ft = load_tokenizer(tiny / "gsm8k"), load_model(tiny / "base", device="cpu"), load_model(tiny / "gsm8k")
    held = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows][: args.heldout_docs]
    ev = Evaluator(args, tok, ft, held, "gsm8k-hard")  # a hard pair is scored on its plain domain's data

    out = ev.run(base, "base")
    assert list(out) == ["fidelity", "greedy_agreement", "gsm8k", "wikitext", "tasks", "eval_times"]
    assert list(out["eval_times"]) == ["fidelity_s", "generation_s", "wikitext_s", "tasks_s"]
    assert out["fidelity"] == fidelity(base, ft, tok, held, max_length=64, batch_size=4, progress=False).to_dict()
    assert out["wikitext"] == perplexity(base, tok, text[:1500], window=64, stride=32, batch_size=2,
                                         progress=False).to_dict()
    assert out["gsm8k"] == answer_accuracy(base, tok, [f"Question: {r['question']}\nAnswer:" for r in rows[:3]],
                                           [r["answer"] for r in rows[:3]], extract=gsm8k_answer, max_new_tokens=8,
                                           batch_size=16)
    assert out["tasks"] == evaluate_tasks(base, tok, ["arc_easy"], data / "tasks", limit=4, batch_size=8,
                                          progress=False).to_dict()
    assert out["greedy_agreement"]["n_prompts"] == 3 and ev.text_chars == 1500

    ft_common = ev.run(ft, "finetune", with_fidelity=False)
    assert list(ft_common) == ["wikitext", "tasks", "eval_times"]
    assert list(ft_common["eval_times"]) == ["wikitext_s", "tasks_s"]
    ft_generation = ev.generation_scores(ft)
    assert ft_generation["greedy_agreement"]["exact_match"] == 1.0 and ft_generation["gsm8k"]["n"] == 3
    assert Evaluator(args, tok, ft, held).generation_scores(base) == {}  # no domain: no prompts, no GSM8K


@pytest.mark.skipif(not (SHARED / "finetune").is_dir(), reason="../shared/data not present")
def test_eval_quantized_base_and_quantized_finetune_rows(fid, tmp_path, capsys):
    """One eval call on the tiny pair (models/tiny base and its gsm8k fine-tune) makes the quantized
    rows: ``<s>-base`` is scalar's delta against, distilled on and scored on the quantized base;
    ``<s>-merged`` is the fine-tune quantized; all against the same fp32 fine-tune."""
    import math
    import shutil

    import torch

    from benchmarks.fidelity.data import heldout_docs
    from benchmarks.fidelity.evaluation import quantized_finetune
    from bitdelta.apply import apply, unapply
    from bitdelta.delta import Delta
    from bitdelta.errors import WrongBaseError
    from bitdelta.evaluate import fidelity
    from bitdelta.hf import load_model, load_tokenizer
    from bitdelta.quant import fake_quantize, quantizable_parameters

    work = tmp_path / "work"
    shutil.copytree(ROOT / "models" / "tiny" / "base", work / "base")
    ft_dir = work / "finetunes" / "gsm8k"
    shutil.copytree(ROOT / "models" / "tiny" / "gsm8k", ft_dir)
    argv = ["--smoke", "--domain", "gsm8k", "--work", str(work), "--data", str(SHARED), "--tasks", "arc_easy",
            "--device", "cpu"]
    quantized = ["int8-base", "fp8-base", "int8-merged", "fp8-merged"]
    assert fid.main(["--phase", "eval", *argv, "--variants", ",".join(["scalar", *quantized])]) == 0
    res = {m: json.loads((work / "results" / f"gsm8k__{m}.json").read_text())
           for m in ["base", "finetune", "scalar", *quantized]}

    args = fid.parse_args(["--phase", "eval", *argv])
    tok, ft = load_tokenizer(ft_dir), load_model(ft_dir, dtype="float32", device="cpu")
    held = heldout_docs(args, "gsm8k")

    def scored(model):  # the fidelity columns as the benchmark measures them (--smoke: 64 tokens, batch 4)
        return fidelity(model, ft, tok, held, max_length=64, batch_size=4, progress=False).to_dict()

    ppl_base, ppl_ft = res["base"]["heldout_ppl"], res["finetune"]["heldout_ppl"]
    arts = work / "artifacts" / "gsm8k"
    scalar = Delta.from_pretrained(arts / "scalar.bitdelta")
    float_base = load_model(work / "base", dtype="float32", device="cpu")
    assert scalar.info["compression"]["base_quantization"] is None
    for s in ("int8", "fp8"):
        row = res[f"{s}-base"]
        assert json.loads((arts / f"{s}-base.build.json").read_text())["base_quant"] == s
        assert row["base_quant"] == s and row["kind"] == "delta" and row["delta"]["weight_bytes"] > 0
        delta = Delta.from_pretrained(arts / f"{s}-base.bitdelta")
        assert delta.info["compression"]["base_quantization"]["scheme"] == s
        assert delta.info["distillation"]["steps"] == args.distill_steps
        # the fingerprint is the quantized base's: it refuses the fp32 base the scalar delta is made on
        assert delta.fingerprint.sha256 != scalar.fingerprint.sha256
        with pytest.raises(WrongBaseError, match="quantized"):
            apply(float_base, delta)
        q_base = load_model(work / "base", dtype="float32", device="cpu", base_quant=s)
        alone = scored(q_base)
        apply(q_base, delta)
        try:
            assert scored(q_base) == row["fidelity"]  # the row is this delta on the quantized base
        finally:
            unapply(q_base)
        # against the fp32 fine-tune and with the fp32 base's perplexity, as every row
        assert row["fidelity"]["ppl_teacher"] == ppl_ft
        expected = (math.log(ppl_base) - math.log(row["heldout_ppl"])) / (math.log(ppl_base) - math.log(ppl_ft))
        assert row["recovery"] == pytest.approx(expected)
        assert row["fidelity"]["kl"] < alone["kl"] / 2  # the delta closes most of the quantized base's gap

        merged = res[f"{s}-merged"]
        assert merged["finetune_quant"] == s and "delta" not in merged and merged["kind"] == "quantized-finetune"
        q_ft = quantized_finetune(ft_dir, s, "cpu")
        names = set(quantizable_parameters(ft))
        assert len(names) == 4 * 7  # every attention and MLP projection of the 4 layers; not the tied embedding
        for name, p in ft.named_parameters():
            want = fake_quantize(p.detach(), s) if name in names else p.detach()
            assert torch.equal(q_ft.get_parameter(name), want), name
        assert scored(q_ft) == merged["fidelity"]
        assert 0 < merged["fidelity"]["kl"] < res["base"]["fidelity"]["kl"]

    assert fid.main(["--phase", "report", "--results", str(work / "results"), "--report-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    models = [line.split(" | ")[1] for line in out.splitlines() if line.startswith("| gsm8k |")]
    assert models == ["base", "finetune", "scalar", *quantized]
    assert "| gsm8k | int8-merged |" in (tmp_path / "fidelity.md").read_text()
    for s in ("int8", "fp8"):
        assert f"{s} base + Δ within 1 pt of fp32 base + Δ: {s}-base " in out
