"""The fidelity suite: every measure of how well a delta stands in for its fine-tune, in one call.

Given the base, the fine-tune and a delta (models, directories or an artifact), and the text to
measure on, :func:`evaluate_delta` scores the three models the same way and returns a typed
:class:`SuiteResult`:

- held-out perplexity of base, fine-tune and base + delta, and the **recovery** of the fine-tune's
  gain, ``(log ppl_base − log ppl_Δ) / (log ppl_base − log ppl_ft)``;
- **KL**(fine-tune ‖ base + delta) per token and **top-1** agreement on the held-out text;
- **greedy agreement** with the fine-tune's generations on held-out prompts (``prompts``);
- **answer accuracy** of generated answers (``qa``: GSM8K-style question/answer rows);
- zero-shot **task** accuracy (``tasks`` from ``tasks_dir``) and a long text's sliding-window
  perplexity (``text``, e.g. WikiText-2), for each model.

Measures whose data is not given are skipped (None in the result). The delta is applied to the
base for its measurements and removed afterwards; the base's weights are never written.

    data = SuiteData(heldout="heldout/gsm8k.jsonl", prompts=[...], qa="gsm8k_test.jsonl")
    r = evaluate_delta("models/tiny/base", "models/tiny/gsm8k", "gsm8k.bitdelta", data)
    print(r.recovery, r.fidelity.kl, r.greedy_agreement.exact_match)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .fidelity import FidelityResult, fidelity, recovery
from .generation import AgreementResult, answer_accuracy, compare_generations, greedy_generations, gsm8k_answer
from .perplexity import PerplexityResult, perplexity
from .tasks import TasksResult, evaluate_tasks


@dataclass
class SuiteData:
    """What the suite measures on. Texts are lists of strings or files (``.jsonl`` with a ``text``
    field or question/answer, ``.txt`` documents separated by blank lines)."""

    heldout: list[str] | str | Path  # held-out documents of the fine-tune's domain
    prompts: list[str] | str | Path | None = None  # greedy-agreement prompts
    qa: list[tuple[str, str]] | str | Path | None = None  # (prompt, reference answer) pairs or a question/answer .jsonl
    tasks: tuple[str, ...] = ()  # zero-shot task names, files <tasks_dir>/<name>.jsonl
    tasks_dir: str | Path | None = None
    text: str | Path | None = None  # a long text file scored with a sliding window (e.g. WikiText-2)


@dataclass
class SuiteSettings:
    """Budgets of the measures (as the fidelity benchmark's defaults, but documents as long as the models take)."""

    max_length: int | None = None  # tokens per held-out document (None: the models' context)
    heldout_docs: int | None = None  # first N held-out documents (None: all)
    batch_size: int = 16
    agree_prompts: int = 100
    agree_tokens: int = 32
    qa_limit: int = 250
    qa_new_tokens: int = 256
    task_limit: int | None = 500
    window: int = 1024
    stride: int = 512
    progress: bool = False


@dataclass
class ModelScores:
    """One model's scores on the suite's data (None: not measured)."""

    heldout_ppl: float
    answer_accuracy: dict | None = None
    tasks: TasksResult | None = None
    text: PerplexityResult | None = None

    def to_dict(self) -> dict:
        return {"heldout_ppl": self.heldout_ppl, "answer_accuracy": self.answer_accuracy,
                "tasks": self.tasks.to_dict() if self.tasks else None,
                "text": self.text.to_dict() if self.text else None}


@dataclass
class SuiteResult:
    """Base, fine-tune and base + delta scored the same way, and the delta against the fine-tune."""

    base: ModelScores
    finetuned: ModelScores
    delta: ModelScores
    recovery: float
    fidelity: FidelityResult  # base + delta (student) against the fine-tune (teacher)
    greedy_agreement: AgreementResult | None = None
    base_greedy_agreement: AgreementResult | None = None  # the base against the fine-tune: what 1.0 is out of
    settings: SuiteSettings = field(default_factory=SuiteSettings)

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "finetuned": self.finetuned.to_dict(), "delta": self.delta.to_dict(),
                "recovery": self.recovery, "fidelity": self.fidelity.to_dict(),
                "greedy_agreement": self.greedy_agreement.to_dict() if self.greedy_agreement else None,
                "base_greedy_agreement": (self.base_greedy_agreement.to_dict() if self.base_greedy_agreement
                                          else None),
                "settings": dataclasses.asdict(self.settings)}


def _texts(source) -> list[str]:
    if isinstance(source, (list, tuple)):
        return [str(t) for t in source]
    from ..calibration import read_texts

    return read_texts(str(source))


def _qa_pairs(source) -> list[tuple[str, str]]:
    if isinstance(source, (list, tuple)):
        return [(str(p), str(a)) for p, a in source]
    rows = [json.loads(line) for line in Path(source).read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return [(f"Question: {r['question']}\nAnswer:", str(r["answer"])) for r in rows]
    except (KeyError, TypeError):
        raise ValueError(f"{source}: answer-accuracy rows need 'question' and 'answer' fields") from None


def _model(source, device, dtype):
    if isinstance(source, torch.nn.Module):
        return source
    from ..hf import load_model

    return load_model(source, dtype=dtype, device=device)


def _delta(source):
    from ..delta import Delta

    return source if isinstance(source, Delta) else Delta.from_pretrained(source)


class _Scorer:
    """The per-model measures, on data read once."""

    def __init__(self, tokenizer, data: SuiteData, s: SuiteSettings):
        self.tok, self.data, self.s = tokenizer, data, s
        docs = _texts(data.heldout)
        self.docs = docs[: s.heldout_docs] if s.heldout_docs else docs
        self.prompts = _texts(data.prompts)[: s.agree_prompts] if data.prompts is not None else None
        self.qa = _qa_pairs(data.qa)[: s.qa_limit] if data.qa is not None else None
        self.text = Path(data.text).read_text(encoding="utf-8") if data.text is not None else None

    def generations(self, model) -> list[list[int]] | None:
        if not self.prompts:
            return None
        return greedy_generations(model, self.tok, self.prompts, self.s.agree_tokens, batch_size=self.s.batch_size,
                                  progress=self.s.progress)

    def scores(self, model, heldout_ppl: float) -> ModelScores:
        s, out = self.s, ModelScores(heldout_ppl)
        if self.qa:
            out.answer_accuracy = answer_accuracy(model, self.tok, [p for p, _ in self.qa], [a for _, a in self.qa],
                                                  extract=gsm8k_answer, max_new_tokens=s.qa_new_tokens,
                                                  batch_size=s.batch_size, progress=s.progress)
        if self.data.tasks:
            if self.data.tasks_dir is None:
                raise ValueError("SuiteData.tasks needs tasks_dir, the folder of the task .jsonl files")
            out.tasks = evaluate_tasks(model, self.tok, list(self.data.tasks), self.data.tasks_dir,
                                       limit=s.task_limit, batch_size=s.batch_size, progress=s.progress)
        if self.text is not None:
            window = min(s.window, int(getattr(model.config, "max_position_embeddings", s.window)))
            out.text = perplexity(model, self.tok, self.text, window=window, stride=min(s.stride, window),
                                  batch_size=max(1, s.batch_size // 2), progress=s.progress)
        return out

    def fidelity(self, student, teacher) -> FidelityResult:
        return fidelity(student, teacher, self.tok, self.docs, max_length=self.s.max_length,
                        batch_size=self.s.batch_size, progress=self.s.progress)


def evaluate_delta(base, finetuned, delta, data: SuiteData, settings: SuiteSettings | None = None, *,
                   tokenizer=None, device: str | None = None, dtype=None) -> SuiteResult:
    """Scores ``base``, ``finetuned`` and base + ``delta`` on ``data`` (see the module docstring).

    Args:
        base, finetuned: ``nn.Module`` models or model directories / hub ids (loaded on ``device``
            in ``dtype``). A given base module must not have a delta applied.
        delta: a :class:`~bitdelta.Delta`, an artifact directory, or a model already computing the
            fine-tune's approximation (e.g. merged); a Delta or artifact is applied to ``base`` for
            its measurements and removed afterwards.
        tokenizer: default: the artifact's (the fine-tune's) tokenizer, else the fine-tune's.
    """
    from ..apply import apply, unapply
    from ..hf import load_tokenizer

    s = settings or SuiteSettings()
    base_model = _model(base, device, dtype)
    ft_model = _model(finetuned, device, dtype)
    if tokenizer is None:
        named = [str(x) for x in (delta, finetuned, base) if isinstance(x, (str, Path))]
        if not named:
            raise ValueError("pass tokenizer= when base, fine-tune and delta are all in-memory objects")
        tokenizer = load_tokenizer(*named)
    scorer = _Scorer(tokenizer, data, s)
    base_fid = scorer.fidelity(base_model, ft_model)  # base ppl and fine-tune ppl on the same tokens
    reference = scorer.generations(ft_model)
    base_gens = scorer.generations(base_model)
    base_scores = scorer.scores(base_model, base_fid.ppl_student)
    ft_scores = scorer.scores(ft_model, base_fid.ppl_teacher)
    applied = not isinstance(delta, torch.nn.Module)
    student = apply(base_model, _delta(delta)) if applied else delta
    try:
        fid = scorer.fidelity(student, ft_model)
        gens = scorer.generations(student)
        delta_scores = scorer.scores(student, fid.ppl_student)
    finally:
        if applied:
            unapply(base_model)
    agree = compare_generations(gens, reference, s.agree_tokens) if reference else None
    base_agree = compare_generations(base_gens, reference, s.agree_tokens) if reference else None
    return SuiteResult(base=base_scores, finetuned=ft_scores, delta=delta_scores,
                       recovery=recovery(base_fid.ppl_student, base_fid.ppl_teacher, fid.ppl_student),
                       fidelity=fid, greedy_agreement=agree, base_greedy_agreement=base_agree, settings=s)
