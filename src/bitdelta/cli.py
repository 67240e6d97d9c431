"""The ``bitdelta`` command: each subcommand parses arguments and calls one library function.

    bitdelta compress --base BASE --finetuned FT --out ft.bitdelta [--scale row] [--bits 2]
    bitdelta inspect ft.bitdelta
    bitdelta merge --base BASE --delta ft.bitdelta --out merged/
    bitdelta import-reference --base BASE --diff diff.pt --out ft.bitdelta
    bitdelta generate --base BASE [--delta ft.bitdelta] --prompt "Once upon a time"
    bitdelta quantize-base BASE --scheme fp8 --out base-fp8/   # then: compress --base base-fp8/ ...

Arguments are checked before any work starts: numbers and sizes by argparse (usage + one error line,
exit 2), output directories (exists without ``--overwrite``, parent not writable) before a model is
loaded. Every user error is printed as one line (``error: ...``) with exit code 2; anything else is a
bug and prints one ``error: internal error: ...`` line with exit code 1. ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from pathlib import Path


# ---------------------------------------------------------------------------------- argument types
# Each raises argparse.ArgumentTypeError, so a bad value is reported by argparse (usage + one line,
# exit 2) while parsing, before any model is loaded.


def _bounds(lo, hi, strict_lo: bool = False) -> str:
    low = f"> {lo}" if strict_lo else f">= {lo}"
    return f"between {lo} and {hi}" if hi is not None else low


def int_range(lo: int, hi: int | None = None):
    """An argparse ``type`` accepting integers in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {_bounds(lo, hi)}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_bounds(lo, hi)} (got {value})")
        return value

    return parse


def float_range(lo: float, hi: float | None = None, strict_lo: bool = False):
    """An argparse ``type`` accepting finite numbers ``>= lo`` (``> lo`` when ``strict_lo``), ``<= hi``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {_bounds(lo, hi, strict_lo)}, got {text!r}") from None
        if (not math.isfinite(value) or value < lo or (strict_lo and value == lo)
                or (hi is not None and value > hi)):
            raise argparse.ArgumentTypeError(f"must be a number {_bounds(lo, hi, strict_lo)} (got {text})")
        return value

    return parse


def shard_size(text: str) -> int:
    """``--max-shard-size``: ``5GB`` / ``500MB`` / ``2GiB`` / bytes, parsed now rather than after compressing."""
    from .artifact import parse_size

    try:
        value = parse_size(text)
    except ValueError:  # also float() of a malformed number such as 1.2.3
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 5GB (got {text!r})")
    return value


def dtype_name(text: str) -> str:
    """A floating-point dtype name (float16, bfloat16, float32, fp16, ...); the name itself is kept."""
    from .compress import parse_dtype
    from .errors import BitDeltaError

    try:
        parse_dtype(text)
    except BitDeltaError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device_name(text: str) -> str:
    """A torch device string (cpu, cuda, cuda:1, mps, ...); whether it exists is checked before the run."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    return text


# ---------------------------------------------------------------------------------- pre-flight checks


def check_output_dir(out, overwrite: bool, artifact: bool = False) -> bool:
    """Raises ``BitDeltaError`` unless ``out`` can be written: it must not exist (an empty directory
    is fine) unless ``overwrite``; with ``artifact``, a non-empty directory that is not a bitdelta
    artifact is never replaced; its nearest existing parent must be a writable directory. Returns
    whether an existing ``out`` may be replaced. Run before any work, so a bad path costs nothing."""
    from .errors import BitDeltaError

    out = Path(out)
    existed = out.exists()
    if existed:
        if not out.is_dir():
            raise BitDeltaError(f"{out} exists and is not a directory; choose another --out")
        if any(out.iterdir()):
            if artifact and not (out / "delta_config.json").is_file():
                raise BitDeltaError(f"{out} exists and is not a bitdelta artifact; choose an empty or new --out")
            if not overwrite:
                raise BitDeltaError(f"{out} already exists; pass --overwrite to replace it")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BitDeltaError(f"cannot create {out}: {parent} is not a directory")
    # the output is written into a sibling temporary directory and renamed: the parent must be writable
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BitDeltaError(f"cannot write {out}: {parent} is not writable; choose another --out or fix its permissions")
    return existed


def check_device(device: str | None) -> None:
    """A CUDA device that this machine does not have is a one-line error now, not a traceback later."""
    if not device or not device.startswith("cuda"):
        return
    import torch

    from .errors import BitDeltaError

    if not torch.cuda.is_available():
        raise BitDeltaError(f"--device {device}: no CUDA device is available here; use --device cpu")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise BitDeltaError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_input_file(path, option: str) -> None:
    from .errors import BitDeltaError

    if not Path(path).is_file():
        why = "a directory, not a file" if Path(path).is_dir() else "no such file"
        raise BitDeltaError(f"{option} {path}: {why}")


def check_text_source(source, option: str) -> None:
    """Calibration/evaluation text: a bare name may be a ``datasets`` id, anything that looks like a
    path (a directory part or a .jsonl/.json/.txt suffix) must be an existing file."""
    path = Path(source)
    if not path.exists() and (path.suffix in (".jsonl", ".json", ".txt") or path.parent != Path(".")):
        check_input_file(source, option)


def check_input_dir(path, option: str) -> None:
    from .errors import BitDeltaError

    if not Path(path).is_dir():
        raise BitDeltaError(f"{option} {path}: no such directory")


def cmd_compress(args) -> None:
    from .cli_settings import compress_settings
    from .compress import compress

    replace = check_output_dir(args.out, args.overwrite, artifact=True)
    check_device(args.device)
    if args.config:
        check_input_file(args.config, "--config")
    settings = compress_settings(args, _given(args))
    ccfg, dcfg = settings.compress, settings.distill
    if dcfg is not None and not dcfg.self_calibrated:
        check_text_source(dcfg.calibration, "--calibration")
    if dcfg is not None and dcfg.self_prompts:
        check_text_source(dcfg.self_prompts, "--self-prompts")
    revisions = dict(base_revision=args.base_revision, finetuned_revision=args.finetuned_revision)
    if dcfg is not None:
        from .pipeline import compress_distilled

        delta = compress_distilled(
            args.base, args.finetuned, compress_config=ccfg, distill_config=dcfg, recipe=settings.recipe,
            device=args.device, teacher_cache=args.teacher_cache, progress=not args.quiet,
            model_dtype=args.model_dtype, **revisions,
        )
    else:
        delta = compress(args.base, args.finetuned, ccfg, progress=not args.quiet, **revisions)
    delta.save_pretrained(args.out, max_shard_size=args.max_shard_size, overwrite=replace)
    _print_inspect(args.out)


def _given(args) -> frozenset[str]:
    """The options the command line set explicitly (``main`` records them); for arguments parsed
    elsewhere, every option whose value differs from its default."""
    given = getattr(args, "given_options", None)
    if given is not None:
        return given
    defaults = vars(build_parser().parse_args([args.command, *_required_placeholders(args.command)]))
    return frozenset(k for k, v in vars(args).items() if k not in defaults or defaults[k] != v)


def _required_placeholders(command: str) -> list[str]:
    return ["--base", "b", "--finetuned", "f", "--out", "o"] if command == "compress" else []


def _print_inspect(path, as_json: bool = False, settings_only: bool = False) -> None:
    from .artifact import read_config
    from .cli_settings import recorded_settings
    from .configs import settings_yaml
    from .report import describe_artifact, format_report

    if settings_only:
        print(settings_yaml(recorded_settings(read_config(Path(path)))), end="")
        return
    info = describe_artifact(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    settings = settings_yaml(recorded_settings(read_config(Path(path))))
    print(format_report(info))
    print("\nsettings (bitdelta compress --config FILE repeats them; inspect --settings prints only these):")
    print("  " + settings.rstrip("\n").replace("\n", "\n  "))


def cmd_inspect(args) -> None:
    _print_inspect(args.path, args.json, args.settings)


def cmd_merge(args) -> None:
    from .apply import merge
    from .artifact import load_delta
    from .hf import load_model, save_model_atomic

    check_output_dir(args.out, args.overwrite)
    check_device(args.device)
    delta = load_delta(args.delta)
    model = load_model(args.base, dtype=args.dtype, device=args.device or "cpu")
    merge(model, delta)
    model.config._name_or_path = delta.finetuned_model_name_or_path
    out = save_model_atomic(model, delta.files, args.out, overwrite=args.overwrite)
    print(f"merged {delta.finetuned_model_name_or_path!r} ({len(delta.modules)} modules) into {out}")


def cmd_quantize_base(args) -> None:
    from .quant import write_quantized_base

    check_output_dir(args.out, args.overwrite)
    info = write_quantized_base(args.base, args.scheme, args.out, overwrite=args.overwrite,
                                max_shard_bytes=args.max_shard_size, progress=not args.quiet)
    print(f"wrote {args.base} quantized to {info['scheme']} ({info['format']}, {info['quantized_tensors']} linear "
          f"weights quantized, {info['kept_tensors']} tensors kept) to {info['out']}: "
          f"{info['bytes_out'] / 1e6:.1f} MB from {info['bytes_in'] / 1e6:.1f} MB")


def cmd_import_reference(args) -> None:
    from .reference_import import import_reference
    from .sources import TOKENIZER_FILE_PATTERNS

    replace = check_output_dir(args.out, args.overwrite, artifact=True)
    check_input_file(args.diff, "--diff")
    if args.tokenizer:
        check_input_dir(args.tokenizer, "--tokenizer")
    delta = import_reference(args.base, args.diff, finetuned_name=args.finetuned_name, progress=not args.quiet)
    if args.tokenizer:
        for pattern in TOKENIZER_FILE_PATTERNS:
            for f in Path(args.tokenizer).glob(pattern):
                if f.is_file():
                    delta.files[f.name] = f.read_bytes()
    delta.save_pretrained(args.out, overwrite=replace)
    _print_inspect(args.out)


def cmd_generate(args) -> None:
    from .apply import apply
    from .artifact import load_delta
    from .hf import generate_text, load_model, load_tokenizer

    check_device(args.device)
    delta = load_delta(args.delta) if args.delta else None  # a bad artifact fails before the base loads
    model = load_model(args.base, dtype=args.dtype, device=args.device)
    if delta is not None:
        apply(model, delta)
    tok = load_tokenizer(args.delta, args.base)
    text = generate_text(model, tok, args.prompt, args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature or 1.0, seed=args.seed)
    print(args.prompt + text)


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
    from pathlib import Path

    from .evaluate import perplexity, perplexity_of_documents

    check_input_file(args.data, "--data")
    model, tok = _model_with_delta(args.model, args.delta, args.dtype, args.device)
    if Path(args.data).suffix == ".jsonl":
        result = perplexity_of_documents(model, tok, _read_docs(args.data), max_length=args.window,
                                         batch_size=args.batch_size)
    else:
        text = Path(args.data).read_text(encoding="utf-8")
        result = perplexity(model, tok, text, window=args.window, stride=args.stride, batch_size=args.batch_size)
    print(json.dumps({"model": args.model, "delta": args.delta, "data": args.data, **result.to_dict()}, indent=2))


def cmd_eval_fidelity(args) -> None:
    from .evaluate import fidelity
    from .hf import load_model

    check_text_source(args.data, "--data")
    student, tok = _model_with_delta(args.base, args.delta, args.dtype, args.device)
    teacher = load_model(args.finetuned, dtype=args.dtype, device=args.device)
    docs = _read_docs(args.data)[: args.limit] if args.limit else _read_docs(args.data)
    result = fidelity(student, teacher, tok, docs, max_length=args.max_length, batch_size=args.batch_size)
    print(json.dumps({"base": args.base, "finetuned": args.finetuned, "delta": args.delta, **result.to_dict()}, indent=2))


def cmd_eval_tasks(args) -> None:
    from .evaluate import evaluate_tasks

    check_input_dir(args.data_dir, "--data-dir")
    model, tok = _model_with_delta(args.model, args.delta, args.dtype, args.device)
    result = evaluate_tasks(model, tok, args.tasks, args.data_dir, limit=args.limit, batch_size=args.batch_size)
    print(json.dumps({"model": args.model, "delta": args.delta, "tasks": result.to_dict()}, indent=2))


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, fidelity to the fine-tune, zero-shot tasks (--delta optional)")
    esub = e.add_subparsers(dest="eval_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--delta", default=None, help="apply this delta artifact to the model first")
    common.add_argument("--dtype", type=dtype_name, default=None)
    common.add_argument("--device", type=device_name, default=None)
    common.add_argument("--batch-size", type=int_range(1), default=8)
    p = esub.add_parser("ppl", parents=[common], help="sliding-window perplexity of a text file (or per-document for .jsonl)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--window", type=int_range(1), default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int_range(1), default=None, help="new tokens scored per window (default: window/2)")
    p.set_defaults(func=cmd_eval_ppl)
    f = esub.add_parser("fidelity", parents=[common], help="KL(ft||delta), top-1 agreement, ppl of both")
    f.add_argument("--base", required=True)
    f.add_argument("--finetuned", required=True)
    f.add_argument("--data", required=True, help=".jsonl (text field) or .txt (blank-line separated documents)")
    f.add_argument("--max-length", type=int_range(1), default=None)
    f.add_argument("--limit", type=int_range(1), default=None)
    f.set_defaults(func=cmd_eval_fidelity)
    t = esub.add_parser("tasks", parents=[common], help="zero-shot multiple choice (llm-foundry JSONL), acc and acc_norm")
    t.add_argument("--model", required=True)
    t.add_argument("--tasks", required=True, help="comma-separated, e.g. arc_easy,piqa,hellaswag,winogrande,lambada_openai")
    t.add_argument("--data-dir", required=True)
    t.add_argument("--limit", type=int_range(1), default=None)
    t.set_defaults(func=cmd_eval_tasks)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .recipes import RECIPES
    from .scale_modes import ScaleMode

    p = argparse.ArgumentParser(prog="bitdelta", description="1-bit fine-tune deltas: compress, inspect, merge, serve.")
    p.add_argument("--version", action="version", version=f"bitdelta {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; errors show their traceback")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a fine-tune against its base into a delta artifact")
    c.add_argument("--base", required=True, help="base model: local directory or hub id")
    c.add_argument("--finetuned", required=True, help="fine-tuned model: local directory or hub id")
    c.add_argument("--out", required=True, help="artifact directory to write (must not exist unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    c.add_argument("--config", default=None, metavar="FILE",
                   help="settings file (.yaml/.yml/.toml) with 'recipe', 'compress' and 'distill' keys, the form "
                        "`bitdelta inspect --settings` prints; flags given explicitly override it")
    c.add_argument("--scale", default=None, choices=[m.value for m in ScaleMode],
                   help="scale granularity of linear layers (embeddings always use per-row scales); default scalar. "
                        "auto distils scalar, row and col scales and keeps per module the mode with the lowest "
                        "KL to the fine-tune on held-out calibration samples")
    c.add_argument("--bits", type=int_range(1, 8), default=1, help="residual sign planes per matrix (default 1)")
    c.add_argument("--dtype", type=dtype_name, default=None, help="dtype of dense extras (default: the fine-tune's)")
    c.add_argument("--target", action="append", help="only compress modules matching these globs/regexes")
    c.add_argument("--exclude", action="append", help="keep modules matching these globs/regexes dense")
    c.add_argument("--dense-embeddings", action="store_true", help="keep embeddings and lm_head dense (reference behaviour)")
    c.add_argument("--max-shard-size", type=shard_size, default="5GB", help="shard delta.safetensors above this size")
    c.add_argument("--base-quant", choices=["int8", "fp8"], default=None,
                   help="compress against the base quantized per output channel (what `bitdelta quantize-base` "
                        "writes): the delta absorbs the quantization error and applies to that quantized base only")
    c.add_argument("--base-revision", default=None)
    c.add_argument("--finetuned-revision", default=None)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d = c.add_argument_group(
        "scale distillation",
        "Runs with --recipe, --distill-steps N, --scale auto, or a --config file naming a recipe or a 'distill' "
        "section. Recipes (all listed under --recipe): 'default' = 200 steps of batch 4 x 128 "
        "tokens (800 samples), MSE on logits, relative lr 3e-2 (AdamW on a multiplier of each initial scale); "
        "'paper' = the BitDelta paper exactly (the same but absolute lr 1e-4, scalar scales). The default used to "
        "be the paper's absolute lr; the relative lr raised 1-bit recovery on every real fine-tune measured "
        "(SmolLM2-135M: GSM8K 98.4 -> 99.3%, Alpaca 99.3 -> 100.1%, Shakespeare 93.2 -> 98.7%; "
        "docs/distillation.md). Flags given explicitly override the recipe; the recipe is recorded in the artifact.")
    d.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="named settings (naming one turns distillation on; default: 'default'): "
                        + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()))
    d.add_argument("--distill-steps", type=int_range(0), default=0,
                   help="train the scales for this many steps (0 = no distillation unless --recipe/--scale auto; "
                        "then the recipe's 200)")
    d.add_argument("--calibration", default=None,
                   help="calibration text: .jsonl (text field), .txt, a datasets name, or 'self': samples the "
                        "fine-tune generates itself (seeded; through its chat template when it has one). With "
                        "--recipe default and no --calibration: self; --recipe paper needs a file")
    d.add_argument("--self-prompts", default=None,
                   help="with --calibration self: a text file whose documents' first sentences are the prompts "
                        "(default: built-in generic prompts)")
    d.add_argument("--distill-lr", type=float_range(0, strict_lo=True), default=None,
                   help="AdamW lr (recipe default 3e-2 relative; paper 1e-4 absolute)")
    d.add_argument("--distill-lr-mode", choices=["absolute", "relative"], default=None,
                   help="absolute (the paper): AdamW steps of about the lr on the scales; relative (the default "
                        "recipe): steps of about the lr times each scale")
    d.add_argument("--distill-batch-size", type=int_range(1), default=None, help="recipe default 4")
    d.add_argument("--num-samples", type=int_range(1), default=None, help="calibration samples (recipe default 800)")
    d.add_argument("--seq-len", type=int_range(1), default=None, help="tokens per calibration sample (recipe default 128)")
    d.add_argument("--heldout-samples", type=int_range(0), default=32, help="held-out samples (loss before/after; auto's choice)")
    d.add_argument("--distill-loss", choices=["mse", "kl"], default=None, help="recipe default mse")
    d.add_argument("--teacher-cache", default=None, help="precompute teacher logits to this file and free the fine-tune")
    d.add_argument("--model-dtype", type=dtype_name, default=None, help="dtype to load the models in for distillation (e.g. bfloat16)")
    d.add_argument("--device", type=device_name, default=None, help="device for distillation (default: cuda if available)")
    d.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="show an artifact's config, modes, sizes and compression factor")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.add_argument("--settings", action="store_true",
                   help="print only the settings the delta records, as a file for `bitdelta compress --config`")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser("merge", help="write base + delta as a normal Hugging Face model directory")
    m.add_argument("--base", required=True)
    m.add_argument("--delta", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", type=dtype_name, default=None, help="load the base in this dtype (default: as stored)")
    m.add_argument("--device", type=device_name, default=None, help="where to merge (default cpu)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing directory at --out")
    m.set_defaults(func=cmd_merge)

    qb = sub.add_parser("quantize-base", help="write a base quantized to INT8/FP8 (compressed-tensors layout) "
                                              "for deltas compressed against it")
    qb.add_argument("base", help="base model: local directory or hub id (unquantized)")
    qb.add_argument("--scheme", required=True, choices=["int8", "fp8"],
                    help="per-output-channel round-to-nearest INT8 or FP8 (e4m3) weights")
    qb.add_argument("--out", required=True, help="model directory to write (must not exist unless --overwrite)")
    qb.add_argument("--overwrite", action="store_true", help="replace an existing directory at --out")
    qb.add_argument("--max-shard-size", type=shard_size, default="5GB", help="shard the weights above this size")
    qb.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    qb.set_defaults(func=cmd_quantize_base)

    r = sub.add_parser("import-reference", help="convert the BitDelta research code's diff.pt")
    r.add_argument("--base", required=True)
    r.add_argument("--diff", required=True)
    r.add_argument("--out", required=True, help="artifact directory to write (must not exist unless --overwrite)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    r.add_argument("--finetuned-name", default=None, help="fine-tune id to record")
    r.add_argument("--tokenizer", default=None, help="directory with the fine-tune's tokenizer files to include")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_import_reference)

    g = sub.add_parser("generate", help="generate text from the base, or base + delta")
    g.add_argument("--base", required=True)
    g.add_argument("--delta", default=None)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int_range(1), default=40)
    g.add_argument("--temperature", type=float_range(0), default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", type=dtype_name, default=None)
    g.add_argument("--device", type=device_name, default=None)
    g.set_defaults(func=cmd_generate)
    _add_eval_parser(sub)
    from .serving.cli import add_serve_parser
    add_serve_parser(sub)
    _add_verbose_everywhere(p)
    return p


def _add_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` is accepted after the subcommand too (``bitdelta compress ... -v``), as error messages suggest it.
    SUPPRESS keeps a subcommand from resetting a ``-v`` given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "-v" not in sub._option_string_actions:
                    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="log at INFO level; errors show their traceback")
                _add_verbose_everywhere(sub)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input was wrong (a path, a file's content, a value), not that bitdelta
    has a bug: bitdelta's own errors, the OS's (missing, unreadable, unwritable, not a directory),
    parse errors (JSON, TOML and unicode errors are ValueErrors), a lookup of something a file lacks."""
    from .errors import BitDeltaError

    return (BitDeltaError, OSError, ValueError, KeyError, EOFError)


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def describe_error(e: BaseException) -> str:
    """The message of ``e`` as one line, naming the file for OS errors."""
    from .errors import BitDeltaError

    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return _one_line(f"{where}: {e.strerror}")
    msg = _one_line(str(e))
    if isinstance(e, (BitDeltaError, OSError)) or type(e) is ValueError:
        return msg or type(e).__name__
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def report_error(e: BaseException, verbose: bool) -> int:
    """Prints ``e`` as one ``error:`` line on stderr (after its traceback with ``verbose``); returns the exit
    code: 2 for a user error, 1 for a bug."""
    if verbose:
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    if isinstance(e, _user_error_types()):
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    hint = "" if verbose else " (run with -v for the traceback)"
    print(f"error: internal error: {type(e).__name__}: {_one_line(str(e))}{hint}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    from .configs import explicit_options

    parser = build_parser()
    args = parser.parse_args(argv)
    args.given_options = explicit_options(parser, sys.argv[1:] if argv is None else argv)  # flags beat --config
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written under the output name", file=sys.stderr)
        return 130
    except Exception as e:  # every failure becomes one line; only -v shows where it came from
        return report_error(e, verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
