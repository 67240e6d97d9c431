"""Evaluation of causal LMs (base, fine-tune, or base + delta): perplexity, fidelity to the
fine-tune, and zero-shot tasks. Pure functions over an already-built model and its tokenizer.

    from bitdelta.evaluate import perplexity, fidelity, recovery, evaluate_tasks
    ppl = perplexity(model, tok, text, window=2048, stride=512).ppl
    fid = fidelity(delta_model, finetuned, tok, docs, max_length=512)
"""

from .fidelity import FidelityResult, fidelity, recovery
from .perplexity import PerplexityResult, perplexity, perplexity_of_documents
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
    "FidelityResult",
    "LoglikelihoodResult",
    "PerplexityResult",
    "TaskResult",
    "TasksResult",
    "evaluate_task",
    "evaluate_tasks",
    "fidelity",
    "load_task",
    "loglikelihood",
    "perplexity",
    "perplexity_of_documents",
    "recovery",
]
