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

:class:`Scorer` is the per-model part on its own, for callers that hold the models and score many
of them against one fine-tune (the fidelity benchmark scores every variant this way): the data is
read once, the fine-tune's reference generations are made once, and each call measures the parts
asked for and times them.

    scorer = Scorer(finetuned, tok, data, SuiteSettings(max_length=512))
    s = scorer.score(model)                       # every part: fidelity, generation, text, tasks
    s = scorer.score(base, parts=("text", "tasks"))
    print(s.fidelity.kl, s.greedy_agreement.exact_match, s.times)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from .fidelity import FidelityResult, fidelity, recovery
from .generation import AgreementResult, answer_accuracy, compare_generations, greedy_generations, gsm8k_answer
from .perplexity import PerplexityResult, perplexity
from .tasks import TasksResult, evaluate_tasks

# What Scorer.score can measure, in the order it measures them: "fidelity" (KL, top-1 and held-out
# perplexity against the fine-tune), "generation" (greedy agreement, answer accuracy), "text"
# (the long text's perplexity), "tasks" (zero-shot tasks).
PARTS = ("fidelity", "generation", "text", "tasks")


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
    batch_size: int = 16  # held-out documents per batch, and the default of the batch sizes below
    generation_batch: int | None = None  # prompts per batch when generating (None: batch_size)
    task_batch: int | None = None  # task examples per batch (None: batch_size)
    text_batch: int | None = None  # text windows per batch (None: half of batch_size, windows are long)
    agree_prompts: int = 100
    agree_tokens: int = 32
    qa_limit: int = 250
    qa_new_tokens: int = 256
    task_limit: int | None = 500
    window: int = 1024
    stride: int = 512
    text_chars: int | None = None  # score only the text's first N characters (None: all of it)
    progress: bool = False


@dataclass
class ModelScores:
    """One model's scores on the suite's data (None: not measured); ``times`` holds the seconds each
    measured part took (``fidelity_s``, ``generation_s``, ``text_s``, ``tasks_s``)."""

    heldout_ppl: float | None = None
    fidelity: FidelityResult | None = None  # this model (student) against the fine-tune (teacher)
    greedy_agreement: AgreementResult | None = None  # this model's generations against the fine-tune's
    answer_accuracy: dict | None = None
    tasks: TasksResult | None = None
    text: PerplexityResult | None = None
    times: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"heldout_ppl": self.heldout_ppl, "fidelity": self.fidelity.to_dict() if self.fidelity else None,
                "greedy_agreement": self.greedy_agreement.to_dict() if self.greedy_agreement else None,
                "answer_accuracy": self.answer_accuracy, "tasks": self.tasks.to_dict() if self.tasks else None,
                "text": self.text.to_dict() if self.text else None, "times": dict(self.times)}


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


def _wait_for_device(model) -> None:
    """Waits for the model's queued GPU work, so that a part's time is the time it took."""
    param = next(model.parameters(), None)
    if param is not None and param.is_cuda:
        torch.cuda.synchronize(param.device)


class Scorer:
    """Scores models against one fine-tune on data read once (see the module docstring).

    Args:
        finetuned: the fine-tune (an ``nn.Module``): the teacher of ``fidelity`` and the author of
            the reference generations, made once, the first time a model's generations are compared.
        tokenizer: the tokenizer every model is scored with.
        sync: called before each part's clock is read (default: waits for the model's GPU, if any).
    """

    def __init__(self, finetuned, tokenizer, data: SuiteData, settings: SuiteSettings | None = None, *,
                 sync: Callable[[], None] | None = None):
        s = settings or SuiteSettings()
        self.finetuned, self.tok, self.data, self.settings, self.sync = finetuned, tokenizer, data, s, sync
        docs = _texts(data.heldout)
        self.docs = docs[: s.heldout_docs] if s.heldout_docs else docs
        self.prompts = _texts(data.prompts)[: s.agree_prompts] if data.prompts is not None else None
        self.qa = _qa_pairs(data.qa)[: s.qa_limit] if data.qa is not None else None
        self.text = Path(data.text).read_text(encoding="utf-8") if data.text is not None else None
        if self.text is not None and s.text_chars:
            self.text = self.text[: s.text_chars]
        if data.tasks and data.tasks_dir is None:
            raise ConfigError("SuiteData.tasks needs tasks_dir, the folder of the task .jsonl files")
        self._reference: list[list[int]] | None = None

    def reference(self) -> list[list[int]] | None:
        """The fine-tune's greedy generations on the prompts (None without prompts), made once."""
        if self._reference is None:
            self._reference = self._generations(self.finetuned)
        return self._reference

    def score(self, model, parts: Iterable[str] = PARTS) -> ModelScores:
        """Measures ``parts`` (of :data:`PARTS`) of ``model``; parts whose data is missing stay None."""
        parts = tuple(parts)
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ConfigError(f"unknown suite part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        out = ModelScores()
        for part in PARTS:
            if part in parts:
                started = time.perf_counter()
                getattr(self, f"_score_{part}")(model, out)
                out.times[f"{part}_s"] = self._seconds_since(started, model)
        return out

    def _seconds_since(self, started: float, model) -> float:
        if self.sync is not None:
            self.sync()
        else:
            _wait_for_device(model)
        return round(time.perf_counter() - started, 2)

    def _score_fidelity(self, model, out: ModelScores) -> None:
        s = self.settings
        out.fidelity = fidelity(model, self.finetuned, self.tok, self.docs, max_length=s.max_length,
                                batch_size=s.batch_size, progress=s.progress)
        out.heldout_ppl = out.fidelity.ppl_student

    def _score_generation(self, model, out: ModelScores) -> None:
        s = self.settings
        if self.prompts:
            # the fine-tune's own generations are the reference: not made a second time
            mine = self.reference() if model is self.finetuned else self._generations(model)
            out.greedy_agreement = compare_generations(mine, self.reference(), s.agree_tokens)
        if self.qa:
            out.answer_accuracy = answer_accuracy(model, self.tok, [p for p, _ in self.qa], [a for _, a in self.qa],
                                                  extract=gsm8k_answer, max_new_tokens=s.qa_new_tokens,
                                                  batch_size=s.generation_batch or s.batch_size, progress=s.progress)

    def _score_text(self, model, out: ModelScores) -> None:
        s = self.settings
        if self.text is not None:
            window = min(s.window, int(getattr(model.config, "max_position_embeddings", s.window)))
            out.text = perplexity(model, self.tok, self.text, window=window, stride=min(s.stride, window),
                                  batch_size=s.text_batch or max(1, s.batch_size // 2), progress=s.progress)

    def _score_tasks(self, model, out: ModelScores) -> None:
        s = self.settings
        if self.data.tasks:
            out.tasks = evaluate_tasks(model, self.tok, list(self.data.tasks), self.data.tasks_dir,
                                       limit=s.task_limit, batch_size=s.task_batch or s.batch_size,
                                       progress=s.progress)

    def _generations(self, model) -> list[list[int]] | None:
        if not self.prompts:
            return None
        s = self.settings
        return greedy_generations(model, self.tok, self.prompts, s.agree_tokens,
                                  batch_size=s.generation_batch or s.batch_size, progress=s.progress)


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
    scorer = Scorer(ft_model, tokenizer, data, s)
    base_scores = scorer.score(base_model)  # its fidelity run gives the fine-tune's perplexity on the same tokens
    ft_scores = scorer.score(ft_model, parts=("generation", "text", "tasks"))
    ft_scores.heldout_ppl = base_scores.fidelity.ppl_teacher
    applied = not isinstance(delta, torch.nn.Module)
    student = apply(base_model, _delta(delta)) if applied else delta
    try:
        delta_scores = scorer.score(student)
    finally:
        if applied:
            unapply(base_model)
    return SuiteResult(base=base_scores, finetuned=ft_scores, delta=delta_scores,
                       recovery=recovery(base_scores.heldout_ppl, ft_scores.heldout_ppl, delta_scores.heldout_ppl),
                       fidelity=delta_scores.fidelity, greedy_agreement=delta_scores.greedy_agreement,
                       base_greedy_agreement=base_scores.greedy_agreement, settings=s)
