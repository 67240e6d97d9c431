"""Serving benchmark on a quantized base: an FP8 base (FP8 GEMMs) against a bf16 one at 7B, and a 70B FP8 base.

(a) ``7b``: a Llama-2-7B-shaped base (32 layers, hidden 4096, MLP 11008, 32 heads) with random
    weights, once in bf16 and once in FP8 (each decoder matrix quantized per output channel as
    ``compress --base-quant fp8`` does; embeddings and head stay bf16). For each N of ``--ns``
    (default 1, 8, 32), N requests of distinct tenants, each with its own random 1-bit delta in its
    own device slot, 128-token prompts and 128 new tokens (greedy), through the real engine (CUDA
    graphs, the bitdelta decode kernels): tokens/s, TTFT and TPOT, GPU memory by part (base, deltas,
    KV cache) and the mix's memory roofline: the bytes a decode step must read (the base's weights,
    FP8 at one byte per weight plus its scales; N deltas' sign bits and scales; the KV cache) over
    the device copy bandwidth measured in the same run.
(b) ``70b``: a Llama-2-70B-shaped base (80 layers, hidden 8192, MLP 28672, 64 heads, 8 KV heads,
    vocab 32000) in FP8, built matrix by matrix straight into FP8 (one bf16 matrix exists at a time,
    never the 138 GB dense model), with N = 1, 4, 8 tenants (``--ns``): the same measures, and the
    largest N whose delta slots and KV cache fit beside the base (by memory arithmetic, then run when
    the time budget allows).

The tenants' deltas: one random artifact-shaped delta (the base's fingerprint, so registration
checks pass) is registered under N names through the real registration path (its host copy shared,
as ``benchmarks/serve`` shares artifacts); after each tenant is installed, its device slot's sign
bits are redrawn at random, so every tenant's bits are its own and each decode step reads N distinct
deltas. A wall-clock budget (``--budget-s``) cuts a run's decode short, extrapolating and saying so.
Prints a markdown table last; writes the results as JSON to ``--out``.

    python benchmarks/quant_serve.py --only 7b --out $OUT/quant_serve_7b.json            # H200, ~4 min
    python benchmarks/quant_serve.py --only 70b --ns 1,4,8 --out $OUT/quant_serve_70b.json
    python benchmarks/quant_serve.py --smoke --out /tmp/quant_serve.json                  # CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Run as a file, the repository root and src/ go on the path; run as a module or imported, the benchmarks
# package puts src/ there.
if __package__ in (None, ""):
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]

import torch

from benchmarks._common import (
    LLAMA2_7B,
    SMOKE,
    BenchDevice,
    GiB,
    RunLog,
    build_base,
    copy_bandwidth,
    random_packed_module,
    roofline_terms,
)
from benchmarks.serve.context import BenchRun
from benchmarks.serve.measure import run_workload, summary_line
from benchmarks.serve.setup import SharedArtifactSlots
from benchmarks.serve.workload import kv_bytes_per_seq
from bitdelta import __version__
from bitdelta.delta import Delta
from bitdelta.fingerprint import Fingerprint, sample_weight
from bitdelta.serving.model import DeltaLlama
from bitdelta.serving.quant_linear import QuantizedWeight, ways_used
from bitdelta.targets import EMBEDDING, LINEAR

LLAMA2_70B = {"vocab": 32000, "hidden": 8192, "inter": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "max_pos": 4096}
SMOKE_GQA = dict(SMOKE, kv_heads=1)  # the 70B part's grouped-query layout at smoke size
DEFAULT_NS = {"7b": "1,8,32", "70b": "1,4,8"}
SHARED = "random-delta"  # the artifact name every tenant's registration shares


# ---------------------------------------------------------------------------------- the bases


def build_quantized_base(shape: dict, scheme: str, dtype, device, seed: int = 0) -> DeltaLlama:
    """A Llama-shaped served model whose decoder matrices are quantized (``QuantizedWeight.quantize``,
    compress's quantization) as each is drawn: one dense matrix exists at a time. Embeddings, head and
    norms stay in ``dtype``."""
    model = build_base(shape, dtype, device, seed, matrix=lambda w: QuantizedWeight.quantize(w, scheme),
                       name=f"random-llama-base-{scheme}")
    model._bitdelta_base_quantization = {"scheme": scheme, "format": "random, quantized per channel",
                                         "quantized_tensors": 7 * shape["layers"]}
    return model


def base_bytes(model) -> int:
    """Device bytes of the base's weights: quantized matrices at their stored size (q + scales)."""
    mats = sum(w.nbytes() if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
               for w in model.weights.values())
    return mats + sum(p.numel() * p.element_size() for p in model.params1d.values())


def decode_base_bytes(model) -> int:
    """Base bytes one decode step reads: every matrix but the embedding (a row per token), and the norms."""
    return base_bytes(model) - model.weights[model.embed_name].numel() * model.weights[model.embed_name].element_size()


def slot_bytes(model, bits: int = 1) -> int:
    """Device bytes of one delta slot (``DevicePool``'s buffers for one slot), without allocating them."""
    elem = torch.empty((), dtype=model.dtype).element_size()
    per = sum(bits * (n * ((k + 7) // 8) + 4 * n + 4 * k) for n, k in model.delta_modules().values())
    return per + sum(p.numel() for p in model.params1d.values()) * elem


# ---------------------------------------------------------------------------------- the tenants


def random_delta(model, seed: int = 0) -> Delta:
    """A 1-bit delta of ``model``'s shapes with random signs and scales (row scales on the vocabulary
    matrices, scalar elsewhere, as ``compress`` writes), fingerprinted against the served weights
    (quantized ones as they dequantize)."""
    g = torch.Generator(device=model.device).manual_seed(1000 + seed)
    readable = model.readable()
    modules, samples = {}, {}
    for name, (n, k) in model.delta_modules().items():
        vocab = name in (model.embed_name, model.head_name)
        kind = EMBEDDING if name == model.embed_name else LINEAR
        modules[name] = random_packed_module(kind, "row" if vocab else "scalar", n, k, 1, g, vocab, model.device)
        samples[name] = ((n, k), sample_weight(readable[name]))
    info = {"bitdelta_version": __version__, "base_model_name_or_path": str(model.config._name_or_path),
            "finetuned_model_name_or_path": f"random-finetune-{seed}", "model_type": "llama",
            "vocab_size": model.vocab_size,
            "compression": {"scale": "scalar", "bits": 1, "base_quantization": model.base_quantization}}
    delta = Delta(modules, {}, Fingerprint.from_samples(samples), info)
    delta.artifact_path = SHARED
    return delta


def install_tenants(run, model, n: int) -> tuple[SharedArtifactSlots, list[str]]:
    """``n`` tenants registered (fingerprint, value and layout checks) and installed, each in its own
    device slot with its own random sign bits."""
    t = time.perf_counter()
    delta = random_delta(model)
    slots = SharedArtifactSlots(model, [SHARED], max_gpu_deltas=n, max_cpu_deltas=2)
    g = torch.Generator(device=model.device).manual_seed(7)
    names = [f"tenant-{i:03d}" for i in range(n)]
    for name in names:
        slots.register(name, SHARED, delta=delta)
        slot = slots.load(name)
        for pool in slots.pools.values():  # this tenant's own bits
            pool["signs"][slot].copy_(torch.randint(0, 256, pool["signs"][slot].shape, generator=g,
                                                    device=model.device, dtype=torch.uint8))
    del delta
    slots.prepared.clear()  # every tenant is on the device: the shared host copy is not needed
    run.dev.sync()
    run.log(f"{n} tenants registered and installed in {time.perf_counter() - t:.1f}s")
    return slots, names


def release(run, slots) -> None:
    """Drops a pool's device buffers now (its loader thread keeps the object alive)."""
    slots.on_ready = None
    slots.pools.clear()
    slots.tables.clear()
    slots.extra_embed = slots.extra_head = slots.n_extra = None
    run.dev.free_memory()


# ---------------------------------------------------------------------------------- measuring


def largest_n(run, model, per_slot: int) -> dict:
    """How many tenants fit beside the base (a delta slot and one sequence's KV cache each), keeping
    ``--reserve-gib`` free for activations, transients and CUDA graphs."""
    args = run.args
    kv_seq = kv_bytes_per_seq(model, args.prompt_len + args.new_tokens)
    if not run.dev.on_gpu:
        return {"nmax": 4, "kv_bytes_per_seq": kv_seq, "slot_bytes": per_slot}
    free, total = torch.cuda.mem_get_info()
    nmax = int((free - args.reserve_gib * GiB) // (per_slot + kv_seq))
    return {"nmax": nmax, "kv_bytes_per_seq": kv_seq, "slot_bytes": per_slot, "free_bytes": free,
            "total_bytes": total, "reserve_gib": args.reserve_gib}


def measure_base(run, part: str, kind: str, model, ns: list[int], bw: float, confirm_max: bool = False) -> None:
    """Every N of ``ns`` on ``model`` (plus the largest N that fits, when ``confirm_max`` and time allow)."""
    args, result = run.args, run.result
    per_slot = slot_bytes(model)
    fit = largest_n(run, model, per_slot)
    info = {"part": part, "base": kind, "base_bytes": base_bytes(model), "slot_bytes": per_slot, "fit": fit,
            "ways": ways_used(model)}
    result["bases"].append(info)
    run.log(f"{part} {kind}: base {info['base_bytes'] / 1e9:.2f} GB, one delta slot {per_slot / 1e9:.3f} GB, "
            f"largest N that fits {fit['nmax']}; quantized matrices by way: {info['ways'] or 'none'}")
    todo = [n for n in ns if n <= fit["nmax"]]
    for n in ns:
        if n > fit["nmax"]:
            run.skip(f"{part} {kind} N={n}: does not fit (largest N {fit['nmax']})")
    if confirm_max and fit["nmax"] > max(todo, default=0):
        todo.append(fit["nmax"])
    if not todo:
        return
    slots, names = install_tenants(run, model, max(todo))
    try:
        terms = roofline_terms(model, slots)
        terms["base"] = decode_base_bytes(model)  # quantized matrices at their stored bytes
        for n in todo:
            if run.left_s() < 20:
                run.skip(f"{part} {kind} N={n}: time budget")
                continue

            def one(n=n):
                # a warm-up run compiles this batch's kernel shapes (and profiles one decode step at the
                # largest N: the profiler's start-up would otherwise land in a measured step)
                w = run_workload(run, model, slots, names[:n], new_tokens=6, label="warm", deadline=run.deadline,
                                 profile_step=1 if args.profile and n == max(todo) else None)
                r = run_workload(run, model, slots, names[:n], terms=terms, bw=bw, label=f"{part}-{kind}-{n}",
                                 deadline=run.deadline - args.reserve_tail_s)
                r.update(part=part, base=kind, n=n, base_bytes=info["base_bytes"], delta_bytes=n * per_slot,
                         is_largest_fit=n == fit["nmax"], profile=w["profile"])
                result["runs"].append(r)
                run.log(summary_line(kind, n, r))

            run.guarded(f"{part} {kind} N={n}", one)
            write_result(run)
    finally:
        release(run, slots)


def measure_part(run, part: str, kind: str, shape: dict, ns: list[int], bw: float, confirm_max: bool = False):
    """Builds one base (``bf16``, or ``fp8`` matrix by matrix) and measures it; the base is freed after."""

    def go():
        t = time.perf_counter()
        if kind == "bf16":
            model = build_base(shape, run.dtype, run.dev.device)
        else:
            model = build_quantized_base(shape, kind, run.dtype, run.dev.device)
        run.dev.sync()
        run.log(f"{part} {kind} base built in {time.perf_counter() - t:.1f}s")
        measure_base(run, part, kind, model, ns, bw, confirm_max)

    run.guarded(f"{part} {kind}", go)


def part_7b(run, bw: float) -> None:
    args = run.args
    shape = dict(SMOKE if args.smoke else LLAMA2_7B)
    if args.layers:
        shape["layers"] = args.layers
    for kind in ("bf16", "fp8"):
        measure_part(run, "7b", kind, shape, parse_ns(args.ns or DEFAULT_NS["7b"]), bw)


def part_70b(run, bw: float) -> None:
    args = run.args
    shape = dict(SMOKE_GQA if args.smoke else LLAMA2_70B)
    if args.layers:
        shape["layers"] = args.layers
    measure_part(run, "70b", "fp8", shape, parse_ns(args.ns or DEFAULT_NS["70b"]), bw,
                 confirm_max=not args.no_confirm_max)


# ---------------------------------------------------------------------------------- report


def parse_ns(spec: str) -> list[int]:
    ns = sorted({int(s) for s in str(spec).split(",") if s.strip()})
    if not ns or ns[0] < 1:
        raise SystemExit(f"--ns must list positive tenant counts (got {spec!r})")
    return ns


def gb(x) -> str:
    return "–" if x is None else f"{x / 1e9:.1f}"


def markdown(result: dict) -> str:
    lines = ["| part | base | N | tok/s | % roofline | TTFT p50 ms | TPOT p50 ms "
             "| base GB | deltas GB | KV GB | peak GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        tok = r.get("est_tok_s") or r.get("tok_s")
        roof = (r.get("roofline") or {}).get("pct")
        lines.append(
            f"| {r['part']} | {r['base']} | {r['n']}{' (max fit)' if r.get('is_largest_fit') else ''} | "
            f"{tok or 0:.1f}{' (extrap.)' if r.get('extrapolated') else ''} | "
            f"{'–' if roof is None else f'{roof:.1f}'} | {r.get('ttft_ms_p50') or 0:.0f} | "
            f"{r.get('tpot_ms_p50') or 0:.1f} | "
            f"{gb(r.get('base_bytes'))} | {gb(r.get('delta_bytes'))} | {gb(r.get('kv_cache_bytes'))} | "
            f"{gb(r.get('peak_allocated_bytes'))} |")
    for b in result["bases"]:
        lines.append(f"\n{b['part']} {b['base']}: largest N that fits = {b['fit']['nmax']} (one delta slot "
                     f"{b['slot_bytes'] / 1e9:.2f} GB, KV per sequence {b['fit']['kv_bytes_per_seq'] / 1e9:.3f} GB)")
    for s in result["skipped"]:
        lines.append(f"skipped: {s}")
    return "\n".join(lines)


def write_result(run) -> None:
    """Writes what is measured so far (a run stopped at its time limit still leaves its numbers)."""
    out = run.args.out
    if not out:
        return
    path = Path(out)
    if path.is_dir() or str(out).endswith("/"):
        path = path / "quant_serve.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**run.result, "log": run.log.lines}, indent=1, default=str))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/quant_serve.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("7b", "70b", "all"), default="all", help="which part to run (default: both)")
    ap.add_argument("--ns", default=None, help="tenant counts (default: 1,8,32 for 7b; 1,4,8 for 70b)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for quick runs (default: the model's)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run")
    ap.add_argument("--reserve-tail-s", type=float, default=15.0, help="budget kept after a run's decode")
    ap.add_argument("--reserve-gib", type=float, default=4.0, help="GPU memory kept free when sizing the largest N")
    ap.add_argument("--no-confirm-max", action="store_true", help="70b: do not run the largest N that fits")
    ap.add_argument("--profile", type=int, default=1, help="1: profile one decode step at each base's largest N")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, float32: end to end in seconds")
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="JSON file to write (a directory: quant_serve.json in it)")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.prompt_len, args.new_tokens = min(args.prompt_len, 8), min(args.new_tokens, 4)
        args.ns = args.ns or "1,2"
        torch.set_num_threads(1)  # tiny shapes: threads only contend
    dev = BenchDevice(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = RunLog()
    meta = {"device": dev.name(), "torch": torch.__version__, "bitdelta": __version__,
            "date": time.strftime("%Y-%m-%d"), "argv": list(argv if argv is not None else sys.argv[1:]),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    run = BenchRun(args, dev, log, log.t0 + args.budget_s, {"meta": meta, "bases": [], "runs": [], "skipped": []})
    run.dtype = torch.float32 if dev.device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    log(f"device {meta['device']}; torch {meta['torch']}; parts: {args.only}")
    bw = copy_bandwidth(dev.device)
    meta["copy_gbps"] = bw
    log(f"copy bandwidth {bw:.0f} GB/s (device copy, bytes read + written)")
    if args.only in ("7b", "all"):
        part_7b(run, bw)
    if args.only in ("70b", "all"):
        part_70b(run, bw)
    write_result(run)
    print("\n" + markdown(run.result), flush=True)
    return run.result


if __name__ == "__main__":
    main()
