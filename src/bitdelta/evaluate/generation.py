"""Agreement of greedy generations, and answer accuracy of generated text.

Teacher-forced scores (perplexity, KL, top-1) look at one token at a time with the fine-tune's own
text as context; a compressed model that is close on each token can still drift once it feeds on
its own output. ``greedy_agreement`` measures that: both models decode greedily from the same
held-out prompts, and a prompt counts as an exact match when the student's first
``max_new_tokens`` generated tokens equal the teacher's (up to and including an EOS that ends
both early). It also reports how many leading tokens agree on average. ``answer_accuracy`` scores
generated answers against references (``gsm8k_answer`` extracts GSM8K's final number).

    ref = greedy_generations(finetuned, tok, prompts, max_new_tokens=32)
    r = greedy_agreement(delta_model, None, tok, prompts, reference=ref)
    print(r.exact_match, r.mean_prefix_tokens)
    acc = answer_accuracy(model, tok, questions, answers, extract=gsm8k_answer)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..hf_cache import cache_argument, cache_of
from ._common import encode, model_device, resolve_add_bos


@dataclass
class AgreementResult:
    """Greedy generations of a student against a teacher's over ``n_prompts`` prompts.

    ``exact_match``: fraction of prompts whose generated tokens are identical; ``mean_prefix_tokens``:
    mean number of leading generated tokens that agree (out of ``max_new_tokens``);
    ``token_agreement``: that as a fraction of the teacher's generated tokens."""

    exact_match: float
    mean_prefix_tokens: float
    token_agreement: float
    n_prompts: int
    max_new_tokens: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def _greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos: int | None, pad: int) -> list[list[int]]:
    """Greedy continuations (new tokens only, stopping after EOS) of a batch of token-id prompts.

    Left-padded with explicit position ids, so each row decodes as it would on its own."""
    dev = model_device(model)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    gens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    next_pos = pos[:, -1:] + 1
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                gens[i].append(t)
                done[i] = eos is not None and t == eos
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long, device=dev)], dim=1)
        out = model(input_ids=nxt.view(-1, 1), attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{cache_arg: cache_of(out)})
        next_pos = next_pos + 1
    return gens


def greedy_generations(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
                       add_bos: bool | None = None, max_prompt_tokens: int | None = None,
                       progress: bool = False) -> list[list[int]]:
    """Greedy new tokens of ``model`` for each prompt (each list ends early at EOS).

    Prompts are encoded with the evaluation BOS policy (``_common``); ``max_prompt_tokens`` keeps only
    a prompt's last tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    bos = resolve_add_bos(tokenizer, add_bos)
    encoded = [encode(tokenizer, p, bos) for p in prompts]
    if max_prompt_tokens:
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    if any(not e for e in encoded):
        raise ValueError("a prompt encodes to no tokens; give non-empty prompts (or add_bos=True)")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for b in tqdm(range(0, len(encoded), batch_size), desc="greedy", disable=not progress):
            out += _greedy_batch(model, encoded[b:b + batch_size], max_new_tokens, eos, pad)
    finally:
        model.train(was_training)
    return out


def compare_generations(student: list[list[int]], teacher: list[list[int]], max_new_tokens: int) -> AgreementResult:
    """Exact match and agreeing-prefix length of two lists of generations (prompt by prompt)."""
    if len(student) != len(teacher) or not teacher:
        raise ValueError(f"need one generation per prompt from both models (got {len(student)} and {len(teacher)})")
    exact, prefix, total = 0, 0, 0
    for s, t in zip(student, teacher):
        s, t = s[:max_new_tokens], t[:max_new_tokens]
        exact += s == t
        n = 0
        while n < min(len(s), len(t)) and s[n] == t[n]:
            n += 1
        prefix += n
        total += len(t)
    return AgreementResult(exact_match=exact / len(teacher), mean_prefix_tokens=prefix / len(teacher),
                           token_agreement=prefix / max(total, 1), n_prompts=len(teacher),
                           max_new_tokens=max_new_tokens)


def greedy_agreement(student, teacher, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                     batch_size: int = 16, add_bos: bool | None = None, reference: list[list[int]] | None = None,
                     max_prompt_tokens: int | None = None, progress: bool = False) -> AgreementResult:
    """How often ``student``'s greedy generation equals ``teacher``'s on ``prompts`` (see the module
    docstring). Pass ``reference`` (``greedy_generations`` of the teacher) to score several students
    against one set of teacher generations; ``teacher`` may then be None."""
    if reference is None:
        if teacher is None:
            raise ValueError("give the teacher model or its reference generations")
        reference = greedy_generations(teacher, tokenizer, prompts, max_new_tokens, batch_size, add_bos,
                                       max_prompt_tokens, progress)
    mine = greedy_generations(student, tokenizer, prompts, max_new_tokens, batch_size, add_bos, max_prompt_tokens,
                              progress)
    return compare_generations(mine, reference, max_new_tokens)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_answer(text: str) -> str | None:
    """GSM8K's final answer in ``text``: the number after ``####``, else the last number; commas
    and a trailing ``.0`` dropped. None when there is no number."""
    marked = text.split("####", 1)
    found = _NUMBER.findall(marked[1] if len(marked) > 1 else text)
    if not found:
        return None
    value = (found[0] if len(marked) > 1 else found[-1]).replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def answer_accuracy(model, tokenizer, prompts: list[str], answers: list[str], extract=gsm8k_answer,
                    max_new_tokens: int = 256, batch_size: int = 16, add_bos: bool | None = None,
                    progress: bool = False) -> dict:
    """Fraction of prompts whose greedy generation's ``extract``-ed answer equals ``extract(answer)``
    (references without an extractable answer are skipped). Returns ``accuracy``, ``n``, ``answered``
    (fraction of generations with an extractable answer)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    gens = greedy_generations(model, tokenizer, prompts, max_new_tokens, batch_size, add_bos, progress=progress)
    correct = answered = n = 0
    for g, ref in zip(gens, answers):
        want = extract(ref)
        if want is None:
            continue
        got = extract(tokenizer.decode(g, skip_special_tokens=True))
        n += 1
        answered += got is not None
        correct += got == want
    if n == 0:
        raise ValueError("no reference answer has an extractable answer")
    return {"accuracy": correct / n, "n": n, "answered": answered / n, "max_new_tokens": max_new_tokens}
