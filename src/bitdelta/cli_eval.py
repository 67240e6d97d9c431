"""``bitdelta eval``: perplexity, fidelity to the fine-tune and zero-shot tasks of a base, or base + delta.

    bitdelta eval ppl      --base BASE [--delta d.bitdelta] --data wikitext2_test.txt --window 2048 --stride 512
    bitdelta eval fidelity --base BASE --finetuned FT --delta d.bitdelta --data heldout.jsonl --seq-len 512
    bitdelta eval tasks    --base BASE [--delta d.bitdelta] --tasks arc_easy,piqa --data-dir DIR [--limit 500]

Each prints one JSON object on stdout. ``ppl`` and ``tasks`` took the model as ``--model`` before
``--base`` was the one name of the base in every command; ``--model`` still works, with a note.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_checks import check_device, check_input_dir, check_input_file, check_text_source
from .cli_options import add_base, add_device, add_dtype, add_quiet, int_range


def _model_with_delta(model_path, delta_path, dtype, device):
    from .apply import apply
    from .artifact import load_delta
    from .hf import load_model, load_tokenizer

    check_device(device)
    delta = load_delta(delta_path) if delta_path else None  # a bad artifact fails before the model loads
    model = load_model(model_path, dtype=dtype, device=device)
    if delta is not None:
        apply(model, delta)
    return model, load_tokenizer(delta_path, model_path)


def _read_docs(path) -> list[str]:
    from .calibration import read_texts

    return read_texts(str(path))


def cmd_eval_ppl(args) -> None:
    from .evaluate import perplexity, perplexity_of_documents

    check_input_file(args.data, "--data")
    model, tok = _model_with_delta(args.base, args.delta, args.dtype, args.device)
    if Path(args.data).suffix == ".jsonl":
        result = perplexity_of_documents(model, tok, _read_docs(args.data), max_length=args.window,
                                         batch_size=args.batch_size, progress=not args.quiet)
    else:
        text = Path(args.data).read_text(encoding="utf-8")
        result = perplexity(model, tok, text, window=args.window, stride=args.stride, batch_size=args.batch_size,
                            progress=not args.quiet)
    print(json.dumps({"model": args.base, "delta": args.delta, "data": args.data, **result.to_dict()}, indent=2))


def cmd_eval_fidelity(args) -> None:
    from .evaluate import fidelity
    from .hf import load_model

    check_text_source(args.data, "--data")
    student, tok = _model_with_delta(args.base, args.delta, args.dtype, args.device)
    teacher = load_model(args.finetuned, dtype=args.dtype, device=args.device)
    docs = _read_docs(args.data)[: args.limit] if args.limit else _read_docs(args.data)
    result = fidelity(student, teacher, tok, docs, max_length=args.seq_len, batch_size=args.batch_size,
                      progress=not args.quiet)
    print(json.dumps({"base": args.base, "finetuned": args.finetuned, "delta": args.delta, **result.to_dict()},
                     indent=2))


def cmd_eval_tasks(args) -> None:
    from .evaluate import evaluate_tasks

    check_input_dir(args.data_dir, "--data-dir")
    model, tok = _model_with_delta(args.base, args.delta, args.dtype, args.device)
    result = evaluate_tasks(model, tok, args.tasks, args.data_dir, limit=args.limit, batch_size=args.batch_size,
                            progress=not args.quiet)
    print(json.dumps({"model": args.base, "delta": args.delta, "tasks": result.to_dict()}, indent=2))


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, fidelity to the fine-tune, zero-shot tasks (--delta optional)")
    esub = e.add_subparsers(dest="eval_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--delta", default=None, help="apply this delta artifact to the base first")
    add_dtype(common)
    add_device(common)
    common.add_argument("--batch-size", type=int_range(1), default=8, help="sequences per forward pass (default 8)")
    add_quiet(common)

    p = esub.add_parser("ppl", parents=[common],
                        help="sliding-window perplexity of a text file (or per-document for .jsonl)")
    add_base(p, help="model to evaluate: local directory or hub id (the base, when --delta is given)", former="--model")
    p.add_argument("--data", required=True, help=".txt (one text, sliding windows) or .jsonl (per document)")
    p.add_argument("--window", "--seq-len", type=int_range(1), default=None, metavar="TOKENS",
                   help="tokens per window, or per document for .jsonl (default: the model's context)")
    p.add_argument("--stride", type=int_range(1), default=None, metavar="TOKENS",
                   help="new tokens scored per window (default: window/2)")
    p.set_defaults(func=cmd_eval_ppl)

    f = esub.add_parser("fidelity", parents=[common], help="KL(ft||delta), top-1 agreement, ppl of both")
    add_base(f)
    f.add_argument("--finetuned", required=True, help="fine-tuned model (the teacher): local directory or hub id")
    f.add_argument("--data", required=True, help=".jsonl (text field) or .txt (blank-line separated documents)")
    f.add_argument("--seq-len", "--max-length", dest="seq_len", type=int_range(1), default=None, metavar="TOKENS",
                   help="tokens per document; longer ones are cut (default: the model's context)")
    f.add_argument("--limit", type=int_range(1), default=None, help="evaluate the first N documents only")
    f.set_defaults(func=cmd_eval_fidelity)

    t = esub.add_parser("tasks", parents=[common],
                        help="zero-shot multiple choice (llm-foundry JSONL), acc and acc_norm")
    add_base(t, help="model to evaluate: local directory or hub id (the base, when --delta is given)", former="--model")
    t.add_argument("--tasks", required=True,
                   help="comma-separated, e.g. arc_easy,piqa,hellaswag,winogrande,lambada_openai")
    t.add_argument("--data-dir", required=True, help="directory with one <task>.jsonl per task")
    t.add_argument("--limit", type=int_range(1), default=None, help="evaluate the first N examples of each task")
    t.set_defaults(func=cmd_eval_tasks)
