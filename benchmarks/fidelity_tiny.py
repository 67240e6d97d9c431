"""Fidelity grid on the bundled tiny fine-tunes (CPU, minutes): scale modes x lr modes x calibration text.

The models are ``models/tiny``: a 1 M-parameter Llama base pretrained from scratch and two full
fine-tunes of it (Shakespeare, GSM8K). Toy models: what they show is how the settings compare on real
(if small) full fine-tunes, not what a real pair will reach; docs/benchmarks.md has the real-pair table.

For each domain, learning-rate mode (the paper's absolute 1e-4, relative 3e-2) and calibration source
(``generic``: Python docstrings, ``models/tiny/heldout/stdlib.txt``, the text docs/distillation.md
uses; ``self``: samples the fine-tune generates from the first sentences of that same generic text;
``domain``: the fine-tune's own training text from ../shared/data/finetune), it distils 1-bit scalar,
row and col scales and builds both ``auto`` choices from them:

  auto-old   row or col per module by the distillation loss (MSE) on the held-out split (``choose_auto``)
  auto       scalar, row or col per module by KL on the held-out split (``choose_modes``, what
             ``--scale auto`` runs now)

Every model is scored on held-out domain text (``models/tiny/heldout``): perplexity, recovery
((log ppl_base - log ppl_delta) / (log ppl_base - log ppl_ft), as docs/distillation.md), KL(ft || model),
top-1 agreement, and greedy-generation agreement with the fine-tune (exact match of the first 32
generated tokens, and the mean number of leading tokens that agree) on held-out prompts.

    .venv/bin/python benchmarks/fidelity_tiny.py --out /tmp/fid_tiny.json          # the whole grid
    .venv/bin/python benchmarks/fidelity_tiny.py --domains gsm8k --lrs relative --calibrations self --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root (for benchmarks._common) and src/ on the path
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]

import torch

import bitdelta
from benchmarks._common import run_and_save
from bitdelta.calibration import load_calibration, read_texts, self_calibration
from bitdelta.distill import TeacherLogits, choose_auto, choose_modes, distill_scales
from bitdelta.evaluate import fidelity, greedy_agreement, greedy_generations, recovery
from bitdelta.hf import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny"
LRS = {"absolute": 1e-4, "relative": 3e-2}
CALIBRATIONS = ("generic", "self", "domain")
VARIANTS = ("scalar", "row", "col", "auto-old", "auto")
# The fine-tune slice of tinyshakespeare.txt (models/tiny/README.md): [200,377, 1,065,437).
SHAKESPEARE_FT = (200_377, 1_065_437)

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="shakespeare,gsm8k")
    ap.add_argument("--lrs", default="absolute,relative",
                    help="comma-separated lr modes (absolute = 1e-4, relative = 3e-2)")
    ap.add_argument("--calibrations", default=",".join(CALIBRATIONS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=32, help="held-out calibration samples (guard, auto's choice)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts for greedy agreement")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-gains", default="",
                    help="also build auto with these min_gain values (comma-separated), as 'auto@GAIN' rows")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="shared data (domain calibration)")
    ap.add_argument("--out", default=None, help="write every result as JSON here")
    return ap.parse_args(argv)


def heldout_docs(domain: str) -> list[str]:
    return read_texts(str(TINY / "heldout" / ("shakespeare.txt" if domain == "shakespeare" else "gsm8k.jsonl")))


def heldout_prompts(domain: str, n: int) -> list[str]:
    """GSM8K: the held-out questions in the training layout, up to ``Answer:``; Shakespeare: a held-out
    speech and the next speaker's name, after which the fine-tune writes that speech (a speech alone
    ends the document: both models would just emit EOS)."""
    if domain == "gsm8k":
        rows = [json.loads(line) for line in (TINY / "heldout" / "gsm8k.jsonl").read_text().splitlines()
                if line.strip()]
        return [f"Question: {r['question']}\nAnswer:" for r in rows[:n]]
    docs = heldout_docs(domain)
    return [docs[i].rstrip() + "\n\n" + docs[i + 1].split("\n", 1)[0] + "\n" for i in range(min(n, len(docs) - 1))]


def domain_source(domain: str, data: Path, tmp: Path) -> str | None:
    """The fine-tune's own training text, as a calibration file (None when the shared data is absent)."""
    if domain == "gsm8k":
        path = data / "finetune" / "gsm8k_train.jsonl"
        return str(path) if path.is_file() else None
    src = data / "finetune" / "tinyshakespeare.txt"
    if not src.is_file():
        return None
    out = tmp / "shakespeare_ft.txt"
    out.write_text(src.read_text(encoding="utf-8")[SHAKESPEARE_FT[0]:SHAKESPEARE_FT[1]], encoding="utf-8")
    return str(out)


def score(model, ft, tok, docs, prompts, reference, ppl_base, ppl_ft, gen_tokens) -> dict:
    fid = fidelity(model, ft, tok, docs, max_length=256, batch_size=16, progress=False)
    agree = greedy_agreement(model, None, tok, prompts, max_new_tokens=gen_tokens, reference=reference,
                             max_prompt_tokens=96)
    return {"ppl": fid.ppl_student, "recovery": recovery(ppl_base, ppl_ft, fid.ppl_student), "kl": fid.kl,
            "top1": fid.top1_agreement, "exact_match": agree.exact_match, "prefix_tokens": agree.mean_prefix_tokens}


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="fid_tiny_"))
    for domain in args.domains.split(","):
        base_dir, ft_dir = str(TINY / "base"), str(TINY / domain)
        tok = load_tokenizer(ft_dir)
        base, ft = load_model(base_dir, device="cpu"), load_model(ft_dir, device="cpu")
        docs, prompts = heldout_docs(domain), heldout_prompts(domain, args.prompts)
        reference = greedy_generations(ft, tok, prompts, args.gen_tokens, max_prompt_tokens=96)
        ref_fid = fidelity(base, ft, tok, docs, max_length=256, batch_size=16, progress=False)
        ppl_base, ppl_ft = ref_fid.ppl_student, ref_fid.ppl_teacher
        log(f"{domain}: {len(docs)} held-out docs, {ref_fid.n_tokens} tokens; ppl base {ppl_base:.2f}, ft {ppl_ft:.2f}")
        common = {"domain": domain, "ppl_base": ppl_base, "ppl_ft": ppl_ft, "n_tokens": ref_fid.n_tokens}
        initial = {m: bitdelta.compress(base_dir, ft_dir, scale=m, progress=False) for m in ("scalar", "row", "col")}
        for name, model_delta in (("base", None), ("scalar-initial", initial["scalar"])):
            if model_delta is not None:
                bitdelta.apply(base, model_delta)
            try:
                r = score(base, ft, tok, docs, prompts, reference, ppl_base, ppl_ft, args.gen_tokens)
            finally:
                if model_delta is not None:
                    bitdelta.unapply(base)
            results.append({**common, "variant": name, "lr_mode": None, "calibration": None, **r})
            log(f"  {name}: recovery {r['recovery']:.1%} KL {r['kl']:.4f} exact {r['exact_match']:.2f}")
        for cal_name in args.calibrations.split(","):
            t = time.perf_counter()
            if cal_name == "generic":
                cal = load_calibration(str(TINY / "heldout" / "stdlib.txt"), tok, num_samples=args.num_samples,
                                       seq_len=args.seq_len, heldout=args.heldout, seed=args.seed)
            elif cal_name == "self":
                cal = self_calibration(ft, tok, str(TINY / "heldout" / "stdlib.txt"), num_samples=args.num_samples,
                                       seq_len=args.seq_len, heldout=args.heldout, seed=args.seed)
            else:
                source = domain_source(domain, Path(args.data), tmp)
                if source is None:
                    log(f"  domain calibration skipped: no {args.data}/finetune")
                    continue
                cal = load_calibration(source, tok, num_samples=args.num_samples, seq_len=args.seq_len,
                                       heldout=args.heldout, seed=args.seed)
            log(f"  calibration {cal_name}: {len(cal.train)}+{len(cal.heldout)} samples "
                f"({time.perf_counter() - t:.1f}s)")
            for lr_mode in args.lrs.split(","):
                lr = LRS[lr_mode]
                distilled, secs = {}, {}
                for mode in ("scalar", "row", "col"):
                    t = time.perf_counter()
                    distilled[mode] = distill_scales(initial[mode], base, ft, cal, steps=args.steps, lr=lr,
                                                     lr_mode=lr_mode, batch_size=args.batch, seed=args.seed,
                                                     progress=False)
                    secs[mode] = time.perf_counter() - t
                t = time.perf_counter()
                distilled["auto-old"] = choose_auto(distilled["row"], distilled["col"], base, TeacherLogits(model=ft),
                                                    cal.heldout, loss="mse", progress=False)
                secs["auto-old"] = secs["row"] + secs["col"] + time.perf_counter() - t
                t = time.perf_counter()
                distilled["auto"] = choose_modes({m: distilled[m] for m in ("scalar", "row", "col")}, base,
                                                 TeacherLogits(model=ft), cal.heldout, progress=False)
                secs["auto"] = secs["scalar"] + secs["row"] + secs["col"] + time.perf_counter() - t
                extra = []
                for gain in [float(g) for g in args.extra_gains.split(",") if g]:
                    name = f"auto@{gain:g}"
                    distilled[name] = choose_modes({m: distilled[m] for m in ("scalar", "row", "col")}, base,
                                                   TeacherLogits(model=ft), cal.heldout, min_gain=gain, progress=False)
                    secs[name] = secs["auto"]
                    extra.append(name)
                for variant in (*VARIANTS, *extra):
                    d = distilled[variant]
                    bitdelta.apply(base, d)
                    try:
                        r = score(base, ft, tok, docs, prompts, reference, ppl_base, ppl_ft, args.gen_tokens)
                    finally:
                        bitdelta.unapply(base)
                    info = d.info.get("distillation") or {}
                    auto = info.get("auto") or {}
                    rec = {**common, "variant": variant, "lr_mode": lr_mode, "lr": lr, "calibration": cal_name, **r,
                           "kept": info.get("kept"), "seconds": round(secs[variant], 1),
                           "modes": {k: v for k, v in auto.items() if k.endswith("_modules")} or None}
                    results.append(rec)
                    log(f"  {cal_name}/{lr_mode}/{variant}: recovery {r['recovery']:.1%} KL {r['kl']:.4f} "
                        f"top-1 {r['top1']:.3f} exact {r['exact_match']:.2f} prefix {r['prefix_tokens']:.1f}"
                        + (f" modes {rec['modes']}" if rec["modes"] else ""))
    return results


def table(results: list[dict]) -> str:
    head = ["domain", "calibration", "lr", "variant", "held-out ppl", "recovery", "KL(ft‖·)", "top-1",
            "greedy exact (32 tok)", "agreeing prefix", "modes (auto)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lr = "–" if r["lr_mode"] is None else f"{r['lr_mode']} {r['lr']:g}"
        modes = "–" if not r.get("modes") else ", ".join(f"{v} {k.split('_')[0]}" for k, v in r["modes"].items())
        lines.append("| " + " | ".join([
            r["domain"], r["calibration"] or "–", lr, r["variant"], f"{r['ppl']:.2f}", f"{100 * r['recovery']:.1f}%",
            f"{r['kl']:.4f}", f"{100 * r['top1']:.1f}%", f"{100 * r['exact_match']:.0f}%",
            f"{r['prefix_tokens']:.1f}", modes]) + " |")
    return "\n".join(lines)


def auto_check(results: list[dict]) -> list[str]:
    """For every (domain, calibration, lr): auto and auto-old against the best single mode (recovery points)."""
    out = []
    groups = {}
    for r in results:
        if r["lr_mode"] is not None:
            groups.setdefault((r["domain"], r["calibration"], r["lr_mode"]), {})[r["variant"]] = r["recovery"]
    for (domain, cal, lr), rec in groups.items():
        single = {m: rec[m] for m in ("scalar", "row", "col") if m in rec}
        best = max(single, key=single.get)
        gap = 100 * (rec["auto"] - single[best])
        old = 100 * (rec["auto-old"] - single[best])
        out.append(f"{domain} / {cal} / {lr}: best single {best} {100 * single[best]:.1f}%, "
                   f"auto {100 * rec['auto']:.1f}% ({gap:+.1f} pts{'' if gap >= -0.2 else ', BELOW best - 0.2'}), "
                   f"auto-old {100 * rec['auto-old']:.1f}% ({old:+.1f} pts)")
    return out


def main(argv=None) -> int:
    results = run_and_save(argv, parse_args, run)
    print(table(results))
    print()
    print("\n".join(auto_check(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
