"""The main job on the bundled tiny models: compress each fine-tune, measure, generate.

For every fine-tune in models/tiny (a Shakespeare one and a grade-school-math one, both full
fine-tunes of the same tiny base), this script:
  1. compresses it against the base into a 1-bit delta artifact under outputs/;
  2. prints the artifact's size and compression factor (what `bitdelta inspect` shows);
  3. measures on the fine-tune's held-out domain text, with the fidelity suite
     (bitdelta.evaluate.suite): perplexity of the base, the fine-tune and base + delta, the
     recovery of the fine-tune's gain, KL, top-1 agreement, and greedy-generation agreement;
  4. generates a few lines from the base + delta for a domain prompt.

    python examples/quickstart.py [--scale row] [--bits 1] [--models models/tiny] [--out outputs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import bitdelta
from bitdelta.evaluate.suite import SuiteData, SuiteSettings, evaluate_delta
from bitdelta.hf import generate_text, load_model, load_tokenizer
from bitdelta.report import describe_artifact

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = {"shakespeare": "ROMEO:\n",
           "gsm8k": "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"}


def heldout_docs(models_dir: Path, name: str, limit: int) -> list[str]:
    folder = models_dir / "heldout"
    txt, jsonl = folder / f"{name}.txt", folder / f"{name}.jsonl"
    if jsonl.is_file():
        docs = []
        for line in jsonl.read_text().splitlines():
            row = json.loads(line)
            docs.append(row["text"] if "text" in row else f"Question: {row['question']}\nAnswer: {row['answer']}")
    else:
        # plain text: paragraphs (blank-line separated) grouped into ~1,000-character documents
        docs, buf = [], ""
        for para in txt.read_text().split("\n\n"):
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) > 1000:
                docs.append(buf)
                buf = ""
    return docs[:limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models" / "tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs")
    ap.add_argument("--scale", default="scalar", choices=["scalar", "row", "col"])
    ap.add_argument("--bits", type=int, default=1)
    ap.add_argument("--docs", type=int, default=40, help="held-out documents per domain")
    ap.add_argument("--prompts", type=int, default=8, help="prompts for greedy agreement with the fine-tune")
    args = ap.parse_args()
    torch.manual_seed(0)
    base_dir = args.models / "base"
    finetunes = [p.name for p in sorted(args.models.iterdir()) if (p / "config.json").is_file() and p.name != "base"]
    base = load_model(base_dir, device="cpu")
    rows = []
    for name in finetunes:
        ft_dir = args.models / name
        print(f"\n=== {name}: compress {ft_dir} against {base_dir} ===")
        delta = bitdelta.compress(base_dir, ft_dir, scale=args.scale, bits=args.bits)
        out = args.out / f"{name}.bitdelta"
        delta.save_pretrained(out)
        info = describe_artifact(out)
        print(f"wrote {out}: {info['artifact_bytes'] / 1e6:.2f} MB on disk "
              f"(weights {info['weight_bytes'] / 1e6:.2f} MB) vs {info['finetuned_fp16_bytes'] / 1e6:.2f} MB fp16 "
              f"fine-tune: {info['compression_factor']:.1f}x "
              f"({info['compression_factor_weights_only']:.1f}x weights only)")

        tok = load_tokenizer(out)
        docs = heldout_docs(args.models, name, args.docs)
        prompts = [PROMPTS.get(name, "The")] + [d[:80] for d in docs[: args.prompts - 1]]
        result = evaluate_delta(base, ft_dir, out, SuiteData(heldout=docs, prompts=prompts),
                                SuiteSettings(batch_size=8, agree_tokens=16), tokenizer=tok)
        bitdelta.apply(base, bitdelta.Delta.from_pretrained(out))
        text = generate_text(base, tok, PROMPTS.get(name, "The"), max_new_tokens=60, do_sample=True, temperature=0.7)
        bitdelta.unapply(base)
        rows.append((name, info, result))
        print(f"--- sample from base + {name} delta ---\n{PROMPTS.get(name, 'The')}{text}\n")

    print(f"\n{'fine-tune':<12} {'delta MB':>9} {'factor':>7} {'ppl base':>9} {'ppl ft':>8} {'ppl delta':>10} "
          f"{'recovery':>9} {'KL':>7} {'top-1':>6} {'greedy':>7}")
    for name, info, r in rows:
        print(f"{name:<12} {info['artifact_bytes'] / 1e6:>9.2f} {info['compression_factor']:>6.1f}x "
              f"{r.base.heldout_ppl:>9.2f} {r.finetuned.heldout_ppl:>8.2f} {r.delta.heldout_ppl:>10.2f} "
              f"{r.recovery:>8.1%} {r.fidelity.kl:>7.4f} {r.fidelity.top1_agreement:>6.1%} "
              f"{r.greedy_agreement.exact_match:>6.1%}")
    print(f"\nArtifacts are in {args.out}/. Try: bitdelta inspect {args.out}/{finetunes[0]}.bitdelta")


if __name__ == "__main__":
    main()
