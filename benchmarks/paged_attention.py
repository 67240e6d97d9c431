"""GPU benchmark of the paged decode attention (bitdelta.ops.paged_attention): checks, then times against the roofline.

One run does everything, so the roofline and the timings come from the same machine state:
  1. checks the Triton kernel against the PyTorch reference on random inputs (never zeros) for every
     model shape: ragged lengths, shuffled pages, window and softcap on and off, split and unsplit;
  2. measures the copy bandwidth (device-to-device copy, bytes read + written);
  3. for each model's head layout, batch B and context length: builds a paged cache with every row's
     pages shuffled through the pool, checks the kernel once more at that shape, then times the
     kernel with the split count it picks, the kernel unsplit, and the reference path (where its
     float32 gathers fit in memory), against the roofline: the bytes the kernel must read (each
     row's visible keys and values once, the query, the output and the block table) at the copy
     bandwidth. Times are medians of replays from a CUDA graph, whose successive calls rotate through
     copies of the inputs spanning ``--rotate-mib`` (so small shapes are read from HBM, not from L2).
     ``--sweep`` also tries a few launch configs per shape.
Prints a short table last; ``--out`` writes the results as JSON.

    python benchmarks/paged_attention.py --out $OUT/paged_attention.json        # H200, a few minutes
    python benchmarks/paged_attention.py --sweep --models llama3-8b             # launch configs too
    python benchmarks/paged_attention.py --smoke                                 # CPU interpreter, seconds
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root and src/ on the path
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]

import torch

from benchmarks._common import BenchDevice, GiB, RunLog, check, copy_bandwidth, roofline_us, run_and_save, time_us

# name -> query heads, kv heads, head dim, window, softcap
MODELS = {
    "llama2-7b": dict(heads=32, kv_heads=32, dim=128, window=None, softcap=None),
    "llama3-8b": dict(heads=32, kv_heads=8, dim=128, window=None, softcap=None),
    "gemma2-9b": dict(heads=16, kv_heads=8, dim=256, window=4096, softcap=50.0),  # its local layers
}
SMOKE_MODELS = {
    "smoke-gqa": dict(heads=4, kv_heads=2, dim=64, window=None, softcap=None),
    "smoke-window": dict(heads=3, kv_heads=3, dim=80, window=48, softcap=20.0),
}
BLOCK_SIZE = 16
REFERENCE_BYTES_MAX = 16 * GiB  # the reference's float32 gathers above this are not timed
MAX_COPIES = 64
SWEEP = [dict(BLOCK_N=n, num_warps=w, num_stages=s) for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3))]


def paged_inputs(batch, model, lens, dtype, device, block_size=BLOCK_SIZE, seed=0):
    """q and a paged cache holding ``lens[b]`` keys for row ``b``, pages shuffled through the pool, the
    table's unused entries -1."""
    g = torch.Generator().manual_seed(seed)
    pages = [math.ceil(n / block_size) for n in lens]
    num_blocks, width = sum(pages), max(pages)
    shape = (num_blocks, block_size, model["kv_heads"], model["dim"])
    q = torch.randn(batch, model["heads"], model["dim"], generator=g).to(device, dtype)
    k = torch.randn(shape, dtype=dtype, device=device)
    v = torch.randn(shape, dtype=dtype, device=device)
    order = torch.randperm(num_blocks, generator=g).int()
    table = torch.full((batch, width), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[used:used + n]
        used += n
    return q, k, v, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def bytes_read(model, lens, dtype, block_size=BLOCK_SIZE) -> int:
    """What one call must move: each row's visible keys and values (from the first visible key's page
    on), its query and output, and its block table entries in use."""
    elem = torch.finfo(dtype).bits // 8
    window = model["window"]
    keys = sum(n - (max(0, n - window) // block_size * block_size if window else 0) for n in lens)
    per_key = 2 * model["kv_heads"] * model["dim"] * elem
    rows = len(lens) * (2 * model["heads"] * model["dim"] * elem)
    table = sum(math.ceil(n / block_size) for n in lens) * 4
    return keys * per_key + rows + table


def reference_bytes(batch, model, max_len) -> int:
    """The reference path's float32 intermediates: keys and values gathered, then spread over the query heads."""
    return 2 * batch * max_len * (model["kv_heads"] + model["heads"]) * model["dim"] * 4


def run_checks(models, dtype, dev, log, quick=False) -> list[dict]:
    from bitdelta.ops import paged_attention as pa

    options = [(None, None), (37, 30.0)] if quick else list(itertools.product((None, 37), (None, 30.0)))
    rows = []
    for (name, model), (window, softcap), splits in itertools.product(models.items(), options,
                                                                       (1, 3) if quick else (1, None, 5)):
        lens = [1, 17, 70] if quick else [1, 17, 130, 64, 300]
        q, k, v, table, seq = paged_inputs(len(lens), model, lens, dtype, dev.device, seed=len(rows))
        kw = dict(window=window, softcap=softcap)
        expected = pa.paged_decode_attention_reference(q, k, v, table, seq, **kw)
        out = pa.paged_decode_attention_triton(q, k, v, table, seq, num_splits=splits, **kw)
        what = f"{name} window={window} softcap={softcap} splits={splits}"
        rows.append({"check": what, "max_abs_err": check(out, expected, dtype, what)})
    log(f"checks: {len(rows)} kernel calls match the reference (max abs error "
        f"{max(r['max_abs_err'] for r in rows):.2e})")
    return rows


def run_shape(name, model, batch, context, dtype, dev, bw, args, log) -> dict:
    from bitdelta.ops import paged_attention as pa

    dev.free_memory()  # the previous shape's cache
    lens = [context] * batch
    nbytes = bytes_read(model, lens, dtype)
    # Back-to-back calls on one small cache would read it from L2, not HBM: calls rotate through
    # enough copies (disjoint pages of one pool) to span ROTATE_BYTES.
    copies = min(MAX_COPIES, max(1, math.ceil(args.rotate_mib * 2**20 / nbytes)))
    q, k, v, table, seq = paged_inputs(batch * copies, model, lens * copies, dtype, dev.device, seed=batch + context)
    sets = [(q[i * batch:(i + 1) * batch], table[i * batch:(i + 1) * batch], seq[i * batch:(i + 1) * batch])
            for i in range(copies)]
    kw = dict(window=model["window"], softcap=model["softcap"])
    splits = pa.choose_num_splits(batch, model["kv_heads"], context, pa._sm_count(dev.device))

    def rotating(fn):
        turn = itertools.cycle(sets)

        def call(**extra):
            qi, ti, si = next(turn)
            return fn(qi, k, v, ti, si, **kw, **extra)
        return call

    kernel = rotating(lambda *a, **extra: pa.paged_decode_attention_triton(*a, max_seq_len=context, **extra))
    row = {"model": name, "batch": batch, "context": context, "splits": splits, "bytes": nbytes, "copies": copies}
    row["roofline_us"] = roofline_us(nbytes, bw)
    fits = reference_bytes(batch, model, context) <= (REFERENCE_BYTES_MAX if dev.on_gpu else GiB)
    if fits:
        reference = rotating(pa.paged_decode_attention_reference)
        qi, ti, si = sets[0]
        expected = pa.paged_decode_attention_reference(qi, k, v, ti, si, **kw)
        out = pa.paged_decode_attention_triton(qi, k, v, ti, si, max_seq_len=context, **kw)
        row["max_abs_err"] = check(out, expected, dtype, f"{name} B={batch} context={context}")
        row["reference_us"] = time_us(reference, dev, args.reps)
    row["kernel_us"] = time_us(kernel, dev, args.reps)
    row["unsplit_us"] = row["kernel_us"] if splits == 1 else time_us(lambda: kernel(num_splits=1), dev, args.reps)
    row["pct_roofline"] = 100 * row["roofline_us"] / row["kernel_us"]
    if args.sweep:
        best = min(((time_us(lambda c=c: kernel(config=c), dev, args.reps), c) for c in SWEEP
                    if c["BLOCK_N"] % BLOCK_SIZE == 0), key=lambda t: t[0])
        row["best_config_us"], row["best_config"] = best
    log(f"{name} B={batch} context={context}: {row['kernel_us']:.1f} us ({splits} splits; unsplit "
        f"{row['unsplit_us']:.1f}), roofline {row['roofline_us']:.1f} us = {row['pct_roofline']:.0f}%"
        + (f", reference {row['reference_us']:.1f} us" if "reference_us" in row else ""))
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | B | context | splits | kernel µs | unsplit µs | roofline µs | % of roofline | reference µs "
            "| × reference |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ref = r.get("reference_us")
        vs_ref = ("-", "-") if ref is None else (f"{ref:.1f}", f"{ref / r['kernel_us']:.1f}×")
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['splits']} | {r['kernel_us']:.1f} | "
                     f"{r['unsplit_us']:.1f} | {r['roofline_us']:.1f} | {r['pct_roofline']:.1f}% | "
                     f"{vs_ref[0]} | {vs_ref[1]} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/paged_attention.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="512,4096,16384")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--reps", type=int, default=50, help="timing repetitions (ms of replays on a GPU)")
    ap.add_argument("--rotate-mib", type=float, default=512.0,
                    help="timed calls rotate through input copies spanning this much (default: ten H200 L2s)")
    ap.add_argument("--sweep", action="store_true", help="also time a few launch configs per shape")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument("--out", default=None, help="JSON file to write")
    return ap


def run(args) -> dict:
    if args.smoke:
        args.device = args.device or "cpu"
        args.batches, args.contexts, args.reps, args.rotate_mib = "1,3", "100", 1, 0.25
    dev = BenchDevice(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not dev.on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported
    models = SMOKE_MODELS if args.smoke else {m: MODELS[m] for m in args.models.split(",")}
    dtype = torch.float32 if not dev.on_gpu else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    log = RunLog()
    meta = {"device": dev.name(), "torch": torch.__version__, "dtype": str(dtype), "block_size": BLOCK_SIZE,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log(f"device {meta['device']}; torch {meta['torch']}; {meta['dtype']}")
    checks = run_checks(models, dtype, dev, log, quick=args.smoke)
    bw = copy_bandwidth(dev.device)
    meta["copy_gbps"] = bw
    log(f"copy bandwidth {bw:.0f} GB/s (device copy, bytes read + written)")
    rows = [run_shape(name, model, b, c, dtype, dev, bw, args, log) for name, model in models.items()
            for b in map(int, args.batches.split(",")) for c in map(int, args.contexts.split(","))]
    return {"meta": meta, "checks": checks, "rows": rows}


def main(argv=None) -> dict:
    results = run_and_save(argv, build_parser().parse_args, run)
    print("\n" + table(results["rows"]), flush=True)
    return results


if __name__ == "__main__":
    main()
