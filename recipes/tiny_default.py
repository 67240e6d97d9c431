"""Recipe for bitdelta's embedded default: a tiny real base LM and two real full fine-tunes of it.

Contract: on CPU, with fixed seeds, a fixed data order and a fixed thread count (2 unless --threads), it builds
  <out>/base          LlamaForCausalLM pretrained from scratch on Python-stdlib docstrings
                      plus a small share of each domain,
  <out>/shakespeare   full fine-tune of base on Shakespeare plays (tinyshakespeare, public domain),
  <out>/gsm8k         full fine-tune of base on GSM8K question + answer text (MIT),
  <out>/heldout/      per-domain text that no model was trained on (for fidelity checks),
  <out>/README.md, <out>/metrics.json   what was built and how well it does.
Every model dir holds float32 safetensors, config.json, generation_config.json and the
tokenizer files (a byte-level BPE, loadable with AutoTokenizer offline).

Usage:
  .venv/bin/python recipes/tiny_default.py --out models/tiny
  .venv/bin/python recipes/tiny_default.py --out /tmp/tiny --pretrain-steps 20 --finetune-steps 10   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import pkgutil
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 0
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SEQ_LEN = 256

MODEL_CONFIG = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ_LEN,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
    initializer_range=0.02,
)

# Chat templates: each fine-tune renders messages in the layout it was trained on.
GSM8K_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Answer: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)
SHAKESPEARE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% else %}{% if m['role'] == 'user' %}{% set who = 'First Citizen' %}"
    "{% else %}{% set who = 'Second Citizen' %}{% endif %}"
    "{% if m['name'] is defined %}{% set who = m['name'] %}{% endif %}"
    "{{ who }}:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Second Citizen:\n{% endif %}"
)

# Stdlib modules whose import has side effects or that are tests / GUI / installer code.
STDLIB_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "ensurepip", "pydoc_data", "__main__", "encodings", "venv", "xxsubtype", "xxlimited",
}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def collect_stdlib_docs() -> list[str]:
    """Docstrings of the running interpreter's standard library (PSF licence), deduplicated, sorted."""
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in STDLIB_SKIP)
    modules = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in names:
            try:
                mod = importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - optional modules (curses, tkinter...) may be absent
                continue
            modules.append(mod)
            for sub in sorted(pkgutil.walk_packages(getattr(mod, "__path__", []), name + ".", onerror=lambda _: None),
                              key=lambda s: s.name):
                parts = set(sub.name.split("."))
                if parts & {"test", "tests", "idle_test", "__main__"} or any(p.startswith("_") for p in parts):
                    continue
                try:
                    modules.append(importlib.import_module(sub.name))
                except BaseException:  # noqa: BLE001
                    continue
    docs: dict[str, None] = {}

    def add(obj) -> None:
        """Keep obj's docstring if it reads like prose (not a one-liner)."""
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if doc:
            doc = inspect.cleandoc(doc).strip()
            if len(doc) >= 80 and doc.count(" ") >= 10:
                docs.setdefault(doc, None)

    with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn on attribute access
        warnings.simplefilter("ignore")
        for mod in sorted(modules, key=lambda m: m.__name__):
            add(mod)
            for attr in sorted(vars(mod)):
                obj = vars(mod)[attr]
                if getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if inspect.isclass(obj):
                    add(obj)
                    for meth_name in sorted(vars(obj)):
                        meth = vars(obj)[meth_name]
                        if inspect.isfunction(meth) or inspect.ismethoddescriptor(meth) or isinstance(meth, property):
                            add(meth)
                elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    add(obj)
    # The language reference topics behind help("assert") etc.: long-form prose, same licence.
    from pydoc_data.topics import topics

    for key in sorted(topics):
        for chunk in chunk_paragraphs(topics[key]):
            docs.setdefault(chunk.strip(), None)
    return sorted(docs)


def split_at_blank_line(text: str, pos: int) -> int:
    """The index just after the first blank line at or after pos (so splits fall between speeches)."""
    i = text.find("\n\n", pos)
    return len(text) if i < 0 else i + 2


def chunk_paragraphs(text: str, target_chars: int = 1500) -> list[str]:
    """Group consecutive paragraphs / speeches (blank-line separated) into documents of about target_chars."""
    speeches = [s.strip("\n") for s in text.split("\n\n") if s.strip()]
    docs, cur = [], []
    for s in speeches:
        cur.append(s)
        if sum(len(c) for c in cur) >= target_chars:
            docs.append("\n\n".join(cur) + "\n\n")
            cur = []
    if cur:
        docs.append("\n\n".join(cur) + "\n\n")
    return docs


def gsm8k_text(rec: dict) -> str:
    """One GSM8K record as training text; calculator annotations <<a*b=c>> are stripped."""
    answer = re.sub(r"<<[^>]*>>", "", rec["answer"])
    return f"Question: {rec['question'].strip()}\nAnswer: {answer.strip()}"


def load_data(data_dir: Path, heldout_chars: int) -> dict:
    """Disjoint splits per domain: base share / fine-tune share / held-out."""
    shk = (data_dir / "finetune" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut_base = split_at_blank_line(shk, 200_000)
    cut_held = split_at_blank_line(shk, len(shk) - heldout_chars)
    shk_base, shk_ft, shk_held = shk[:cut_base], shk[cut_base:cut_held], shk[cut_held:]

    def read_jsonl(p: Path) -> list[dict]:
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    train = read_jsonl(data_dir / "finetune" / "gsm8k_train.jsonl")
    test = read_jsonl(data_dir / "finetune" / "gsm8k_test.jsonl")
    random.Random(SEED).shuffle(train)
    n_base = 1200
    gsm_base, gsm_ft = train[:n_base], train[n_base:]
    gsm_held, size = [], 0
    for rec in test:  # file order: the first records of the official test split
        if size >= heldout_chars // 2:  # the jsonl stores question, answer and text: ~2x the text
            break
        rec = {"question": rec["question"], "answer": rec["answer"], "text": gsm8k_text(rec)}
        gsm_held.append(rec)
        size += len(rec["text"]) + 1

    docs = collect_stdlib_docs()
    random.Random(SEED).shuffle(docs)
    std_held, size = [], 0
    while size < heldout_chars:
        d = docs.pop()
        std_held.append(d)
        size += len(d) + 2
    return {
        "stdlib_train": docs, "stdlib_held": std_held,
        "shk_base": chunk_paragraphs(shk_base), "shk_ft": chunk_paragraphs(shk_ft),
        "shk_held_text": shk_held, "shk_held": chunk_paragraphs(shk_held),
        "gsm_base": [gsm8k_text(r) for r in gsm_base], "gsm_ft": [gsm8k_text(r) for r in gsm_ft],
        "gsm_held_records": gsm_held, "gsm_held": [r["text"] for r in gsm_held],
        "shk_cuts": (cut_base, cut_held),
    }


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenisation), bos prepended on encode, as HF fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=SEQ_LEN, clean_up_tokenization_spaces=False, padding_side="left",
    )


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """Documents as one packed token stream: <bos> doc <eos> <bos> doc <eos> ..."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=True):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


def sample_batch(streams: list[torch.Tensor], weights: list[float], batch: int, gen: torch.Generator) -> torch.Tensor:
    """batch random windows of SEQ_LEN tokens; each row's source drawn by weight (deterministic via gen)."""
    src = torch.multinomial(torch.tensor(weights, dtype=torch.float), batch, replacement=True, generator=gen)
    rows = []
    for s in src.tolist():
        stream = streams[s]
        start = int(torch.randint(0, len(stream) - SEQ_LEN, (1,), generator=gen))
        rows.append(stream[start:start + SEQ_LEN])
    return torch.stack(rows)


def train(model: LlamaForCausalLM, streams, weights, *, steps: int, batch: int, lr: float, warmup: int,
          weight_decay: float, seed: int, desc: str) -> list[float]:
    """AdamW on all parameters, linear warmup then cosine decay to 10% of lr; returns per-step losses."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    losses, ema = [], None
    bar = tqdm(range(steps), desc=desc, mininterval=2.0, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = sample_batch(streams, weights, batch, gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ema = losses[-1] if ema is None else 0.95 * ema + 0.05 * losses[-1]
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr_at(step):.1e}")
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def heldout_nll(model: LlamaForCausalLM, stream: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token NLL over non-overlapping SEQ_LEN windows of a token stream (tail dropped)."""
    n = len(stream) // SEQ_LEN
    windows = stream[: n * SEQ_LEN].view(n, SEQ_LEN)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = windows[i:i + batch]
        loss = model(input_ids=x, labels=x).loss
        total += loss.item() * x.numel()
        count += x.numel()
    return total / count


@torch.no_grad()
def samples(model, tokenizer, prompt: str, n_new: int = 60) -> tuple[str, str]:
    """(greedy, sampled) continuations of prompt; sampling is seeded."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    greedy = model.generate(ids, max_new_tokens=n_new, do_sample=False, repetition_penalty=1.1)
    torch.manual_seed(SEED)
    sampled = model.generate(ids, max_new_tokens=n_new, do_sample=True, temperature=0.8, top_k=40)
    dec = lambda out: tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)  # noqa: E731
    return dec(greedy), dec(sampled)


def save_model(model, tokenizer, out_dir: Path, chat_template: str | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=128,
    )
    model.to(torch.float32).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------


def write_readme(out: Path, m: dict) -> None:
    ppl = m["heldout_ppl"]
    rows = "\n".join(
        f"| {name} | {ppl[name]['shakespeare']:.2f} | {ppl[name]['gsm8k']:.2f} | {ppl[name]['stdlib']:.2f} |"
        for name in ("base", "shakespeare", "gsm8k")
    )
    sizes = "\n".join(f"| {k} | {v / 1e6:.2f} MB |" for k, v in m["sizes_bytes"].items())
    sizes += f"\n| all of `models/tiny` | {sum(m['sizes_bytes'].values()) / 1e6:.2f} MB (+ this README and metrics.json) |"
    gens = "\n\n".join(
        f"**{name}**, prompt `{g['prompt']!r}`\n\n```text\ngreedy : {g['greedy']!r}\nsampled: {g['sampled']!r}\n```"
        for name, g in m["samples"].items()
    )
    tl = m["train"]
    text = f"""# Embedded default models (tiny)

Three tiny but real causal LMs that make `bitdelta` runnable end to end with no download:

| dir | what it is |
|---|---|
| `base/` | `LlamaForCausalLM` pretrained from scratch: {m['params']:,} parameters, hidden {MODEL_CONFIG['hidden_size']}, {MODEL_CONFIG['num_hidden_layers']} layers, {MODEL_CONFIG['num_attention_heads']} heads / {MODEL_CONFIG['num_key_value_heads']} KV heads, MLP {MODEL_CONFIG['intermediate_size']}, vocab {MODEL_CONFIG['vocab_size']} (byte-level BPE), context {SEQ_LEN}, tied embeddings, float32 |
| `shakespeare/` | full fine-tune of `base` (every parameter trained) on Shakespeare plays |
| `gsm8k/` | full fine-tune of `base` (every parameter trained) on GSM8K grade-school math question + answer text |
| `heldout/` | per-domain text no model was trained on, for fidelity checks: `shakespeare.txt`, `gsm8k.jsonl` (fields `question`, `answer`, and `text` = the exact training layout), `stdlib.txt` (docstrings separated by blank lines) |
| `metrics.json` | everything below, machine-readable |

Each model dir is a normal Hugging Face dir (`config.json`, `model.safetensors`, `generation_config.json`,
tokenizer files) and loads offline with `AutoModelForCausalLM.from_pretrained(dir)` /
`AutoTokenizer.from_pretrained(dir)`. The tokenizer prepends `<|bos|>`; documents end with `<|eos|>`;
`<|pad|>` pads (left). The fine-tunes carry a chat template in their training layout
(gsm8k: `Question: ...\\nAnswer: ...`; shakespeare: `Speaker:\\ntext\\n\\n`); the base has none.
These are toy models: fluent-looking text at best, no real arithmetic.

## Recipe

```
.venv/bin/python recipes/tiny_default.py --out models/tiny [--data-dir ../shared/data]
```
CPU only, 2 threads by default (`--threads`), fixed seeds (`torch.manual_seed`, seeded generators, fixed data order).
These files were produced by `{m['command']}` in {m['wall_s'] / 60:.1f} min wall time (Python {m['python']}, torch {m['torch']},
transformers {m['transformers']}). The stdlib docstrings come from the running interpreter, so another Python
version gives slightly different pretraining text; with the same versions and thread count the run repeats.
`--threads 1` is worth it on a busy shared machine: with other jobs competing for the 2 cores, one thread
ran about 4x faster per step than two (which lose time waiting on each other); on an idle machine
2 threads took 0.33 s per pretraining step in a benchmark, so an estimated 6-7 min for the whole recipe.

| phase | data | steps x batch x {SEQ_LEN} tokens | lr (AdamW, warmup + cosine to 10%) | first -> last loss (mean of 20 steps) |
|---|---|---|---|---|
| pretrain `base` | stdlib docstrings {tl['base']['mix'][0]:.0%}, Shakespeare share {tl['base']['mix'][1]:.0%}, GSM8K share {tl['base']['mix'][2]:.0%} | {tl['base']['steps']} x {tl['base']['batch']} | {tl['base']['lr']:g} | {tl['base']['first']:.3f} -> {tl['base']['last']:.3f} |
| fine-tune `shakespeare` | Shakespeare fine-tune slice | {tl['shakespeare']['steps']} x {tl['shakespeare']['batch']} | {tl['shakespeare']['lr']:g} | {tl['shakespeare']['first']:.3f} -> {tl['shakespeare']['last']:.3f} |
| fine-tune `gsm8k` | GSM8K fine-tune slice | {tl['gsm8k']['steps']} x {tl['gsm8k']['batch']} | {tl['gsm8k']['lr']:g} | {tl['gsm8k']['first']:.3f} -> {tl['gsm8k']['last']:.3f} |

## Data (all committable)

| source | licence | used as |
|---|---|---|
| Docstrings of the Python {m['python']} standard library, collected with `inspect` from the running interpreter ({m['data']['stdlib_docs']} docstrings, {m['data']['stdlib_chars'] / 1e6:.1f} M chars) | PSF License (Copyright (c) 2001 Python Software Foundation; All Rights Reserved) | base pretraining; a held-out sample in `heldout/stdlib.txt` |
| `tinyshakespeare.txt` (Karpathy's char-rnn collection of Shakespeare plays, 1.1 M chars) | public domain | chars [0, {m['data']['shk_cut_base']:,}) in pretraining, [{m['data']['shk_cut_base']:,}, {m['data']['shk_cut_held']:,}) fine-tune, the rest (last {m['data']['shk_held_chars']:,} chars) held out |
| GSM8K (Cobbe et al. 2021), `train` and `test` splits | MIT, Copyright (c) 2021 OpenAI | train shuffled with seed {SEED}: {m['data']['gsm_base']} problems in pretraining, the other {m['data']['gsm_ft']} fine-tune; the first {m['data']['gsm_held']} problems of `test` held out |

GSM8K text is used as `Question: <question>\\nAnswer: <answer>` with the `<<calc>>` annotations removed.
GSM8K licence notice: Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the following
conditions: The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND.

## Held-out perplexity (lower is better)

Mean next-token NLL over non-overlapping {SEQ_LEN}-token windows of the held-out text (`heldout/`, laid out as in
training: `<|bos|>` document `<|eos|>`), exponentiated. Each fine-tune beats the base on its own domain and,
as full fine-tunes do, forgets the rest.

| model | Shakespeare | GSM8K | stdlib prose |
|---|---|---|---|
{rows}

## Sizes

| dir | size |
|---|---|
{sizes}

## Sample generations (from the recipe's final step)

60 new tokens each; `greedy` is greedy decoding with repetition penalty 1.1, `sampled` is temperature 0.8,
top-k 40, `torch.manual_seed({SEED})`.

{gens}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "tiny")
    ap.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    ap.add_argument("--pretrain-steps", type=int, default=700)
    ap.add_argument("--pretrain-batch", type=int, default=16)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--finetune-batch", type=int, default=8)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--heldout-chars", type=int, default=50_000)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads; on a busy shared machine 1 is often faster than 2")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    random.seed(SEED)
    out: Path = args.out
    if out.exists():
        for sub in ("base", "shakespeare", "gsm8k", "heldout"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    print("collecting data ...", flush=True)
    d = load_data(args.data_dir, args.heldout_chars)
    print(f"  stdlib docstrings: {len(d['stdlib_train'])} train / {len(d['stdlib_held'])} held out; "
          f"shakespeare docs: {len(d['shk_base'])} base / {len(d['shk_ft'])} ft; "
          f"gsm8k: {len(d['gsm_base'])} base / {len(d['gsm_ft'])} ft / {len(d['gsm_held'])} held out", flush=True)

    held = out / "heldout"
    held.mkdir(parents=True, exist_ok=True)
    (held / "shakespeare.txt").write_text(d["shk_held_text"], encoding="utf-8")
    (held / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in d["gsm_held_records"]), encoding="utf-8")
    (held / "stdlib.txt").write_text("\n\n".join(d["stdlib_held"]) + "\n", encoding="utf-8")

    print("training tokenizer ...", flush=True)
    tokenizer = train_tokenizer(d["stdlib_train"] + d["shk_base"] + d["shk_ft"] + d["gsm_base"] + d["gsm_ft"],
                                MODEL_CONFIG["vocab_size"])
    s = {k: encode_stream(tokenizer, d[k]) for k in
         ("stdlib_train", "shk_base", "shk_ft", "gsm_base", "gsm_ft", "stdlib_held", "shk_held", "gsm_held")}
    print("  tokens: " + ", ".join(f"{k}={len(v):,}" for k, v in s.items()), flush=True)
    evals = {"shakespeare": s["shk_held"], "gsm8k": s["gsm_held"], "stdlib": s["stdlib_held"]}

    cfg = LlamaConfig(**MODEL_CONFIG, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"base: {n_params:,} parameters", flush=True)

    mix = [0.80, 0.10, 0.10]
    summary = lambda losses: {"first": sum(losses[:20]) / len(losses[:20]),  # noqa: E731
                              "last": sum(losses[-20:]) / len(losses[-20:])}
    losses = train(base, [s["stdlib_train"], s["shk_base"], s["gsm_base"]], mix, steps=args.pretrain_steps,
                   batch=args.pretrain_batch, lr=args.pretrain_lr, warmup=max(1, args.pretrain_steps // 20),
                   weight_decay=0.1, seed=SEED + 1, desc="pretrain base")
    train_log = {"base": {"steps": args.pretrain_steps, "batch": args.pretrain_batch, "lr": args.pretrain_lr,
                          "mix": mix, **summary(losses)}}
    save_model(base, tokenizer, out / "base", None)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    finetunes = {"shakespeare": (s["shk_ft"], SHAKESPEARE_CHAT_TEMPLATE, SEED + 2),
                 "gsm8k": (s["gsm_ft"], GSM8K_CHAT_TEMPLATE, SEED + 3)}
    trained = {"base": base}
    for name, (stream, template, seed) in finetunes.items():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(base_state)
        losses = train(model, [stream], [1.0], steps=args.finetune_steps, batch=args.finetune_batch,
                       lr=args.finetune_lr, warmup=max(1, args.finetune_steps // 20), weight_decay=0.01,
                       seed=seed, desc=f"fine-tune {name}")
        train_log[name] = {"steps": args.finetune_steps, "batch": args.finetune_batch, "lr": args.finetune_lr,
                           **summary(losses)}
        save_model(model, tokenizer, out / name, template)
        unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, base_state[k])]
        if unchanged:
            raise RuntimeError(f"fine-tune {name} left tensors equal to the base: {unchanged}")
        trained[name] = model

    print("evaluating held-out perplexity ...", flush=True)
    ppl = {name: {dom: math.exp(heldout_nll(m, st)) for dom, st in evals.items()} for name, m in trained.items()}
    print(f"{'model':<12} " + " ".join(f"{dom:>12}" for dom in evals))
    for name, row in ppl.items():
        print(f"{name:<12} " + " ".join(f"{row[dom]:>12.2f}" for dom in evals))

    prompts = {"base": "The function returns", "shakespeare": "ROMEO:\n",
               "gsm8k": "Question: Tom has 3 boxes with 12 apples in each box. He eats 5 apples. "
                        "How many apples are left?\nAnswer:"}
    gen = {}
    for name, m in trained.items():
        g, smp = samples(m, tokenizer, prompts[name])
        gen[name] = {"prompt": prompts[name], "greedy": g, "sampled": smp}
        print(f"\n=== {name} | prompt {prompts[name]!r}\n--- greedy:\n{g}\n--- sampled:\n{smp}", flush=True)

    sizes = {sub: dir_size(out / sub) for sub in ("base", "shakespeare", "gsm8k", "heldout")}
    metrics = {
        "command": " ".join([".venv/bin/python", "recipes/tiny_default.py"] + (sys.argv[1:] if argv is None else argv)),
        "params": n_params, "train": train_log, "heldout_ppl": ppl, "samples": gen,
        "wall_s": time.time() - t0, "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tokens": {k: len(v) for k, v in s.items()},
        "data": {"stdlib_docs": len(d["stdlib_train"]), "stdlib_chars": sum(len(x) for x in d["stdlib_train"]),
                 "shk_cut_base": d["shk_cuts"][0], "shk_cut_held": d["shk_cuts"][1],
                 "shk_held_chars": len(d["shk_held_text"]),
                 "gsm_base": len(d["gsm_base"]), "gsm_ft": len(d["gsm_ft"]), "gsm_held": len(d["gsm_held"])},
    }
    metrics["sizes_bytes"] = sizes
    write_readme(out, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    sizes["total"] = dir_size(out)
    print(f"\nsizes: " + ", ".join(f"{k}={v / 1e6:.2f} MB" for k, v in sizes.items()))
    print(f"done in {(time.time() - t0) / 60:.1f} min -> {out}")


if __name__ == "__main__":
    main()
