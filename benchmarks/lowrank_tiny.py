"""Beyond one bit, on the CPU: 1 bit, 2 bits, and 1 bit + a low-rank correction at the bytes of 2 bits.

Three pairs: the bundled tiny fine-tunes (``models/tiny``: GSM8K and Shakespeare, full fine-tunes of a
1 M-parameter Llama) and a synthetic "hard" pair: a random Llama (hidden 256, 4 layers, ~4 M
parameters, the tiny tokenizer) whose fine-tune moves every matrix by a strong rank-``--hard-rank``
component plus noise, the delta shape one sign plane per matrix serves worst (most of Δ's energy in a
few directions that scales shared by a whole row or matrix cannot follow).

Each variant is scored on held-out text (``models/tiny/heldout``; for the hard pair, whose models
are random, text the fine-tune samples itself, on which it is far better than the base) as
docs/distillation.md scores recipes: recovery ((log ppl_base − log ppl) / (log ppl_base −
log ppl_ft)), KL(ft ‖ model) and top-1 agreement with the fine-tune, with the initial scales and after
a short scale distillation (the default recipe's relative lr, on the stdlib docstrings). ``bytes`` is
what the delta's compressed matrices store (signs, scales, low-rank factors): the low-rank budget of 1.0
buys as many bytes as the second sign plane.

    .venv/bin/python benchmarks/lowrank_tiny.py --out /tmp/lowrank_tiny.json
    .venv/bin/python benchmarks/lowrank_tiny.py --pairs hard --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root and src/ on the path
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]

import torch

import bitdelta
from benchmarks._common import run_and_save
from bitdelta.calibration import load_calibration, read_texts
from bitdelta.distill import distill_scales
from bitdelta.evaluate import fidelity, recovery
from bitdelta.hf import load_model, load_tokenizer
from bitdelta.recipes import get_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny"
PAIRS = ("gsm8k", "shakespeare", "hard")
VARIANTS = {  # name -> CompressConfig fields over the default recipe's
    "1 bit": {},
    "2 bits": {"bits": 2},
    "1 bit + low-rank (budget 1.0)": {"lowrank_budget": 1.0},
}

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--steps", type=int, default=30, help="distillation steps (short: a comparison, not a recipe)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hard-rank", type=int, default=8, help="rank of the hard pair's strong delta component")
    ap.add_argument("--max-docs", type=int, default=64, help="held-out documents scored per pair")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write every result as JSON here")
    return ap.parse_args(argv)


@torch.no_grad()
def make_hard_pair(out: Path, rank: int, seed: int) -> tuple[str, str]:
    """A random Llama on the tiny tokenizer and a fine-tune of it: each matrix moved by ``L + N``, a
    rank-``rank`` part ``L`` with 0.3 of the matrix's norm and noise ``N`` with 0.05 of it."""
    import transformers

    tok = load_tokenizer(str(TINY / "base"))
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                   tie_word_embeddings=True, initializer_range=0.1, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ft = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ft.load_state_dict(base.state_dict())
    for name, p in ft.named_parameters():
        if p.dim() != 2 or "embed" in name:
            continue
        strong = torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g)
        noise = torch.randn(p.shape, generator=g)
        p.add_(0.3 * p.norm() * strong / strong.norm() + 0.05 * p.norm() * noise / noise.norm())
    dirs = (out / "hard-base", out / "hard-ft")
    for model, d in zip((base, ft), dirs):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    return str(dirs[0]), str(dirs[1])


def heldout_docs(pair: str, max_docs: int, ft=None, tok=None, seed: int = 0) -> list[str]:
    if pair != "hard":
        name = {"gsm8k": "gsm8k.jsonl", "shakespeare": "shakespeare.txt"}[pair]
        return read_texts(str(TINY / "heldout" / name))[:max_docs]
    return sampled_docs(ft, tok, max_docs, seed)


@torch.no_grad()
def sampled_docs(ft, tok, n: int, seed: int, tokens: int = 128) -> list[str]:
    """``n`` documents the fine-tune samples at temperature 1 from a BOS token (seeded)."""
    torch.manual_seed(seed)
    start = torch.full((n, 1), tok.bos_token_id, dtype=torch.long)
    out = ft.generate(start, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=tokens, min_new_tokens=tokens,
                      pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, 1:], skip_special_tokens=True)


def stored_bytes(delta) -> int:
    """Bytes of the compressed matrices' tensors: sign planes, scales, low-rank factors."""
    return sum(m.nbytes() for m in delta.modules.values())


def score(model, ft, tok, docs, ppl_base, ppl_ft) -> dict:
    fid = fidelity(model, ft, tok, docs, max_length=256, batch_size=16, progress=False)
    return {"ppl": fid.ppl_student, "recovery": recovery(ppl_base, ppl_ft, fid.ppl_student), "kl": fid.kl,
            "top1": fid.top1_agreement}


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="lowrank_tiny_"))
    recipe = get_recipe("default")
    distill_cfg = dataclasses.replace(recipe.distill, steps=args.steps, batch_size=args.batch, seed=args.seed)
    results = []
    for pair in args.pairs.split(","):
        base_dir, ft_dir = (make_hard_pair(tmp, args.hard_rank, args.seed) if pair == "hard"
                            else (str(TINY / "base"), str(TINY / pair)))
        tok = load_tokenizer(ft_dir)
        base, ft = load_model(base_dir, device="cpu"), load_model(ft_dir, device="cpu")
        docs = heldout_docs(pair, args.max_docs, ft, tok, args.seed)
        ref = fidelity(base, ft, tok, docs, max_length=256, batch_size=16, progress=False)
        ppl_base, ppl_ft = ref.ppl_student, ref.ppl_teacher
        log(f"{pair}: {len(docs)} docs, {ref.n_tokens} tokens; ppl base {ppl_base:.2f}, ft {ppl_ft:.2f}")
        cal = load_calibration(str(TINY / "heldout" / "stdlib.txt"), tok, num_samples=args.num_samples,
                               seq_len=args.seq_len, heldout=16, seed=args.seed)
        for variant, fields in VARIANTS.items():
            delta = bitdelta.compress(base_dir, ft_dir, dataclasses.replace(recipe.compress, **fields), progress=False)
            t = time.perf_counter()
            distilled = distill_scales(delta, base, ft, cal, distill_cfg, progress=False)
            seconds = time.perf_counter() - t
            for distill, d in (("no", delta), (f"{args.steps} steps", distilled)):
                bitdelta.apply(base, d)
                try:
                    r = score(base, ft, tok, docs, ppl_base, ppl_ft)
                finally:
                    bitdelta.unapply(base)
                lowrank = (d.info.get("compression") or {}).get("lowrank") or {}
                rec = {"pair": pair, "variant": variant, "distill": distill, "bytes": stored_bytes(d),
                       "lowrank_modules": lowrank.get("modules"), "ppl_base": ppl_base, "ppl_ft": ppl_ft, **r,
                       "distill_seconds": round(seconds, 1) if d is distilled else None}
                results.append(rec)
                log(f"  {variant} / distill {distill}: recovery {r['recovery']:.1%} KL {r['kl']:.4f} "
                    f"top-1 {r['top1']:.3f} bytes {rec['bytes']:,}")
    return results


def table(results: list[dict]) -> str:
    head = ["pair", "variant", "distilled", "bytes", "held-out ppl", "recovery", "KL(ft‖·)", "top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([r["pair"], r["variant"], r["distill"], f"{r['bytes']:,}", f"{r['ppl']:.2f}",
                                        f"{100 * r['recovery']:.1f}%", f"{r['kl']:.4f}",
                                        f"{100 * r['top1']:.1f}%"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    results = run_and_save(argv, parse_args, run)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
