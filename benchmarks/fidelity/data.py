"""The benchmark's text: each domain's training and held-out documents (never overlapping), held-out
prompts for greedy agreement, packed training blocks, calibration samples, and where the GSM8K test
questions and WikiText-2 are.

    train, held = domain_docs(data, "gsm8k")
    blocks = pack_blocks(tokenizer, train, seq_len=512, seed=0)     # [n, 512] token ids
    cal = calibration(args, tokenizer, "gsm8k", ft)                  # of the kind --calibration names
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from bitdelta.calibration import Calibration, read_texts, self_calibration, tokenize_samples

ALPACA_HELDOUT = 250  # last items of alpaca_5000.json
SHAKESPEARE_HELDOUT = 0.05  # last fraction of the plays
DOC_CHARS = 2000  # Shakespeare is cut into documents of about this many characters
PROMPT_CHARS = 300  # a Shakespeare agreement prompt: about this much of a held-out document


def data_domain(domain: str) -> str:
    """The dataset a domain is fine-tuned on (a hard pair uses its plain domain's data)."""
    return domain.removesuffix("-hard")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _gsm8k_doc(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer: {row['answer']}"


def _alpaca_doc(row: dict) -> str:
    parts = [f"Instruction: {row['instruction']}"]
    if row.get("input"):
        parts.append(f"Input: {row['input']}")
    parts.append(f"Response: {row['output']}")
    return "\n".join(parts)


def _chunks(text: str, size: int) -> list[str]:
    """Consecutive blank-line-separated paragraphs (speeches) grouped into ~``size``-char documents."""
    docs, cur = [], []
    length = 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        cur.append(para)
        length += len(para) + 2
        if length >= size:
            docs.append("\n\n".join(cur))
            cur, length = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def domain_docs(data: Path, domain: str) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents) of one domain; the two never overlap."""
    ft = data / "finetune"
    domain = data_domain(domain)
    if domain == "gsm8k":
        return ([_gsm8k_doc(r) for r in _jsonl(ft / "gsm8k_train.jsonl")],
                [_gsm8k_doc(r) for r in _jsonl(ft / "gsm8k_test.jsonl")])
    if domain == "alpaca":
        docs = [_alpaca_doc(r) for r in json.loads((ft / "alpaca_5000.json").read_text(encoding="utf-8"))]
        return docs[:-ALPACA_HELDOUT], docs[-ALPACA_HELDOUT:]
    text = (ft / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - SHAKESPEARE_HELDOUT)))  # at a speech boundary
    return _chunks(text[:cut], DOC_CHARS), _chunks(text[cut:], DOC_CHARS)


def heldout_docs(args, domain: str) -> list[str]:
    return domain_docs(args.data, domain)[1][: args.heldout_docs]


def heldout_prompts(args, domain: str) -> list[str]:
    """Held-out prompts for greedy agreement: GSM8K questions up to "Answer:", Alpaca instructions up to
    "Response:", Shakespeare the opening of a held-out passage cut at a line end, where the fine-tune
    goes on in its own words."""
    data = args.data / "finetune"
    n = args.agree_prompts
    name = data_domain(domain)
    if name == "gsm8k":
        return [f"Question: {r['question']}\nAnswer:" for r in _jsonl(data / "gsm8k_test.jsonl")[:n]]
    if name == "alpaca":
        rows = json.loads((data / "alpaca_5000.json").read_text(encoding="utf-8"))[-ALPACA_HELDOUT:][:n]
        return [_alpaca_doc({**r, "output": ""}).rstrip() for r in rows]
    out = []
    for doc in domain_docs(args.data, domain)[1][:n]:
        cut = doc.rfind("\n", 0, PROMPT_CHARS)
        out.append(doc[: cut + 1 if cut > 0 else PROMPT_CHARS])
    return out


def gsm8k_test_file(args) -> Path:
    """The GSM8K test questions and answers (answer accuracy on GSM8K domains)."""
    return args.data / "finetune" / "gsm8k_test.jsonl"


def pack_blocks(tokenizer, docs: list[str], seq_len: int, seed: int) -> torch.Tensor:
    """Documents in a seeded order, each tokenized as the tokenizer does by default (BOS if it adds
    one) and ended with EOS, concatenated and cut into ``seq_len`` blocks (the tail is dropped)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    encoded = tokenizer([docs[i] for i in order])["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in encoded:
        stream += list(ids) + ([eos] if eos is not None else [])
    n = len(stream) // seq_len
    if n == 0:
        raise SystemExit(f"only {len(stream)} training tokens: fewer than one {seq_len}-token block")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration(args, tokenizer, domain: str | None = None, ft=None) -> Calibration:
    """Calibration samples of the kind ``--calibration`` names (see the package docstring); the paper's
    (generic) samples from calibration.jsonl with the held-out split from validation.jsonl."""
    cal_dir = args.data / "calibration"
    if args.calibration == "self":
        if ft is None:
            raise SystemExit("--calibration self needs the fine-tune")
        return self_calibration(ft, tokenizer, str(cal_dir / "calibration.jsonl"), num_samples=args.cal_samples,
                                seq_len=args.cal_seq_len, heldout=args.cal_heldout, seed=args.seed,
                                batch_size=max(8, args.eval_batch * 4))
    if args.calibration == "domain":
        if domain is None:
            raise SystemExit("--calibration domain needs a domain")
        return domain_calibration(args, tokenizer, domain)
    train = tokenize_samples(read_texts(str(cal_dir / "calibration.jsonl")), tokenizer, args.cal_samples,
                             args.cal_seq_len, args.seed)
    held = tokenize_samples(read_texts(str(cal_dir / "validation.jsonl")), tokenizer, args.cal_heldout,
                            args.cal_seq_len, args.seed + 1)
    return Calibration(train, held, str(cal_dir / "calibration.jsonl"))


def domain_calibration(args, tokenizer, domain: str) -> Calibration:
    """The domain's training documents, shuffled (seeded): held-out samples from the first, training
    samples from the rest."""
    docs = domain_docs(args.data, domain)[0]
    order = list(range(len(docs)))
    random.Random(args.seed).shuffle(order)
    n_held = min(args.cal_heldout, len(docs) // 2)
    held = tokenize_samples([docs[i] for i in order[:n_held]], tokenizer, args.cal_heldout, args.cal_seq_len,
                            args.seed + 1)
    train = tokenize_samples([docs[i] for i in order[n_held:]], tokenizer, args.cal_samples, args.cal_seq_len,
                             args.seed)
    return Calibration(train, held, f"{domain} training documents")


def wikitext_file(args) -> Path:
    """WikiText-2's test text (scored up to ``--wikitext-chars`` characters)."""
    return args.data / "eval" / "wikitext2_test.txt"
