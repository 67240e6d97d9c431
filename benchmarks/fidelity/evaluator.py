"""The benchmark's scores of one model (base, fine-tune, or base with a delta applied), measured by
the fidelity suite's :class:`~bitdelta.evaluate.suite.Scorer`: this module only turns the
benchmark's flags into the suite's data and settings, and the suite's scores into the fields of
the benchmark's result JSON ("fidelity", "greedy_agreement", "gsm8k", "wikitext", "tasks",
"eval_times").

    ev = Evaluator(args, tok, ft, heldout_docs(args, "gsm8k"), "gsm8k")
    scores = ev.run(model, "auto")      # {"fidelity", "greedy_agreement", "gsm8k", "wikitext", "tasks", ...}
"""

from __future__ import annotations

from bitdelta.evaluate.suite import PARTS, ModelScores, Scorer, SuiteData, SuiteSettings

from .data import data_domain, gsm8k_test_file, heldout_prompts, wikitext_file
from .settings import log

# The result JSON's name of each part's time (the long text is WikiText-2).
TIME_FIELDS = {"fidelity_s": "fidelity_s", "generation_s": "generation_s", "text_s": "wikitext_s",
               "tasks_s": "tasks_s"}


def suite_settings(args) -> SuiteSettings:
    """The ``--heldout-*``, ``--agree-*``, ``--gsm8k-*``, ``--wikitext-*``, ``--task-limit`` and
    ``--eval-batch`` flags as the suite's settings (generation in batches of 4x, tasks of 2x, WikiText-2
    windows of half ``--eval-batch``)."""
    return SuiteSettings(max_length=args.heldout_max_len, heldout_docs=args.heldout_docs, batch_size=args.eval_batch,
                         generation_batch=args.eval_batch * 4, task_batch=args.eval_batch * 2,
                         text_batch=max(1, args.eval_batch // 2), agree_prompts=args.agree_prompts,
                         agree_tokens=args.agree_tokens, qa_limit=args.gsm8k_limit,
                         qa_new_tokens=args.gsm8k_new_tokens, task_limit=args.task_limit, window=args.wikitext_window,
                         stride=args.wikitext_stride, text_chars=args.wikitext_chars, progress=False)


def suite_data(args, held: list[str], domain: str | None) -> SuiteData:
    """The domain's held-out documents and prompts, GSM8K questions on GSM8K domains, WikiText-2 and
    the ``--tasks``; without a domain, only what does not depend on one (WikiText-2, tasks)."""
    gsm8k = domain is not None and data_domain(domain) == "gsm8k"
    return SuiteData(heldout=held, prompts=heldout_prompts(args, domain) if domain else None,
                     qa=gsm8k_test_file(args) if gsm8k else None, tasks=tuple(args.task_list),
                     tasks_dir=args.data / "tasks", text=wikitext_file(args))


def result_fields(scores: ModelScores, parts: tuple[str, ...]) -> dict:
    """The suite's scores under the benchmark's result names, in the result JSON's order."""
    out = {}
    if "fidelity" in parts:
        out["fidelity"] = scores.fidelity.to_dict()
    if scores.greedy_agreement is not None:
        out["greedy_agreement"] = scores.greedy_agreement.to_dict()
    if scores.answer_accuracy is not None:
        out["gsm8k"] = scores.answer_accuracy
    if "text" in parts:
        out["wikitext"] = scores.text.to_dict()
    if "tasks" in parts:
        out["tasks"] = scores.tasks.to_dict() if scores.tasks is not None else {}
    return out


class Evaluator:
    """Scores models against the domain's fine-tune ``ft`` (see the module docstring); the fine-tune's
    reference generations are made once, the first time a model's generations are compared."""

    def __init__(self, args, tok, ft, held: list[str], domain: str | None = None):
        self.args = args
        self.scorer = Scorer(ft, tok, suite_data(args, held, domain), suite_settings(args), sync=args.dev.sync)

    @property
    def text_chars(self) -> int:
        """Characters of WikiText-2 scored."""
        return len(self.scorer.text)

    def scores(self, model, parts: tuple[str, ...]) -> dict:
        """``parts`` (of the suite's ``PARTS``) of ``model`` as result fields, without their times."""
        return result_fields(self.scorer.score(model, parts), parts)

    def generation_scores(self, model) -> dict:
        """Greedy agreement with the fine-tune; GSM8K answer accuracy on GSM8K domains."""
        return self.scores(model, ("generation",))

    def run(self, model, name: str, with_fidelity: bool = True) -> dict:
        """Every part (without ``with_fidelity``: WikiText-2 and the tasks only), with ``eval_times``."""
        parts = PARTS if with_fidelity else ("text", "tasks")
        scores = self.scorer.score(model, parts)
        out = {**result_fields(scores, parts), "eval_times": {TIME_FIELDS[k]: v for k, v in scores.times.items()}}
        log(f"  {name}: {score_line(out, with_fidelity)}  ({out['eval_times']})")
        return out


def score_line(out: dict, with_fidelity: bool) -> str:
    accs = " ".join(f"{k}={v['acc']:.3f}" for k, v in out["tasks"].items())
    fid = (f"held-out ppl {out['fidelity']['ppl_student']:.3f} KL {out['fidelity']['kl']:.4f} "
           f"top-1 {out['fidelity']['top1_agreement']:.4f}; " if with_fidelity else "")
    if "greedy_agreement" in out:
        fid += f"greedy exact {out['greedy_agreement']['exact_match']:.3f}; "
    if "gsm8k" in out:
        fid += f"GSM8K acc {out['gsm8k']['accuracy']:.3f}; "
    return f"{fid}WikiText-2 ppl {out['wikitext']['ppl']:.3f}; {accs}"
