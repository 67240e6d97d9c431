"""Scores one model (base, fine-tune, or base with a delta applied) on everything measured: fidelity
to the fine-tune on held-out domain text (perplexity, KL, top-1), greedy-generation agreement, GSM8K
answer accuracy (GSM8K domains), WikiText-2 perplexity and the zero-shot tasks.

    ev = Evaluator(args, tok, ft, heldout_docs(args, "gsm8k"), wikitext(args), "gsm8k")
    scores = ev.run(model, "auto")      # {"fidelity", "greedy_agreement", "gsm8k", "wikitext", "tasks", ...}
"""

from __future__ import annotations

import time

from bitdelta.evaluate import (answer_accuracy, compare_generations, evaluate_tasks, fidelity, greedy_generations,
                               gsm8k_answer, perplexity)

from .data import data_domain, gsm8k_rows, heldout_prompts
from .settings import log


class Evaluator:
    def __init__(self, args, tok, ft, held: list[str], text: str, domain: str | None = None):
        self.args, self.tok, self.ft, self.held, self.text = args, tok, ft, held, text
        self.domain = domain
        self.prompts = heldout_prompts(args, domain) if domain else []
        self._reference = None

    def reference(self) -> list[list[int]]:
        """The fine-tune's greedy generations on the held-out prompts, computed once."""
        if self._reference is None:
            self._reference = greedy_generations(self.ft, self.tok, self.prompts, self.args.agree_tokens,
                                                 batch_size=self.args.eval_batch * 4)
        return self._reference

    def generation_scores(self, model) -> dict:
        """Greedy agreement with the fine-tune; GSM8K answer accuracy on GSM8K domains."""
        a, out = self.args, {}
        if self.prompts:
            mine = greedy_generations(model, self.tok, self.prompts, a.agree_tokens, batch_size=a.eval_batch * 4)
            out["greedy_agreement"] = compare_generations(mine, self.reference(), a.agree_tokens).to_dict()
        if self.domain and data_domain(self.domain) == "gsm8k":
            rows = gsm8k_rows(a)
            out["gsm8k"] = answer_accuracy(model, self.tok, [f"Question: {r['question']}\nAnswer:" for r in rows],
                                           [r["answer"] for r in rows], extract=gsm8k_answer,
                                           max_new_tokens=a.gsm8k_new_tokens, batch_size=a.eval_batch * 4)
        return out

    def run(self, model, name: str, with_fidelity: bool = True) -> dict:
        a = self.args
        out, times = {}, {}
        t = time.perf_counter()
        if with_fidelity:
            r = fidelity(model, self.ft, self.tok, self.held, max_length=a.heldout_max_len, batch_size=a.eval_batch,
                         progress=False)
            out["fidelity"] = r.to_dict()
            times["fidelity_s"] = self._lap(t)
            t = time.perf_counter()
            out.update(self.generation_scores(model))
            times["generation_s"] = self._lap(t)
            t = time.perf_counter()
        window = min(a.wikitext_window, int(getattr(model.config, "max_position_embeddings", a.wikitext_window)))
        stride = min(a.wikitext_stride, window)
        out["wikitext"] = perplexity(model, self.tok, self.text, window=window, stride=stride,
                                     batch_size=max(1, a.eval_batch // 2), progress=False).to_dict()
        times["wikitext_s"] = self._lap(t)
        t = time.perf_counter()
        tasks = evaluate_tasks(model, self.tok, a.task_list, a.data / "tasks", limit=a.task_limit,
                               batch_size=a.eval_batch * 2, progress=False)
        out["tasks"] = tasks.to_dict()
        times["tasks_s"] = self._lap(t)
        out["eval_times"] = times
        log(f"  {name}: {score_line(out, with_fidelity)}  ({times})")
        return out

    def _lap(self, t: float) -> float:
        self.args.dev.sync()
        return round(time.perf_counter() - t, 2)


def score_line(out: dict, with_fidelity: bool) -> str:
    accs = " ".join(f"{k}={v['acc']:.3f}" for k, v in out["tasks"].items())
    fid = (f"held-out ppl {out['fidelity']['ppl_student']:.3f} KL {out['fidelity']['kl']:.4f} "
           f"top-1 {out['fidelity']['top1_agreement']:.4f}; " if with_fidelity else "")
    if "greedy_agreement" in out:
        fid += f"greedy exact {out['greedy_agreement']['exact_match']:.3f}; "
    if "gsm8k" in out:
        fid += f"GSM8K acc {out['gsm8k']['accuracy']:.3f}; "
    return f"{fid}WikiText-2 ppl {out['wikitext']['ppl']:.3f}; {accs}"
