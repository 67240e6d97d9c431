"""Calibration text for scale distillation: load, tokenize, cut into fixed-length samples, split.

Sources: a local ``.jsonl`` (one object per line with a ``text`` field, or ``question``/``answer``,
or ``instruction``/``input``/``output``), a ``.txt`` file (documents separated by blank lines), or,
where the network allows, a Hugging Face ``datasets`` name (``allenai/c4:en``). Samples are taken
as the paper does for C4: documents are tokenized and cut into ``seq_len``-token samples, shorter
ones padded (padding is masked out of every loss).

``self_calibration`` needs no data from the user: it samples the calibration text from the
fine-tune itself (seeded, temperature 1), so distillation fits the scales on the fine-tune's own
distribution instead of on generic text. Each sample starts from a short prompt (the first
sentence of a generic document, or one of ``DEFAULT_PROMPTS``), put through the fine-tune's chat
template when it has one (instruct models answer as they were trained to), given as plain text
otherwise. Train and held-out samples come from disjoint prompts.

    cal = load_calibration("calibration.jsonl", tokenizer, num_samples=800, seq_len=128, heldout=64)
    cal.train.input_ids, cal.train.attention_mask     # [800, 128] each
    cal = self_calibration(finetuned_model, tokenizer, num_samples=800, seq_len=128, heldout=32)
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import BitDeltaError
from .hf_cache import cache_argument, cache_of


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
        raise BitDeltaError(f"{source} is not a file, and the `datasets` package is not installed to fetch it"
                            ) from None
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


def _split_heldout(items: list, heldout: int, seed: int) -> tuple[list, list]:
    """(held-out, train): a seeded shuffle of ``items`` split into disjoint parts, at most half held out
    (at least one item when ``heldout`` > 0, none when it is 0)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = min(max(1, heldout), len(items) // 2) if heldout else 0
    return [items[i] for i in order[:n_held]], [items[i] for i in order[n_held:]]


def load_calibration(source: str, tokenizer, num_samples: int = 800, seq_len: int = 128, heldout: int = 64,
                     seed: int = 0) -> Calibration:
    """Train and held-out samples from disjoint documents of ``source``."""
    texts = read_texts(source)
    if len(texts) < 2:
        raise BitDeltaError(f"{source} has {len(texts)} documents; calibration needs at least 2")
    held_texts, train_texts = _split_heldout(texts, heldout, seed)
    n_held = len(held_texts)
    train = tokenize_samples(train_texts, tokenizer, num_samples, seq_len, seed)
    held = tokenize_samples(held_texts, tokenizer, heldout, seq_len, seed + 1) if n_held else TokenBatches(
        torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.long))
    return Calibration(train, held, str(source))


# Generic openings for self-calibration when no prompt source is given: everyday requests of many
# kinds (an instruct model answers them through its chat template; a plain LM continues them).
DEFAULT_PROMPTS = (
    "Tell me about the history of the bicycle.",
    "How does a refrigerator keep food cold?",
    "Write a short story about a lighthouse keeper.",
    "What are good habits for learning a new language?",
    "Explain how interest on a loan is calculated.",
    "Describe a walk through a busy market.",
    "Why is the sky blue?",
    "Give three tips for writing a clear email.",
    "What happens when water boils?",
    "Summarise the rules of chess.",
    "A farmer has some fields and some animals.",
    "Write a letter to a friend about a recent trip.",
    "How do plants make their food?",
    "Explain the difference between weather and climate.",
    "What should I pack for a week of camping?",
    "Describe how a bill becomes a law.",
    "Tell me a joke about computers.",
    "How many minutes are there in a week?",
    "What makes a good teacher?",
    "Explain what a function is in programming.",
    "Write a poem about the sea.",
    "How do vaccines work?",
    "What are the main causes of traffic jams?",
    "Describe the life cycle of a butterfly.",
    "Plan a simple dinner for four people.",
    "Why do we have seasons?",
    "The old house at the end of the street",
    "In the morning, the village was quiet",
    "The results of the experiment showed",
    "She opened the letter and read",
    "There are many ways to solve this problem",
    "The king called his council together",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def first_sentence(text: str, max_chars: int = 200) -> str:
    """The opening sentence of ``text`` (at most ``max_chars`` characters, cut at a space)."""
    text = " ".join(text.split())
    head = _SENTENCE_END.split(text, 1)[0]
    if len(head) > max_chars:
        head = head[:max_chars].rsplit(" ", 1)[0]
    return head


def prompts_from_texts(texts: list[str], max_chars: int = 200) -> list[str]:
    """Distinct, non-empty first sentences of ``texts``, in order."""
    seen, out = set(), []
    for t in texts:
        p = first_sentence(t, max_chars)
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], seq_len: int, seed: int, batch_size: int = 32,
                     temperature: float = 1.0, chat: bool | None = None, progress: bool = False) -> TokenBatches:
    """One sample per prompt: the prompt's tokens followed by the model's own seeded continuation,
    ``seq_len`` tokens in all (fewer when it ends with EOS first; right-padded and masked).

    ``chat`` (default: whether the tokenizer has a chat template) sends each prompt as a user message
    through the template. Prompts longer than half of ``seq_len`` are cut, so every sample is mostly
    the model's own text. Sampling uses a generator seeded by ``seed`` and each batch's position, so
    the same call gives the same samples on the same device."""
    if not prompts:
        raise BitDeltaError("self-calibration needs at least one prompt")
    if seq_len < 2:
        raise BitDeltaError(f"self-calibration samples need at least 2 tokens, got seq_len={seq_len}")
    if temperature <= 0:
        raise BitDeltaError(f"self-calibration samples at a temperature > 0, got {temperature}")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    keep = max(1, seq_len // 2)
    cache_arg = cache_argument(model)
    encoded = [_prompt_ids(tokenizer, p, chat)[:keep] for p in prompts]
    ids_out, masks_out = [], []
    gen = torch.Generator(device="cpu")
    try:
        for b in tqdm(range(0, len(encoded), batch_size), desc="self-calibration", disable=not progress):
            gen.manual_seed(seed * 1_000_003 + b)
            rows = [list(r) for r in encoded[b:b + batch_size]]
            done = [False] * len(rows)
            # Left-padded batch with explicit positions, so each row sees the positions it would alone;
            # a KV cache carries the prefix from step to step.
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            past = cache_of(out)
            logits = out.logits[:, -1]
            next_pos = pos[:, -1:] + 1
            for _ in range(seq_len - min(len(r) for r in rows)):
                probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
                for i, r in enumerate(rows):
                    if not done[i] and len(r) < seq_len:
                        r.append(int(nxt[i]))
                        done[i] = (eos is not None and r[-1] == eos) or len(r) >= seq_len
                    else:
                        done[i] = True
                if all(done):
                    break
                mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long, device=dev)], dim=1)
                out = model(input_ids=nxt.view(-1, 1).to(dev), attention_mask=mask, position_ids=next_pos,
                            use_cache=True, **{cache_arg: past})
                past, logits, next_pos = cache_of(out), out.logits[:, -1], next_pos + 1
            for r in rows:
                ids_out.append(r + [pad] * (seq_len - len(r)))
                masks_out.append([1] * len(r) + [0] * (seq_len - len(r)))
    finally:
        model.train(was_training)
    return TokenBatches(torch.tensor(ids_out, dtype=torch.long), torch.tensor(masks_out, dtype=torch.long))


def self_calibration(model, tokenizer, prompts: str | list[str] | None = None, num_samples: int = 800,
                     seq_len: int = 128, heldout: int = 32, seed: int = 0, batch_size: int = 32,
                     temperature: float = 1.0, chat: bool | None = None, progress: bool = False) -> Calibration:
    """Calibration samples generated by the fine-tune ``model`` itself (see the module docstring).

    Args:
        prompts: a text source (any file ``read_texts`` takes: each document's first sentence is a
            prompt), a list of prompts, or None for ``DEFAULT_PROMPTS``. Prompts are shuffled with
            ``seed``; the held-out samples use prompts the training samples do not, and when there
            are fewer prompts than samples they are reused (each use samples anew).
        heldout: held-out samples (for the before/after guard and ``--scale auto``'s choice).
    """
    if isinstance(prompts, (str, Path)):
        source = f"self (prompts: first sentences of {prompts})"
        texts = prompts_from_texts(read_texts(str(prompts)))
    elif prompts is None:
        source, texts = "self (built-in prompts)", list(DEFAULT_PROMPTS)
    else:
        source, texts = "self (given prompts)", [p for p in prompts if p and p.strip()]
    if len(texts) < (2 if heldout else 1):
        raise BitDeltaError(f"self-calibration needs at least 2 distinct prompts, got {len(texts)} from {source}")
    held_prompts, train_prompts = _split_heldout(texts, heldout, seed)

    def cycle(pool, n):
        return [pool[i % len(pool)] for i in range(n)]

    kw = dict(seq_len=seq_len, batch_size=batch_size, temperature=temperature, chat=chat, progress=progress)
    train = generate_samples(model, tokenizer, cycle(train_prompts, num_samples), seed=seed, **kw)
    held = (generate_samples(model, tokenizer, cycle(held_prompts, heldout), seed=seed + 1, **kw) if heldout else
            TokenBatches(torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.long)))
    return Calibration(train, held, source)
