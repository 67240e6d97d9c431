"""The fidelity benchmark's flags, constants, the run's log, and what a cached result depends on.

    args = parse_args(["--phase", "eval", "--domain", "gsm8k", "--smoke"])
    eval_settings(args, "gsm8k")          # a cached result is reused only if this matches
    result_path(args, "gsm8k", "auto")    # <work>/results[-NAME]/gsm8k__auto.json
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from .._common import REPO, BenchDevice, RunLog
from .variants import VARIANTS

DOMAINS = ("gsm8k", "alpaca", "shakespeare", "gsm8k-hard", "alpaca-hard")
# Fine-tunes that move the weights much further than the default recipe (2 epochs at 3e-5): larger
# deltas, flatter spectra, what a long SFT run produces. Each is checked to beat the base on held-out text.
HARD_RECIPES = {"gsm8k-hard": {"epochs": 8, "lr": 2e-4}, "alpaca-hard": {"epochs": 6, "lr": 2e-4}}
CALIBRATION_KINDS = ("generic", "self", "domain")
MODELS = ("base", "finetune") + VARIANTS
TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande", "lambada_openai")
EXIT_INCOMPLETE = 3

log = RunLog(width=7)  # every line with the seconds since the command started (the --budget-s clock)


def parse_args(argv=None) -> argparse.Namespace:
    from . import __doc__ as package_doc

    ap = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=package_doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    add_finetune_args(ap.add_argument_group("fine-tuning recipe (prepare)"))
    add_distill_args(ap.add_argument_group("distillation (eval; defaults are the paper's)"))
    add_eval_args(ap.add_argument_group("evaluation (eval)"))
    rp = ap.add_argument_group("report")
    rp.add_argument("--results", default=None,
                    help="folder(s) of result JSONs, comma-separated, main run first (default: <work>/results)")
    rp.add_argument("--report-dir", default=None, help="where fidelity.md and the PNGs go (default: --results)")
    rp.add_argument("--update-doc", default=None, help="replace the fidelity section of this markdown file")
    args = ap.parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    if args.budget_s is None:
        args.budget_s = 0.0 if args.smoke else 540.0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dev = BenchDevice(args.device)
    args.data = Path(args.data) if args.data else default_data_dir()
    args.work = Path(args.work)
    args.domains = [d for d in (args.domain or ",".join(DOMAINS)).split(",") if d]
    args.variant_list = [v for v in args.variants.split(",") if v]
    args.task_list = [t for t in args.tasks.split(",") if t]
    for d in args.domains:
        if d not in DOMAINS:
            ap.error(f"unknown domain {d!r}; choose from {', '.join(DOMAINS)}")
    for v in args.variant_list:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return args


def add_run_args(ap) -> None:
    ap.add_argument("--phase", required=True, choices=["prepare", "eval", "report", "all"])
    ap.add_argument("--work", default="/tmp/fid", help="work directory shared by the phases")
    ap.add_argument("--out", default=None, help="also copy every result JSON here")
    ap.add_argument("--data", default=None, help="shared data dir (default: ../shared/data beside the repo)")
    ap.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct GGUF file (prepare)")
    ap.add_argument("--gguf-wheel", default=None,
                    help="the gguf package's wheel, imported from the zip when gguf is not installed "
                         "(offline machines)")
    ap.add_argument("--base-dir", default=None, help="use this Hugging Face model dir as the base instead of --gguf")
    ap.add_argument("--domain", default=None, help="prepare, eval: comma-separated domains (default: all of "
                    + ",".join(DOMAINS) + ")")
    ap.add_argument("--run-name", default="",
                    help="results go to <work>/results-NAME and artifacts to <work>/artifacts-NAME (one name per "
                         "setting, e.g. self, so settings never overwrite each other); default results/, artifacts/")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="eval: comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny budgets everywhere: proves the phases run (CPU, minutes)")
    ap.add_argument("--force", action="store_true",
                    help="recompute results and artifacts that are already in --work")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="eval: stop before a model that would end past this many seconds of the command "
                         "(default 540, none with --smoke; 0 = no limit)")


def add_finetune_args(ft) -> None:
    ft.add_argument("--ft-lr", type=float, default=3e-5)
    ft.add_argument("--ft-epochs", type=int, default=2)
    ft.add_argument("--ft-seq-len", type=int, default=512)
    ft.add_argument("--ft-batch", type=int, default=16)
    ft.add_argument("--ft-warmup", type=float, default=0.05, help="fraction of steps of linear warmup")
    ft.add_argument("--ft-min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --ft-lr")
    ft.add_argument("--ft-max-tokens", type=int, default=None, help="cap on training tokens per fine-tune")
    ft.add_argument("--ft-max-docs", type=int, default=None, help="use only this many training documents")
    ft.add_argument("--log-every", type=int, default=25)


def add_distill_args(ds) -> None:
    ds.add_argument("--distill-steps", type=int, default=200)
    ds.add_argument("--distill-lr", type=float, default=1e-4)
    ds.add_argument("--distill-lr-mode", choices=["absolute", "relative"], default="absolute",
                    help="relative: lr is a step relative to each scale (distill_scales' lr_mode); the "
                         "reference recipe always trains absolute, as the original")
    ds.add_argument("--distill-batch", type=int, default=4)
    ds.add_argument("--cal-samples", type=int, default=800)
    ds.add_argument("--cal-seq-len", type=int, default=128)
    ds.add_argument("--cal-heldout", type=int, default=64, help="held-out samples (validation.jsonl for generic) for "
                    "the guard and auto's choice")
    ds.add_argument("--calibration", choices=CALIBRATION_KINDS, default="generic",
                    help="generic: calibration.jsonl (the paper's setting); self: samples generated by the fine-tune "
                         "from first sentences of calibration.jsonl; domain: the domain's training documents")


def add_eval_args(ev) -> None:
    ev.add_argument("--tasks", default=",".join(TASKS))
    ev.add_argument("--task-limit", type=int, default=500, help="examples per task")
    ev.add_argument("--heldout-docs", type=int, default=500, help="held-out domain documents scored")
    ev.add_argument("--heldout-max-len", type=int, default=512, help="tokens per held-out document")
    ev.add_argument("--wikitext-window", type=int, default=1024)
    ev.add_argument("--wikitext-stride", type=int, default=512)
    ev.add_argument("--wikitext-chars", type=int, default=None, help="score only the first N characters")
    ev.add_argument("--eval-batch", type=int, default=16)
    ev.add_argument("--agree-prompts", type=int, default=100, help="held-out prompts for greedy-generation agreement")
    ev.add_argument("--agree-tokens", type=int, default=32, help="generated tokens compared per prompt")
    ev.add_argument("--gsm8k-limit", type=int, default=250, help="GSM8K test questions for answer accuracy")
    ev.add_argument("--gsm8k-new-tokens", type=int, default=256)
    ev.add_argument("--tf32", action="store_true",
                    help="TF32 matmuls for distillation and evaluation (faster; rounds weights to 10-bit mantissas)")


def apply_smoke(args) -> None:
    """Budgets small enough for a 2-core CPU; every code path still runs."""
    args.ft_seq_len, args.ft_batch, args.ft_epochs = 64, 2, 1
    args.ft_max_tokens, args.ft_max_docs, args.log_every = 3 * 2 * 64, 60, 1
    args.distill_steps, args.cal_samples, args.cal_seq_len, args.cal_heldout = 3, 12, 32, 4
    args.task_limit, args.heldout_docs, args.heldout_max_len = 4, 4, 64
    args.agree_prompts, args.agree_tokens, args.gsm8k_limit, args.gsm8k_new_tokens = 3, 4, 3, 8
    args.wikitext_window, args.wikitext_stride, args.wikitext_chars = 64, 32, 1500
    args.eval_batch = 4


def default_data_dir() -> Path:
    for candidate in (REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "data"


def setup_torch(args) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load would drown the log
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # Exact fp32 by default: TF32 rounds W_base, W_ft and W_base + Δ̂ to 10-bit mantissas, an error of
    # a few percent of the deltas whose fidelity is being measured.
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32


def eval_settings(args, domain: str | None = None) -> dict:
    """Everything a cached result depends on: a result is reused only if these match, including
    when the base and the domain's fine-tune were written (a new prepare invalidates them)."""
    keys = ["seed", "smoke", "distill_steps", "distill_lr", "distill_batch", "cal_samples", "cal_seq_len",
            "cal_heldout", "task_limit", "heldout_docs", "heldout_max_len", "wikitext_window", "wikitext_stride",
            "wikitext_chars", "tf32"]
    out = {k: getattr(args, k) for k in keys}
    if args.distill_lr_mode != "absolute":  # recorded only when set, so earlier results stay valid
        out["distill_lr_mode"] = args.distill_lr_mode
    if args.calibration != "generic":
        out["calibration"] = args.calibration
    for k in ("agree_prompts", "agree_tokens", "gsm8k_limit", "gsm8k_new_tokens"):
        out[k] = getattr(args, k)
    out["tasks"] = list(args.task_list)
    models = {"base": args.work / "base"}
    if domain:
        models["finetune"] = args.work / "finetunes" / domain
    for name, folder in models.items():
        cfg = folder / "config.json"
        out[f"{name}_written_ns"] = cfg.stat().st_mtime_ns if cfg.is_file() else None
    return out


def run_dir(args, kind: str) -> str:
    """``results``/``artifacts``, or ``results-NAME``/``artifacts-NAME`` with ``--run-name NAME``."""
    return f"{kind}-{args.run_name}" if args.run_name else kind


def result_path(args, domain: str, model: str) -> Path:
    return args.work / run_dir(args, "results") / f"{domain}__{model}.json"


def copy_out(args, path: Path) -> None:
    """Copies a result file to ``--out`` as well (when given)."""
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / path.name)
