"""Calibration text for scale distillation: load, tokenize, cut into fixed-length samples, split.

Sources: a local ``.jsonl`` (one object per line with a ``text`` field, or ``question``/``answer``,
or ``instruction``/``input``/``output``), a ``.txt`` file (documents separated by blank lines), or,
where the network allows, a Hugging Face ``datasets`` name (``allenai/c4:en``). Samples are taken
as the paper does for C4: documents are tokenized and cut into ``seq_len``-token samples, shorter
ones padded (padding is masked out of every loss).

    cal = load_calibration("calibration.jsonl", tokenizer, num_samples=800, seq_len=128, heldout=64)
    cal.train.input_ids, cal.train.attention_mask     # [800, 128] each
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BitDeltaError


@dataclass
class TokenBatches:
    input_ids: torch.Tensor  # [N, L] int64
    attention_mask: torch.Tensor  # [N, L] int64, 0 on padding

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[index], self.attention_mask[index]


@dataclass
class Calibration:
    train: TokenBatches
    heldout: TokenBatches
    source: str


def _row_text(row: dict) -> str:
    if "text" in row:
        return str(row["text"])
    if "question" in row and "answer" in row:
        return f"Question: {row['question']}\nAnswer: {row['answer']}"
    if "instruction" in row:
        parts = [row.get("instruction", ""), row.get("input", ""), row.get("output", "")]
        return "\n".join(p for p in parts if p)
    raise BitDeltaError(f"calibration rows need a 'text' field (or question/answer); got keys {sorted(row)}")


def read_texts(source: str) -> list[str]:
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        texts.append(_row_text(json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise BitDeltaError(f"{path}:{i + 1} is not valid JSON ({e})") from None
            return texts
        if path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            return [_row_text(r) for r in rows]
        return [t for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if path.suffix in (".jsonl", ".json", ".txt") or path.parent != Path("."):
        raise BitDeltaError(f"calibration file {source} does not exist")
    try:
        import datasets
    except ImportError:
        raise BitDeltaError(f"{source} is not a file, and the `datasets` package is not installed to fetch it") from None
    name, _, config = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        return [r["text"] for _, r in zip(range(20000), ds)]
    except Exception as e:  # the hub client raises many types
        raise BitDeltaError(f"could not load calibration dataset {source!r}: {e}") from None


def tokenize_samples(texts: list[str], tokenizer, num_samples: int, seq_len: int, seed: int) -> TokenBatches:
    """One ``seq_len`` window from each of ``num_samples`` randomly chosen documents (with BOS when
    the tokenizer adds one); short documents are right-padded and masked."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids, masks = [], []
    for i in order:
        toks = tokenizer(texts[i], add_special_tokens=True)["input_ids"]
        if len(toks) < 2:
            continue
        if len(toks) > seq_len:
            start = rng.randrange(0, len(toks) - seq_len + 1)
            toks = toks[start:start + seq_len]
        n = len(toks)
        ids.append(toks + [pad] * (seq_len - n))
        masks.append([1] * n + [0] * (seq_len - n))
        if len(ids) == num_samples:
            break
    if not ids:
        raise BitDeltaError("no calibration document has at least 2 tokens")
    return TokenBatches(torch.tensor(ids, dtype=torch.long), torch.tensor(masks, dtype=torch.long))


def load_calibration(source: str, tokenizer, num_samples: int = 800, seq_len: int = 128, heldout: int = 64,
                     seed: int = 0) -> Calibration:
    """Train and held-out samples from disjoint documents of ``source``."""
    texts = read_texts(source)
    if len(texts) < 2:
        raise BitDeltaError(f"{source} has {len(texts)} documents; calibration needs at least 2")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    n_held = min(max(1, heldout), len(texts) // 2) if heldout else 0
    held_texts = [texts[i] for i in order[:n_held]]
    train_texts = [texts[i] for i in order[n_held:]]
    train = tokenize_samples(train_texts, tokenizer, num_samples, seq_len, seed)
    held = tokenize_samples(held_texts, tokenizer, heldout, seq_len, seed + 1) if n_held else TokenBatches(
        torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.long))
    return Calibration(train, held, str(source))
