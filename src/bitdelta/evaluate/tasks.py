"""Zero-shot multiple-choice and LAMBADA scoring of the llm-foundry JSONL task files.

Scoring follows lm-evaluation-harness. Each candidate is a (context, continuation) pair; its score
is the sum of the continuation tokens' log-probabilities given the context. Trailing whitespace of
the context moves to the continuation, and the continuation's tokens are those of
``encode(context + continuation)`` after the context's, so " word" tokenizes as the model saw it.

Formats (``<data_dir>/<task>.jsonl``):
  * ``{"query", "choices", "gold"}``: context ``query + delimiter``, one continuation per choice.
    ``acc`` picks the largest sum; ``acc_norm`` the largest sum divided by the choice's character
    length.
  * ``{"context_options", "continuation", "gold"}`` (winogrande): the shared continuation scored
    under each context option; ``acc`` only (its length is the same for every option).
  * ``{"context", "continuation"}`` (lambada_openai): correct when every continuation token is the
    model's argmax (greedy decoding yields the whole last word); also the continuation perplexity.

Delimiters reproduce lm-evaluation-harness prompts on this data: ARC and BoolQ queries get
``"\\nAnswer: "`` ("Question: ...\\nAnswer: <choice>"), PIQA queries already end in a newline and get
``"Answer: "``, every other task a single space. Pass ``delimiters={...}`` to change them.

    r = evaluate_tasks(model, tok, ["arc_easy", "piqa", "winogrande", "lambada_openai"],
                       "../shared/data/tasks", limit=500, batch_size=16)
    print(r.to_dict())
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ._common import encode, forward_logits, model_device, model_max_length, pad_right, resolve_add_bos

MULTIPLE_CHOICE = "multiple_choice"
SCHEMA = "schema"
LANGUAGE_MODELING = "language_modeling"

# task name -> (format, delimiter between query/context and choice/continuation)
TASKS: dict[str, tuple[str, str]] = {
    "arc_easy": (MULTIPLE_CHOICE, "\nAnswer: "),
    "arc_challenge": (MULTIPLE_CHOICE, "\nAnswer: "),
    "boolq": (MULTIPLE_CHOICE, "\nAnswer: "),
    "piqa": (MULTIPLE_CHOICE, "Answer: "),
    "hellaswag": (MULTIPLE_CHOICE, " "),
    "openbook_qa": (MULTIPLE_CHOICE, " "),
    "copa": (MULTIPLE_CHOICE, " "),
    "winogrande": (SCHEMA, " "),
    "lambada_openai": (LANGUAGE_MODELING, " "),
}


@dataclass
class LoglikelihoodResult:
    """Score of one continuation: summed log-probability (nats), whether every continuation token
    is the argmax, and how many tokens were scored."""

    logprob: float
    is_greedy: bool
    n_tokens: int


@dataclass
class TaskResult:
    """Accuracy on ``n`` examples of one task. ``acc_norm`` is None for winogrande and LAMBADA,
    ``ppl`` (per-example continuation perplexity, as lm-evaluation-harness) only for LAMBADA."""

    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    ppl: float | None = None
    format: str = MULTIPLE_CHOICE
    delimiter: str = " "

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TasksResult:
    """Results of ``evaluate_tasks``, keyed by task name in the order asked."""

    results: dict[str, TaskResult] = field(default_factory=dict)

    def __getitem__(self, task: str) -> TaskResult:
        return self.results[task]

    def to_dict(self) -> dict:
        return {name: r.to_dict() for name, r in self.results.items()}


def _stderr(acc: float, n: int) -> float:
    return math.sqrt(acc * (1.0 - acc) / (n - 1)) if n > 1 else float("nan")


def _encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the way lm-evaluation-harness splits them."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = encode(tokenizer, context + continuation, False)
    ctx = encode(tokenizer, context, False)
    cont = whole[len(ctx) :]
    if not cont:  # the tokenizer merged the boundary away; score the continuation on its own
        cont = encode(tokenizer, continuation, False)
    if add_bos:
        ctx = [tokenizer.bos_token_id] + ctx
    if not ctx:  # nothing to condition on: use EOS as the prefix, as lm-evaluation-harness does
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        if prefix is None:
            raise ValueError("empty context and the tokenizer has neither BOS nor EOS to condition on")
        ctx = [prefix]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


def loglikelihood(
    model: torch.nn.Module,
    tokenizer,
    requests: list[tuple[str, str]],  # (context, continuation)
    batch_size: int = 16,
    max_length: int | None = None,
    add_bos: bool | None = None,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[LoglikelihoodResult]:
    """Sum of log p(continuation tokens | context) for each request, in the order given.

    Requests are sorted by length and run ``batch_size`` at a time, right-padded. A sequence longer
    than ``max_length`` (default: the model's) is truncated from the left, context first.
    """
    max_length = int(max_length or model_max_length(model, tokenizer))
    bos = resolve_add_bos(tokenizer, add_bos)
    inputs, conts = [], []
    for context, continuation in requests:
        ctx, cont = _encode_pair(tokenizer, context, continuation, bos)
        full = ctx + cont
        inp = full[:-1][-max_length:]  # the last token is only a target
        if len(cont) > len(inp):
            warnings.warn(
                f"continuation of {len(cont)} tokens does not fit max_length={max_length}; "
                f"scoring its last {len(inp)} tokens",
                stacklevel=2,
            )
            cont = cont[-len(inp) :]
        inputs.append(inp)
        conts.append(cont)

    device = model_device(model)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    results: list[LoglikelihoodResult | None] = [None] * len(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = range(0, len(order), batch_size)
            for b in tqdm(batches, desc=desc, disable=not progress):
                idx = order[b : b + batch_size]
                ids, mask = pad_right([inputs[i] for i in idx], device)
                logits = forward_logits(model, ids, mask)
                for row, i in enumerate(idx):
                    n, k = len(inputs[i]), len(conts[i])
                    logp = torch.log_softmax(logits[row, n - k : n].float(), dim=-1)  # [k, V]
                    target = torch.tensor(conts[i], device=logp.device)
                    total = logp.gather(-1, target[:, None]).sum().item()
                    greedy = bool((logp.argmax(-1) == target).all().item())
                    results[i] = LoglikelihoodResult(logprob=total, is_greedy=greedy, n_tokens=k)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def load_task(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` rows (all by default) of a JSONL task file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _infer_format(row: dict) -> str:
    keys = set(row)
    if {"query", "choices", "gold"} <= keys:
        return MULTIPLE_CHOICE
    if {"context_options", "continuation", "gold"} <= keys:
        return SCHEMA
    if {"context", "continuation"} <= keys:
        return LANGUAGE_MODELING
    raise ValueError(
        f"unknown task row keys {sorted(keys)}; expected query/choices/gold, "
        "context_options/continuation/gold or context/continuation"
    )


def evaluate_task(
    model: torch.nn.Module,
    tokenizer,
    task: str,
    data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    delimiter: str | None = None,
    max_length: int | None = None,
    add_bos: bool | None = None,
    progress: bool = True,
) -> TaskResult:
    """Score one task from ``<data_dir>/<task>.jsonl`` (a task not in ``TASKS`` has its format
    inferred from its keys and a space delimiter)."""
    path = Path(data_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no task file {path}; known tasks: {', '.join(TASKS)}")
    rows = load_task(path, limit)
    if not rows:
        raise ValueError(f"{path} has no examples")
    fmt = _infer_format(rows[0])
    if delimiter is None:
        delimiter = TASKS[task][1] if task in TASKS else " "

    requests: list[tuple[str, str]] = []
    if fmt == MULTIPLE_CHOICE:
        for r in rows:
            requests += [(r["query"] + delimiter, c) for c in r["choices"]]
    elif fmt == SCHEMA:
        for r in rows:
            requests += [(c + delimiter, r["continuation"]) for c in r["context_options"]]
    else:
        requests = [(r["context"] + delimiter, r["continuation"]) for r in rows]

    scores = loglikelihood(
        model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
        add_bos=add_bos, progress=progress, desc=task,
    )
    n = len(rows)
    if fmt == LANGUAGE_MODELING:
        acc = sum(s.is_greedy for s in scores) / n
        ppl = math.exp(-sum(s.logprob for s in scores) / n)
        return TaskResult(task, n, acc, _stderr(acc, n), ppl=ppl, format=fmt, delimiter=delimiter)

    correct = correct_norm = 0
    pos = 0
    for r in rows:
        options = r["choices"] if fmt == MULTIPLE_CHOICE else r["context_options"]
        lls = [s.logprob for s in scores[pos : pos + len(options)]]
        pos += len(options)
        gold = int(r["gold"])
        correct += _argmax(lls) == gold
        if fmt == MULTIPLE_CHOICE:
            normed = [ll / max(1, len(c)) for ll, c in zip(lls, options)]
            correct_norm += _argmax(normed) == gold
    acc = correct / n
    if fmt == SCHEMA:
        return TaskResult(task, n, acc, _stderr(acc, n), format=fmt, delimiter=delimiter)
    acc_norm = correct_norm / n
    return TaskResult(
        task, n, acc, _stderr(acc, n), acc_norm=acc_norm, acc_norm_stderr=_stderr(acc_norm, n),
        format=fmt, delimiter=delimiter,
    )


def _argmax(values: list[float]) -> int:
    """Index of the largest value; the first on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str] | str,
    data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    delimiters: dict[str, str] | None = None,
    max_length: int | None = None,
    add_bos: bool | None = None,
    progress: bool = True,
) -> TasksResult:
    """Score several tasks (a list, or a comma-separated string) from ``data_dir``.

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        tasks: names of ``<data_dir>/<name>.jsonl`` files, e.g. ``["arc_easy", "piqa"]``.
        data_dir: folder of llm-foundry JSONL files (``../shared/data/tasks``).
        limit: score only the first ``limit`` examples of each task.
        batch_size: sequences per forward.
        delimiters: per-task overrides of ``TASKS``' delimiters.
        max_length: longest input; longer ones lose context from the left. Default: the model's.
        add_bos: prepend BOS; default what the tokenizer does.
        progress: show tqdm bars.
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    delimiters = delimiters or {}
    out = TasksResult()
    for task in tasks:
        out.results[task] = evaluate_task(
            model, tokenizer, task, data_dir, limit=limit, batch_size=batch_size,
            delimiter=delimiters.get(task), max_length=max_length, add_bos=add_bos, progress=progress,
        )
    return out
