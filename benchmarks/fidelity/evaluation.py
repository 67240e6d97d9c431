"""Phase ``eval`` for one domain: the base row, the fine-tune row, then each variant built and
scored, every result kept as a JSON in the work directory (reused while its settings match). Before
each model it checks the time budget (``--budget-s``) and stops cleanly, to be resumed, rather than
overrun it. A delta against a quantized base is scored on that base (dequantized); a quantized
fine-tune (``*-merged``) is scored as it is; both against the same full-precision fine-tune and
with the same full-precision base's perplexity in their recovery as every other row.

    rc = phase_eval(args, "gsm8k", deadline)     # 0, or EXIT_INCOMPLETE: run the same command again
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import bitdelta
from bitdelta.apply import apply, unapply
from bitdelta.evaluate import recovery
from bitdelta.hf import load_model, load_tokenizer
from bitdelta.report import describe_artifact

from .artifacts import Artifacts, max_present, mean_scale
from .data import calibration, heldout_docs
from .evaluator import Evaluator
from .report import gb_text
from .settings import EXIT_INCOMPLETE, copy_out, eval_settings, log, result_path, run_dir
from .variants import BUILDS, COST


@dataclass
class DomainRun:
    """What one domain's evaluation holds: both models, the texts, the calibration, the scorer."""

    domain: str
    base_dir: Path
    ft_dir: Path
    tok: object
    base: object
    ft: object
    held: list[str]
    cal: object
    ev: Evaluator
    common: dict  # fields every result of this domain carries


class Budget:
    """The ``--budget-s`` guard: a model's expected time is the slowest finished model's time per
    unit of ``COST``, times its own cost, with a 15% margin."""

    def __init__(self, args, domain: str, deadline: float | None):
        self.args, self.domain, self.deadline = args, domain, deadline
        self.durations: list[tuple[str, float]] = []

    def fits(self, name: str) -> bool:
        if self.deadline is None or not self.durations:
            return True
        unit = max(seconds / COST[done] for done, seconds in self.durations)
        if time.perf_counter() + 1.15 * unit * COST[name] <= self.deadline:
            return True
        log(f"INCOMPLETE: stopping before {self.domain}/{name}: it would likely end past --budget-s "
            f"{self.args.budget_s:.0f}. Run the same command again to continue (finished results are kept).")
        return False

    def done(self, name: str, started: float) -> None:
        self.durations.append((name, time.perf_counter() - started))


def load_cached(args, path: Path, domain: str | None) -> dict | None:
    if args.force or not path.is_file():
        return None
    rec = json.loads(path.read_text())
    return rec if rec.get("settings") == eval_settings(args, domain) else None


def save_result(args, path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2))
    copy_out(args, path)


def phase_eval(args, domain: str, deadline: float | None) -> int:
    t_phase = time.perf_counter()
    run = open_domain(args, domain)
    base_common = base_common_scores(args, run)
    budget = Budget(args, domain, deadline)
    base_rec = base_row(args, run, base_common, budget)
    ppl_base, ppl_ft = base_rec["fidelity"]["ppl_student"], base_rec["fidelity"]["ppl_teacher"]
    ft_path = result_path(args, domain, "finetune")
    if load_cached(args, ft_path, domain) is None:
        if not budget.fits("finetune"):
            return EXIT_INCOMPLETE
        finetune_row(args, run, ft_path, base_rec, budget)
    arts = Artifacts(args, domain, run.base, run.ft, run.cal, run.base_dir, run.ft_dir)
    for name in args.variant_list:
        path = result_path(args, domain, name)
        if load_cached(args, path, domain) is not None:
            log(f"  {name}: cached")
            continue
        if not budget.fits(name):
            return EXIT_INCOMPLETE
        variant_row(args, run, arts, name, path, (ppl_base, ppl_ft), budget)
    log(f"eval {domain} done in {time.perf_counter() - t_phase:.1f}s")
    return 0


def open_domain(args, domain: str) -> DomainRun:
    """Loads the base and the domain's fine-tune, the held-out texts and the calibration samples."""
    t_phase = time.perf_counter()
    base_dir, ft_dir = args.work / "base", args.work / "finetunes" / domain
    if not (ft_dir / "config.json").is_file():
        raise SystemExit(f"{ft_dir} does not exist: run --phase prepare --domain {domain} first")
    if (args.work / "prepare.json").is_file():
        copy_out(args, args.work / "prepare.json")
    tok = load_tokenizer(str(ft_dir))
    base = load_model(str(base_dir), dtype="float32", device=args.device)
    ft = load_model(str(ft_dir), dtype="float32", device=args.device)
    held = heldout_docs(args, domain)
    ev = Evaluator(args, tok, ft, held, domain)
    t_cal = time.perf_counter()
    cal = calibration(args, tok, domain, ft)
    log(f"calibration {args.calibration}: {cal.source} ({time.perf_counter() - t_cal:.1f}s)")
    common = {"domain": domain, "settings": eval_settings(args, domain), "device": args.dev.name(),
              "torch": torch.__version__, "bitdelta": bitdelta.__version__, "date": time.strftime("%Y-%m-%d")}
    log(f"eval {domain}: {len(held)} held-out docs, {ev.text_chars:,} WikiText-2 chars, "
        f"tasks {','.join(args.task_list)} (limit {args.task_limit}), "
        f"calibration {len(cal.train)}+{len(cal.heldout)} samples; "
        f"models loaded ({time.perf_counter() - t_phase:.1f}s)")
    return DomainRun(domain, base_dir, ft_dir, tok, base, ft, held, cal, ev, common)


def base_common_scores(args, run: DomainRun) -> dict:
    """The base's domain-independent scores (WikiText-2, tasks), measured once for all domains."""
    common_path = args.work / run_dir(args, "results") / "base__common.json"
    base_common = load_cached(args, common_path, None)
    if base_common is None:
        args.dev.reset_peak()
        scores = run.ev.run(run.base, "base (WikiText-2, tasks)", with_fidelity=False)
        base_common = {**run.common, "domain": None, "settings": eval_settings(args), **scores,
                       "peak_gpu_eval_bytes": args.dev.peak_bytes()}
        save_result(args, common_path, base_common)
    return base_common


def base_row(args, run: DomainRun, base_common: dict, budget: Budget) -> dict:
    """Base row: held-out perplexity and KL / top-1 against the fine-tune on the same tokens."""
    base_path = result_path(args, run.domain, "base")
    base_rec = load_cached(args, base_path, run.domain)
    if base_rec is not None:
        return base_rec
    t = time.perf_counter()
    args.dev.reset_peak()
    scores = run.ev.scores(run.base, ("fidelity", "generation"))
    fid = scores.pop("fidelity")
    base_rec = {**run.common, "model": "base", "kind": "base", "fidelity": fid, "heldout_ppl": fid["ppl_student"],
                "recovery": 0.0, **{k: base_common[k] for k in ("wikitext", "tasks")}, **scores,
                "peak_gpu_eval_bytes": max_present(args.dev.peak_bytes(), base_common.get("peak_gpu_eval_bytes"))}
    save_result(args, base_path, base_rec)
    budget.done("base", t)
    log(f"  base: held-out ppl {fid['ppl_student']:.3f} (fine-tune {fid['ppl_teacher']:.3f}) KL {fid['kl']:.4f} "
        f"top-1 {fid['top1_agreement']:.4f}")
    return base_rec


def finetune_row(args, run: DomainRun, ft_path: Path, base_rec: dict, budget: Budget) -> None:
    t = time.perf_counter()
    args.dev.reset_peak()
    ppl_ft = base_rec["fidelity"]["ppl_teacher"]
    scores = run.ev.run(run.ft, "finetune", with_fidelity=False)
    scores.update(run.ev.generation_scores(run.ft))
    rec = {**run.common, "model": "finetune", "kind": "finetune", "heldout_ppl": ppl_ft, "recovery": 1.0,
           "fidelity": {"kl": 0.0, "top1_agreement": 1.0, "ppl_student": ppl_ft, "ppl_teacher": ppl_ft,
                        "n_tokens": base_rec["fidelity"]["n_tokens"]},
           **scores, "peak_gpu_eval_bytes": args.dev.peak_bytes()}
    save_result(args, ft_path, rec)
    budget.done("finetune", t)


def variant_row(args, run: DomainRun, arts: Artifacts, name: str, path: Path, ppls: tuple, budget: Budget) -> None:
    """Builds (or reuses) the variant's delta, applies it to its base (the quantized one for a delta
    against a quantized base) and scores it."""
    if BUILDS[name].quantized_finetune:
        quantized_finetune_row(args, run, name, path, ppls, budget)
        return
    t = time.perf_counter()
    log(f"{run.domain}/{name}: building")
    delta, build = arts.get(name)
    art = describe_artifact(arts.path(name))
    model = arts.base_model(BUILDS[name])
    args.dev.reset_peak()
    apply(model, delta)
    try:
        scores = run.ev.run(model, name)
    finally:
        unapply(model)
    eval_peak = args.dev.peak_bytes()
    fid = scores["fidelity"]
    rec = {**run.common, "model": name, "kind": "delta", "base_quant": BUILDS[name].base_quant,
           "heldout_ppl": fid["ppl_student"], "recovery": recovery(*ppls, fid["ppl_student"]), **scores,
           "compress_s": round(build["compress_s"], 2), "distill_s": round(build["distill_s"], 2),
           "choose_s": round(build["choose_s"], 2) if "choose_s" in build else None,
           "peak_gpu_build_bytes": build["peak_gpu_bytes"], "peak_gpu_eval_bytes": eval_peak,
           "delta": {k: art[k] for k in ("artifact_bytes", "weight_bytes", "finetuned_fp16_bytes",
                                         "compression_factor", "compression_factor_weights_only", "modes",
                                         "dense_parameters", "compression")},
           "dense_elements": sum(int(v.numel()) for v in delta.dense.values()),
           "mean_first_plane_scale": mean_scale(delta),
           "distillation": delta.info.get("distillation")}
    save_result(args, path, rec)
    budget.done(name, t)
    log(f"  {name}: recovery {rec['recovery']:.2%}, weights {art['weight_bytes'] / 1e6:.2f} MB, "
        f"mean scale {rec['mean_first_plane_scale']:.3g}, compress {build['compress_s']:.1f}s, distill "
        f"{build['distill_s']:.1f}s, peak GPU {gb_text(build['peak_gpu_bytes'])}/{gb_text(eval_peak)} GB build/eval "
        f"({budget.durations[-1][1]:.1f}s for this model)")


def quantized_finetune(ft_dir: Path, scheme: str, device: str):
    """The fine-tune in ``ft_dir`` with every weight a quantized base quantizes (``quantizable_parameters``)
    replaced by ``fake_quantize`` of its stored value: the model a user gets by merging the fine-tune,
    then quantizing it with ``scheme`` (``bitdelta quantize-base`` on it), dequantized."""
    return load_model(str(ft_dir), dtype="float32", device=device, base_quant=scheme)


def quantized_finetune_row(args, run: DomainRun, name: str, path: Path, ppls: tuple, budget: Budget) -> None:
    """A ``*-merged`` row: the quantized fine-tune scored like a delta row, no delta, nothing distilled."""
    t = time.perf_counter()
    scheme = BUILDS[name].quantized_finetune
    args.dev.reset_peak()
    model = quantized_finetune(run.ft_dir, scheme, args.device)
    quantize_s = time.perf_counter() - t
    scores = run.ev.run(model, name)
    del model  # one quantized fine-tune at a time
    fid = scores["fidelity"]
    rec = {**run.common, "model": name, "kind": "quantized-finetune", "finetune_quant": scheme,
           "heldout_ppl": fid["ppl_student"], "recovery": recovery(*ppls, fid["ppl_student"]), **scores,
           "quantize_s": round(quantize_s, 2), "peak_gpu_eval_bytes": args.dev.peak_bytes()}
    save_result(args, path, rec)
    budget.done(name, t)
    log(f"  {name}: recovery {rec['recovery']:.2%} (fine-tune quantized to {scheme} in {quantize_s:.1f}s; "
        f"{budget.durations[-1][1]:.1f}s for this model)")
