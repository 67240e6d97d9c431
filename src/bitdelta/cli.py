"""The ``bitdelta`` command: each subcommand parses arguments and calls one library function.

    bitdelta compress --base BASE --finetuned FT --out ft.bitdelta [--scale row] [--bits 2] [--recipe default]
    bitdelta inspect ft.bitdelta [--json | --settings]
    bitdelta merge --base BASE --delta ft.bitdelta --out merged/
    bitdelta quantize-base --base BASE --scheme fp8 --out base-fp8/   # then: compress --base base-fp8/ ...
    bitdelta import-reference --base BASE --diff diff.pt --out ft.bitdelta
    bitdelta generate --base BASE [--delta ft.bitdelta] --prompt "Once upon a time"
    bitdelta eval ppl|fidelity|tasks --base BASE [--delta ft.bitdelta] ...   (cli_eval.py)
    bitdelta serve --base BASE --delta NAME=ft.bitdelta ...                    (serving/cli.py)

One grammar (``cli_options.py``): ``--base`` is the base wherever one is loaded, ``--dtype`` the dtype
it loads in, ``--device`` defaults to cuda if available, else cpu, every command that writes refuses
an existing ``--out`` without ``--overwrite``, every long command draws progress bars that ``-q``
silences. Former flag names keep working and print a one-line note after the command succeeds.

Arguments are checked before any work starts: numbers and sizes by argparse (usage + one error line,
exit 2), output directories (exists without ``--overwrite``, parent not writable) before a model is
loaded (``cli_checks.py``). Every user error is printed as one line (``error: ...``) with exit code 2;
anything else is a bug and prints one ``error: internal error: ...`` line with exit code 1. ``-v``
adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from .cli_checks import (
    check_device,
    check_input_dir,
    check_input_file,
    check_output_dir,
    check_output_file,
    check_text_source,
)
from .cli_options import (
    NOTES,
    add_base,
    add_device,
    add_dtype,
    add_output,
    add_quiet,
    dtype_name,
    float_range,
    int_range,
    library_progress_bars,
    note,
    shard_size,
)
from .cli_options import device_name as device_name  # serving/config.py reads the flag types from this module

COMPRESS_DTYPE_NOTE = ("compress --dtype is the dtype the models load in; for this release it also sets the dense "
                       "extras' dtype, which --extras-dtype sets alone")


def cmd_compress(args) -> None:
    from .cli_settings import compress_settings
    from .compress import compress

    replace = check_output_dir(args.out, args.overwrite, artifact=True)
    check_device(args.device)
    if args.config:
        check_input_file(args.config, "--config")
    if args.teacher_cache:
        check_output_file(args.teacher_cache, args.overwrite, "--teacher-cache")
    given = _given(args)
    settings = compress_settings(args, given)
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
            model_dtype=args.dtype or args.model_dtype, **revisions,
        )
    else:
        delta = compress(args.base, args.finetuned, ccfg, progress=not args.quiet, **revisions)
    delta.save_pretrained(args.out, max_shard_size=args.max_shard_size, overwrite=replace)
    _print_inspect(args.out)
    if "dtype" in given and "extras_dtype" not in given:
        note(args, COMPRESS_DTYPE_NOTE)


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
    model = load_model(args.base, dtype=args.dtype, device=args.device)
    merge(model, delta, progress=not args.quiet)
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


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .cli_eval import add_eval_parser
    from .serving.cli import add_serve_parser

    p = argparse.ArgumentParser(prog="bitdelta", description="1-bit fine-tune deltas: compress, inspect, merge, "
                                                             "evaluate, serve.")
    p.add_argument("--version", action="version", version=f"bitdelta {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; errors show their traceback")
    sub = p.add_subparsers(dest="command", required=True)
    _add_compress_parser(sub)

    i = sub.add_parser("inspect", help="show an artifact's config, modes, sizes and compression factor")
    i.add_argument("path", help="artifact directory (with delta_config.json)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--settings", action="store_true",
                   help="print only the settings the delta records, as a file for `bitdelta compress --config`")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser("merge", help="write base + delta as a normal Hugging Face model directory")
    add_base(m)
    m.add_argument("--delta", required=True, help="delta artifact directory (or hub id) to merge into the base")
    add_output(m, "model directory")
    add_dtype(m, help="load the base in this dtype, which the merged model is written in (default: as stored)")
    add_device(m, "where to merge")
    add_quiet(m)
    m.set_defaults(func=cmd_merge)

    qb = sub.add_parser("quantize-base", help="write a base quantized to INT8/FP8 (compressed-tensors layout) "
                                              "for deltas compressed against it")
    group = qb.add_mutually_exclusive_group(required=True)
    group.add_argument("--base", help="base model: local directory or hub id (unquantized); "
                                      "`quantize-base BASE` is accepted too")
    group.add_argument("base", nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    qb.add_argument("--scheme", required=True, choices=["int8", "fp8"],
                    help="per-output-channel round-to-nearest INT8 or FP8 (e4m3) weights")
    add_output(qb, "model directory")
    qb.add_argument("--max-shard-size", type=shard_size, default="5GB", help="shard the weights above this size")
    add_quiet(qb)
    qb.set_defaults(func=cmd_quantize_base)

    r = sub.add_parser("import-reference", help="convert the BitDelta research code's diff.pt")
    add_base(r, help="the base the diff was made against: local directory or hub id")
    r.add_argument("--diff", required=True, help="the research code's diff.pt")
    add_output(r, "artifact directory")
    r.add_argument("--finetuned-name", default=None, help="fine-tune id to record")
    r.add_argument("--tokenizer", default=None, help="directory with the fine-tune's tokenizer files to include")
    add_quiet(r)
    r.set_defaults(func=cmd_import_reference)

    g = sub.add_parser("generate", help="generate text from the base, or base + delta")
    add_base(g)
    g.add_argument("--delta", default=None, help="apply this delta artifact to the base first")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int_range(1), default=40, help="tokens to generate (default 40)")
    g.add_argument("--temperature", type=float_range(0), default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_dtype(g)
    add_device(g)
    add_quiet(g)
    g.set_defaults(func=cmd_generate)
    add_eval_parser(sub)
    add_serve_parser(sub)
    _add_verbose_everywhere(p)
    return p


def _add_compress_parser(sub) -> None:
    from .recipes import RECIPES
    from .scale_modes import ScaleMode

    c = sub.add_parser("compress", help="compress a fine-tune against its base into a delta artifact")
    add_base(c)
    c.add_argument("--finetuned", required=True, help="fine-tuned model: local directory or hub id")
    add_output(c, "artifact directory")
    c.add_argument("--config", default=None, metavar="FILE",
                   help="settings file (.yaml/.yml/.toml) with 'recipe', 'compress' and 'distill' keys, the form "
                        "`bitdelta inspect --settings` prints; flags given explicitly override it")
    c.add_argument("--scale", default=None, choices=[m.value for m in ScaleMode],
                   help="scale granularity of linear layers (embeddings always use per-row scales); default scalar. "
                        "auto distils scalar, row and col scales and keeps per module the mode with the lowest "
                        "KL to the fine-tune on held-out calibration samples")
    c.add_argument("--bits", type=int_range(1, 8), default=1, help="residual sign planes per matrix (default 1)")
    c.add_argument("--lowrank-budget", type=float_range(0, 64, strict_lo=True), default=None, metavar="X",
                   help="add a low-rank correction of the sign planes' residual with X times the bytes of one sign "
                        "plane (1.0: the bytes of one more plane), ranks chosen per matrix by residual energy per "
                        "byte; stored in float16, fixed during scale distillation")
    c.add_argument("--lowrank-rank", type=int_range(1, 4096), default=None, metavar="R",
                   help="add a rank-R correction of the sign planes' residual to every matrix (instead of "
                        "--lowrank-budget)")
    add_dtype(c, former="--model-dtype", former_dest="model_dtype",
              help="dtype to load the models in for distillation (default: as stored). For this release it also "
                   "sets the dense extras' dtype unless --extras-dtype is given (before, that was its only meaning)")
    c.add_argument("--extras-dtype", type=dtype_name, default=None,
                   help="dtype of the dense extras: norms, biases, kept modules (default: the fine-tune's); "
                        "the settings file's compress.dtype")
    c.add_argument("--target", action="append", help="only compress modules matching these globs/regexes")
    c.add_argument("--exclude", action="append", help="keep modules matching these globs/regexes dense")
    c.add_argument("--dense-embeddings", action="store_true",
                   help="keep embeddings and lm_head dense (reference behaviour)")
    c.add_argument("--max-shard-size", type=shard_size, default="5GB", help="shard delta.safetensors above this size")
    c.add_argument("--base-quant", choices=["int8", "fp8"], default=None,
                   help="compress against the base quantized per output channel (what `bitdelta quantize-base` "
                        "writes): the delta absorbs the quantization error and applies to that quantized base only")
    c.add_argument("--base-revision", default=None, help="hub revision (branch, tag or commit) of --base")
    c.add_argument("--finetuned-revision", default=None, help="hub revision (branch, tag or commit) of --finetuned")
    add_quiet(c)
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
    d.add_argument("--seq-len", type=int_range(1), default=None, metavar="TOKENS",
                   help="tokens per calibration sample (recipe default 128)")
    d.add_argument("--heldout-samples", type=int_range(0), default=32,
                   help="held-out samples (loss before/after; auto's choice)")
    d.add_argument("--distill-loss", choices=["mse", "kl"], default=None, help="recipe default mse")
    d.add_argument("--teacher-cache", default=None, metavar="FILE",
                   help="precompute teacher logits to this file and free the fine-tune (an existing file is "
                        "replaced only with --overwrite)")
    add_device(d, "device for distillation")
    d.add_argument("--seed", type=int, default=0, help="seed of sampling and training (default 0)")
    c.set_defaults(func=cmd_compress)


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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with library_progress_bars(enabled=not getattr(args, "quiet", False)):
            args.func(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written under the output name", file=sys.stderr)
        return 130
    except Exception as e:  # every failure becomes one line; only -v shows where it came from
        return report_error(e, verbose)
    # after the work, so that a failing command still prints exactly one line
    for text in getattr(args, NOTES, None) or ():
        print(f"note: {text}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
