"""Phase ``prepare``: the base (a GGUF dequantised, or a model dir copied) checked once, then one
fine-tune per domain asked for, each checked to beat its base on held-out text of its domain.
Everything lands in the work directory with a ``prepare.json`` record; a rerun reuses what is there.

    phase_prepare(parse_args(["--phase", "prepare", "--gguf", "/tmp/smol.gguf", "--domain", "gsm8k"]))
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bitdelta.atomic import atomic_directory
from bitdelta.evaluate import perplexity_of_documents
from bitdelta.hf import load_model, load_tokenizer

from .data import heldout_docs
from .gguf import convert_gguf, sanity_check_base
from .settings import copy_out, log
from .trainer import finetune


def phase_prepare(args) -> int:
    t0 = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "prepare.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() and not args.force else {}
    prepare_base(args, work / "base", record)
    record.setdefault("finetunes", {})
    tok = load_tokenizer(str(work / "base"))
    base_model = None
    for domain in args.domains:  # --domain makes only those fine-tunes (a rerun of one domain's cells)
        ft_dir = work / "finetunes" / domain
        if (ft_dir / "config.json").is_file() and not args.force and domain in record["finetunes"]:
            log(f"{domain}: reusing {ft_dir}")
            continue
        rec = finetune(args, work / "base", ft_dir, domain, tok)
        if base_model is None:
            base_model = load_model(str(work / "base"), dtype="float32", device=args.device)
        rec.update(heldout_check(args, base_model, ft_dir, domain, tok))
        record["finetunes"][domain] = rec
        record_path.write_text(json.dumps(record, indent=2))
    record["prepare_s_last_run"] = round(time.perf_counter() - t0, 1)
    record["device"] = args.dev.name()
    record_path.write_text(json.dumps(record, indent=2))
    copy_out(args, record_path)
    log(f"prepare done in {time.perf_counter() - t0:.1f}s")
    return 0


def prepare_base(args, base_dir: Path, record: dict) -> None:
    """The base model dir (from --base-dir or --gguf) and its check, unless it is there already."""
    if not (args.force or not (base_dir / "config.json").is_file()):
        log(f"base: reusing {base_dir}")
        return
    t0 = time.perf_counter()
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


def heldout_check(args, base_model, ft_dir: Path, domain: str, tok) -> dict:
    """The fine-tune must beat its base on held-out text of its domain, or recovery means nothing."""
    held = heldout_docs(args, domain)[:200]
    ft_model = load_model(str(ft_dir), dtype="float32", device=args.device)
    kw = dict(max_length=args.heldout_max_len, batch_size=args.eval_batch, progress=False)
    out = {"heldout_check_ppl_base": perplexity_of_documents(base_model, tok, held, **kw).ppl,
           "heldout_check_ppl_ft": perplexity_of_documents(ft_model, tok, held, **kw).ppl}
    out["beats_base"] = out["heldout_check_ppl_ft"] < out["heldout_check_ppl_base"]
    log(f"{domain}: held-out ppl base {out['heldout_check_ppl_base']:.3f} -> fine-tune "
        f"{out['heldout_check_ppl_ft']:.3f} ({len(held)} docs)"
        + ("" if out["beats_base"] else "   WARNING: the fine-tune does not beat its base"))
    return out
