"""Evaluation of causal LMs (base, fine-tune, or base + delta): perplexity, fidelity to the
fine-tune, and zero-shot tasks. Pure functions over an already-built model and its tokenizer.

    from bitdelta.evaluate import perplexity, fidelity, recovery, evaluate_tasks
    ppl = perplexity(model, tok, text, window=2048, stride=512).ppl
    fid = fidelity(delta_model, finetuned, tok, docs, max_length=512)
    agree = greedy_agreement(delta_model, finetuned, tok, prompts, max_new_tokens=32)

The fidelity suite (``suite``) runs every measure for base, fine-tune and base + delta in one call
(``evaluate_delta``), or for one model at a time against a fine-tune (``Scorer``).
"""

from .fidelity import FidelityResult, fidelity, recovery
from .generation import (
    AgreementResult,
    answer_accuracy,
    compare_generations,
    greedy_agreement,
    greedy_generations,
    gsm8k_answer,
)
from .perplexity import PerplexityResult, perplexity, perplexity_of_documents
from .suite import ModelScores, Scorer, SuiteData, SuiteResult, SuiteSettings, evaluate_delta
from .tasks import (
    TASKS,
    LoglikelihoodResult,
    TaskResult,
    TasksResult,
    evaluate_task,
    evaluate_tasks,
    load_task,
    loglikelihood,
)

__all__ = [
    "TASKS",
    "AgreementResult",
    "answer_accuracy",
    "compare_generations",
    "greedy_agreement",
    "greedy_generations",
    "gsm8k_answer",
    "FidelityResult",
    "LoglikelihoodResult",
    "ModelScores",
    "Scorer",
    "SuiteData",
    "SuiteResult",
    "SuiteSettings",
    "PerplexityResult",
    "TaskResult",
    "TasksResult",
    "evaluate_delta",
    "evaluate_task",
    "evaluate_tasks",
    "fidelity",
    "load_task",
    "loglikelihood",
    "perplexity",
    "perplexity_of_documents",
    "recovery",
]
