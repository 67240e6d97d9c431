"""The ``bitdelta`` command: each subcommand parses arguments and calls one library function.

    bitdelta compress --base BASE --finetuned FT --out ft.bitdelta [--scale row] [--bits 2]
    bitdelta inspect ft.bitdelta
    bitdelta merge --base BASE --delta ft.bitdelta --out merged/
    bitdelta import-reference --base BASE --diff diff.pt --out ft.bitdelta
    bitdelta generate --base BASE [--delta ft.bitdelta] --prompt "Once upon a time"

Errors bitdelta raises on purpose are printed as one line (``error: ...``) with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _patterns(values):
    if not values:
        return None
    out = []
    for v in values:
        out += [p for p in v.split(",") if p]
    return out


def cmd_compress(args) -> None:
    from .compress import compress

    delta = compress(
        args.base, args.finetuned, scale=args.scale, bits=args.bits, target=_patterns(args.target),
        exclude=_patterns(args.exclude), dense_embeddings=args.dense_embeddings, dtype=args.dtype,
        base_revision=args.base_revision, finetuned_revision=args.finetuned_revision, progress=not args.quiet,
    )
    delta.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    _print_inspect(args.out)


def _print_inspect(path, as_json: bool = False) -> None:
    from .report import describe_artifact, format_report

    info = describe_artifact(path)
    print(json.dumps(info, indent=2) if as_json else format_report(info))


def cmd_inspect(args) -> None:
    _print_inspect(args.path, args.json)


def cmd_merge(args) -> None:
    from .apply import merge
    from .artifact import load_delta
    from .hf import load_model, save_model_atomic

    delta = load_delta(args.delta)
    model = load_model(args.base, dtype=args.dtype, device=args.device or "cpu")
    merge(model, delta)
    model.config._name_or_path = delta.finetuned_model_name_or_path
    out = save_model_atomic(model, delta.files, args.out, overwrite=args.overwrite)
    print(f"merged {delta.finetuned_model_name_or_path!r} ({len(delta.modules)} modules) into {out}")


def cmd_import_reference(args) -> None:
    from .reference_import import import_reference
    from .sources import TOKENIZER_FILE_PATTERNS

    delta = import_reference(args.base, args.diff, finetuned_name=args.finetuned_name, progress=not args.quiet)
    if args.tokenizer:
        from pathlib import Path

        for pattern in TOKENIZER_FILE_PATTERNS:
            for f in Path(args.tokenizer).glob(pattern):
                if f.is_file():
                    delta.files[f.name] = f.read_bytes()
    delta.save_pretrained(args.out)
    _print_inspect(args.out)


def cmd_generate(args) -> None:
    from .apply import apply
    from .artifact import load_delta
    from .hf import generate_text, load_model, load_tokenizer

    model = load_model(args.base, dtype=args.dtype, device=args.device)
    if args.delta:
        apply(model, load_delta(args.delta))
    tok = load_tokenizer(args.delta, args.base)
    text = generate_text(model, tok, args.prompt, args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature or 1.0, seed=args.seed)
    print(args.prompt + text)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="bitdelta", description="1-bit fine-tune deltas: compress, inspect, merge, serve.")
    p.add_argument("--version", action="version", version=f"bitdelta {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a fine-tune against its base into a delta artifact")
    c.add_argument("--base", required=True, help="base model: local directory or hub id")
    c.add_argument("--finetuned", required=True, help="fine-tuned model: local directory or hub id")
    c.add_argument("--out", required=True, help="artifact directory to write")
    c.add_argument("--scale", default="scalar", choices=["scalar", "row", "col", "auto"],
                   help="scale granularity of linear layers (embeddings always use per-row scales)")
    c.add_argument("--bits", type=int, default=1, help="residual sign planes per matrix (default 1)")
    c.add_argument("--dtype", default=None, help="dtype of dense extras (default: the fine-tune's)")
    c.add_argument("--target", action="append", help="only compress modules matching these globs/regexes")
    c.add_argument("--exclude", action="append", help="keep modules matching these globs/regexes dense")
    c.add_argument("--dense-embeddings", action="store_true", help="keep embeddings and lm_head dense (reference behaviour)")
    c.add_argument("--max-shard-size", default="5GB", help="shard delta.safetensors above this size")
    c.add_argument("--base-revision", default=None)
    c.add_argument("--finetuned-revision", default=None)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="show an artifact's config, modes, sizes and compression factor")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser("merge", help="write base + delta as a normal Hugging Face model directory")
    m.add_argument("--base", required=True)
    m.add_argument("--delta", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default=None, help="load the base in this dtype (default: as stored)")
    m.add_argument("--device", default=None, help="where to merge (default cpu)")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("import-reference", help="convert the BitDelta research code's diff.pt")
    r.add_argument("--base", required=True)
    r.add_argument("--diff", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--finetuned-name", default=None, help="fine-tune id to record")
    r.add_argument("--tokenizer", default=None, help="directory with the fine-tune's tokenizer files to include")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_import_reference)

    g = sub.add_parser("generate", help="generate text from the base, or base + delta")
    g.add_argument("--base", required=True)
    g.add_argument("--delta", default=None)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default=None)
    g.add_argument("--device", default=None)
    g.set_defaults(func=cmd_generate)
    from .serving.cli import add_serve_parser
    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import BitDeltaError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (BitDeltaError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written under the output name", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
