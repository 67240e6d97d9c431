"""How faithfully a student (e.g. base + 1-bit delta) reproduces a teacher (the fine-tune).

Over the real (non-padding) tokens of held-out documents, at every position that predicts a next
token of the document: mean KL(teacher || student) per token in nats, top-1 agreement (the two
argmaxes are equal), and both models' perplexity on the same tokens. ``recovery`` turns three
perplexities into the fraction of the fine-tune's improvement over the base that is kept.

    r = fidelity(delta_model, finetuned, tok, heldout_docs, max_length=512, batch_size=8)
    print(r.kl, r.top1_agreement, r.ppl_student, r.ppl_teacher)
    recovery(ppl_base, ppl_ft, r.ppl_student)   # 1.0 = all of the fine-tune's gain kept
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ._common import encode, forward_logits, model_device, model_max_length, pad_right, resolve_add_bos

_CHUNK = 1024  # positions per fp32 log-softmax chunk


@dataclass
class FidelityResult:
    """Student-vs-teacher agreement over ``n_tokens`` scored positions of ``n_docs`` documents.

    ``kl`` is the mean over tokens of KL(teacher || student) (nats); ``top1_agreement`` the
    fraction of positions whose argmax tokens agree; ``nll_*`` are sums in nats.
    """

    kl: float
    top1_agreement: float
    ppl_student: float
    ppl_teacher: float
    nll_student: float
    nll_teacher: float
    n_tokens: int
    n_docs: int
    max_length: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recovery(ppl_base: float, ppl_ft: float, ppl_delta: float) -> float:
    """``(log ppl_base − log ppl_delta) / (log ppl_base − log ppl_ft)``.

    1.0 when the delta model matches the fine-tune, 0.0 when it is no better than the base.
    """
    denom = math.log(ppl_base) - math.log(ppl_ft)
    if denom == 0.0:
        raise ValueError(
            f"recovery is undefined when the fine-tune's perplexity equals the base's ({ppl_ft}); "
            "measure on text where the fine-tune differs from its base"
        )
    return (math.log(ppl_base) - math.log(ppl_delta)) / denom


def fidelity(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer,
    docs: list[str],
    max_length: int | None = None,
    batch_size: int = 8,
    add_bos: bool | None = None,
    progress: bool = True,
) -> FidelityResult:
    """Compare ``student`` with ``teacher`` on ``docs`` (each truncated to ``max_length`` tokens).

    The models may live on different devices; inputs go to each model's device and the teacher's
    log-probabilities are moved to the student's. Positions scored: token ``j`` of a document for
    ``j >= 1`` (the logits at ``j - 1``), the same positions ``perplexity_of_documents`` scores.

    Returns:
        ``FidelityResult``.
    """
    max_length = int(max_length or min(model_max_length(student, tokenizer), model_max_length(teacher)))
    bos = resolve_add_bos(tokenizer, add_bos)
    seqs = [encode(tokenizer, d, bos)[:max_length] for d in docs]
    order = sorted((i for i in range(len(seqs)) if len(seqs[i]) >= 2), key=lambda i: -len(seqs[i]))
    if not order:
        raise ValueError("no document has 2 or more tokens; nothing to compare")

    s_dev, t_dev = model_device(student), model_device(teacher)
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    kl_sum, agree, n_tokens = 0.0, 0, 0
    nll_s, nll_t = 0.0, 0.0
    try:
        with torch.no_grad():
            batches = range(0, len(order), batch_size)
            for b in tqdm(batches, desc="fidelity", disable=not progress):
                chunk = [seqs[i] for i in order[b : b + batch_size]]
                ids_s, mask_s = pad_right(chunk, s_dev)
                logits_s = forward_logits(student, ids_s, mask_s)
                logits_t = forward_logits(teacher, ids_s.to(t_dev), mask_s.to(t_dev))
                # Real predicting positions: row i, positions 0 .. len-2.
                pred = mask_s[:, 1:].bool()  # [B, L-1]
                targets = ids_s[:, 1:][pred]  # [N]
                sel_s = logits_s[:, :-1][pred]  # [N, V], model dtype
                sel_t = logits_t[:, :-1][pred.to(t_dev)].to(s_dev)
                del logits_s, logits_t
                for c in range(0, targets.numel(), _CHUNK):  # bounds the fp32 [N, V] temporaries
                    lp_s = torch.log_softmax(sel_s[c : c + _CHUNK].float(), dim=-1)
                    lp_t = torch.log_softmax(sel_t[c : c + _CHUNK].float(), dim=-1)
                    tgt = targets[c : c + _CHUNK, None]
                    kl_sum += (lp_t.exp() * (lp_t - lp_s)).sum().item()
                    agree += (lp_s.argmax(-1) == lp_t.argmax(-1)).sum().item()
                    nll_s -= lp_s.gather(-1, tgt).sum().item()
                    nll_t -= lp_t.gather(-1, tgt).sum().item()
                n_tokens += targets.numel()
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return FidelityResult(
        kl=kl_sum / n_tokens,
        top1_agreement=agree / n_tokens,
        ppl_student=math.exp(nll_s / n_tokens),
        ppl_teacher=math.exp(nll_t / n_tokens),
        nll_student=nll_s,
        nll_teacher=nll_t,
        n_tokens=n_tokens,
        n_docs=len(docs),
        max_length=max_length,
    )
