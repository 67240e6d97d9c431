"""GPU benchmark of the FP8 weight-only GEMV (bitdelta.ops.fp8_gemv) at decode sizes, against the other ways.

For Llama-2-7B and 70B matrix shapes (out x in: 4096x4096, 11008x4096, 4096x11008, 8192x8192,
28672x8192, 8192x28672) and M = 1, 2, 4, 8, 16 rows of bf16 activations, with a random weight
quantized per output channel to e4m3 as ``compress --base-quant fp8`` does:

  1. checks the kernel (its default launch configuration and every configuration of the sweep)
     against the reference, ``(x @ qᵀ) · scale`` in float32: at most one bf16 unit of the largest
     output apart (a configuration that fails is reported and not timed);
  2. times the kernel, the FP8 GEMM way (``quant_linear.fp8_gemm``: the activations quantized per
     token, then ``torch._scaled_mm``),
     cuBLAS bf16 (``F.linear`` on the dequantized bf16 weight) and a small sweep of launch
     configurations (``--no-sweep`` skips it: the fastest says what the defaults should be), each as
     calls on distinct copies of the weight (together several times the L2 cache, so every call reads
     its weight from memory, as in a decode step) launched back to back in one CUDA graph, the median
     over replays per call: no launch latency or host jitter in a figure (:func:`time_cold_us`);
  3. the memory roofline: the bytes the product must move (the weight at one byte per value, the
     float32 scales, x and the output in bf16) over the copy bandwidth of a 1 GiB device-to-device
     copy measured in the same run.

Prints a markdown table last (and the sum over one 7B decoder layer's seven matrices per M); writes
the results as JSON to ``--out``.

    python benchmarks/fp8_gemv.py --out $OUT/fp8_gemv.json        # H200: a few minutes, Triton cache cold
    python benchmarks/fp8_gemv.py --smoke                          # CPU, Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]

import torch
from torch.nn import functional as F

from benchmarks._common import RunLog, copy_bandwidth, graph_time_us, pct, roofline_us, run_and_save
from bitdelta import __version__

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]  # (N out, K in)
ROWS = [1, 2, 4, 8, 16]
# One Llama-2-7B decoder layer: q, k, v, o (4096x4096), gate and up (11008x4096), down (4096x11008).
LAYER_7B = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
SMOKE_SHAPES = [(48, 80), (40, 33)]
SMOKE_ROWS = [1, 3]


def sweep_configs(smoke: bool):
    """Launch configurations tried beside the default (CUDA cores only for few rows, :func:`fits`)."""
    from bitdelta.ops.fp8_gemv import GemvConfig

    if smoke:
        return [GemvConfig(False, 16, 32), GemvConfig(True, 16, 32, split_k=2)]
    return [GemvConfig(False, 16, 256), GemvConfig(False, 32, 256), GemvConfig(False, 16, 512, num_warps=8),
            GemvConfig(False, 16, 256, split_k=2), GemvConfig(True, 16, 256), GemvConfig(True, 32, 256),
            GemvConfig(True, 64, 128), GemvConfig(True, 16, 512, num_warps=8), GemvConfig(True, 16, 256, split_k=2),
            GemvConfig(True, 32, 256, num_stages=4), GemvConfig(True, 16, 128, split_k=4)]


def fits(config, m: int) -> bool:
    """Whether ``config`` is worth timing at ``m`` rows: the CUDA-core product tile (rows x BLOCK_N x
    BLOCK_K float32 values) spills registers past 64 rows x strips (compiled for sm_90)."""
    return config.use_dot or m * config.block_n <= 64


COLD_BYTES = 256 * 2**20  # weight copies per timing add up to at least this: several times any L2 cache
MAX_COPIES = 32
REPLAYS = 25


def copies_of(t: torch.Tensor, on_gpu: bool) -> list[torch.Tensor]:
    """``t`` and clones of it, enough that their bytes reach :data:`COLD_BYTES` (on a GPU; one elsewhere)."""
    if not on_gpu:
        return [t]
    n = max(2, min(MAX_COPIES, -(-COLD_BYTES // (t.numel() * t.element_size()))))
    return [t] + [t.clone() for _ in range(n - 1)]


def time_cold_us(calls, on_gpu: bool) -> float:
    """Microseconds per call of ``calls`` (each on its own copy of the weight), launched back to back
    in one captured CUDA graph; the median over :data:`REPLAYS` replays. Off a GPU, one call timed."""
    if not on_gpu:
        return time_us(calls[0])
    return graph_time_us(calls, inner=1, reps=REPLAYS)


def time_us(fn) -> float:
    """One call timed on the host, the median of three: the interpreter proves the code runs, measures nothing."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return pct(times, 50) * 1e6


def fp8_matrix(n: int, k: int, device, seed: int):
    """A random weight quantized per output channel as ``compress --base-quant fp8`` does: (q, float32
    scale [N], the dequantized bf16 weight cuBLAS multiplies)."""
    from bitdelta.quant import quantize

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) * 0.02
    q, scale = quantize(w, "fp8")
    del w
    return q, scale.float().reshape(-1), (q.float() * scale.float()).to(torch.bfloat16)


def check(y, x, q, scale) -> float:
    """Largest difference from the float32 product, in bf16 units of the largest output (pass: <= 1)."""
    ref = (x.float() @ q.float().t()) * scale
    return float((y.float() - ref).abs().max() / (ref.abs().max() * 2.0**-7))


def run(args) -> dict:
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    log = RunLog()
    shapes, rows = (SMOKE_SHAPES, SMOKE_ROWS) if args.smoke else (SHAPES, ROWS)
    dtype = torch.bfloat16
    sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 4
    meta = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu (Triton interpreter)",
            "torch": torch.__version__, "bitdelta": __version__, "date": time.strftime("%Y-%m-%d"),
            "multiprocessors": sms,
            "timing": (f"per call, calls on distinct weight copies (>= {COLD_BYTES >> 20} MiB together) back to back "
                       f"in one CUDA graph, median of {REPLAYS} replays" if on_gpu else "one call (interpreter)")}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    bw = copy_bandwidth(device)
    meta["copy_gbps"] = bw
    log(f"{meta['device']}; copy bandwidth {bw:.0f} GB/s (device copy, bytes read + written)")
    ctx = {"on_gpu": on_gpu, "sms": sms, "bw": bw, "log": log, "sweep": sweep_configs(args.smoke) if args.sweep else [],
           "has_gemm": on_gpu and torch.cuda.get_device_capability(device) >= (8, 9)}
    results = []
    for i, (n, k) in enumerate(shapes):
        q, scale, w_bf16 = fp8_matrix(n, k, device, seed=i)
        ctx["q_copies"], ctx["w_copies"] = copies_of(q, on_gpu), copies_of(w_bf16, on_gpu)
        g = torch.Generator(device=device).manual_seed(100 + i)
        for m in rows:
            x = torch.randn(m, k, generator=g, device=device).to(dtype)
            results.append(measure(ctx, x, q, scale, w_bf16))
        del q, scale, w_bf16
        ctx["q_copies"] = ctx["w_copies"] = None
        if on_gpu:
            torch.cuda.empty_cache()
    return {"meta": meta, "rows": results}


def measure(ctx: dict, x, q, scale, w_bf16) -> dict:
    """One (matrix, M): the checks, the four timings, the roofline and the sweep."""
    from bitdelta.ops.fp8_gemv import default_config, fp8_weight_only_triton
    from bitdelta.serving import fp8_rows
    from bitdelta.serving.quant_linear import fp8_gemm

    (m, k), n = x.shape, q.shape[0]
    on_gpu, log = ctx["on_gpu"], ctx["log"]
    cfg = default_config(m, n, k, ctx["sms"])
    y = fp8_weight_only_triton(x, q, scale)
    row = {"n": n, "k": k, "m": m, "config": asdict(cfg), "check_bf16_units": check(y, x, q, scale)}
    if row["check_bf16_units"] > 1:
        log(f"FAIL {n}x{k} M={m}: the kernel is {row['check_bf16_units']:.1f} bf16 units from the reference")
    qs = ctx["q_copies"]
    row["gemv_us"] = time_cold_us([lambda q=q: fp8_weight_only_triton(x, q, scale) for q in qs], on_gpu)

    def scaled_mm(q):
        fp8_rows.forget()  # each call quantizes its activations, as a matrix with its own input does
        return fp8_gemm(x, q, scale)

    row["scaled_mm_us"] = (time_cold_us([lambda q=q: scaled_mm(q) for q in qs], on_gpu) if ctx["has_gemm"]
                           else None)
    row["bf16_us"] = time_cold_us([lambda w=w: F.linear(x, w) for w in ctx["w_copies"]], on_gpu)
    row["bytes"] = n * k + 4 * n + 2 * m * k + 2 * m * n  # weight, float32 scales, bf16 x and output
    row["roofline_us"] = roofline_us(row["bytes"], ctx["bw"])
    row["pct_roofline"] = 100 * row["roofline_us"] / row["gemv_us"]
    sweep = []
    for c in ctx["sweep"]:
        if not fits(c, m):
            continue
        entry = {"config": asdict(c)}
        try:
            err = entry["check_bf16_units"] = check(fp8_weight_only_triton(x, q, scale, config=c), x, q, scale)
        except Exception as e:  # a configuration that does not compile here: noted, the sweep goes on
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"{n}x{k} M={m} {c}: {entry['error']}")
            sweep.append(entry)
            continue
        if err <= 1:
            entry["us"] = time_cold_us([lambda q=q, c=c: fp8_weight_only_triton(x, q, scale, config=c) for q in qs],
                                       on_gpu)
        else:
            log(f"FAIL {n}x{k} M={m} {c}: {err:.1f} bf16 units from the reference")
        sweep.append(entry)
    row["sweep"] = sweep
    timed = [e for e in sweep if "us" in e]
    row["best"] = min(timed, key=lambda e: e["us"]) if timed else None
    gemm = _f(row["scaled_mm_us"])
    best = f"; best of sweep {row['best']['us']:.1f} us" if row["best"] else ""
    log(f"{n}x{k} M={m}: gemv {row['gemv_us']:.1f} us ({row['pct_roofline']:.0f}% of roofline "
        f"{row['roofline_us']:.1f}), _scaled_mm {gemm}, bf16 {row['bf16_us']:.1f}{best}")
    return row


def layer_sums(result: dict) -> list[dict]:
    """Per M, the seven matrices of one 7B decoder layer summed (where the run measured them)."""
    by = {(r["n"], r["k"], r["m"]): r for r in result["rows"]}
    sums = []
    for m in sorted({r["m"] for r in result["rows"]}):
        parts = [(by.get((n, k, m)), count) for (n, k), count in LAYER_7B.items()]
        if any(r is None for r, _ in parts):
            continue
        total = {key: sum(r[key] * c for r, c in parts) if all(r[key] is not None for r, _ in parts) else None
                 for key in ("gemv_us", "scaled_mm_us", "bf16_us", "roofline_us")}
        sums.append({"m": m, **total})
    return sums


def _f(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    lines = ["| N x K | M | GEMV µs | % roofline | _scaled_mm µs | bf16 µs | GEMV vs bf16 | GEMV vs _scaled_mm "
             "| best of sweep µs | its config |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        best = r.get("best")
        cfg = best["config"] if best else None
        cfg_s = (f"{'dot' if cfg['use_dot'] else 'cores'} BN{cfg['block_n']} BK{cfg['block_k']} "
                 f"split{cfg['split_k']} w{cfg['num_warps']} s{cfg['num_stages']}") if cfg else ""
        vs_gemm = r["scaled_mm_us"] / r["gemv_us"] if r["scaled_mm_us"] else None
        lines.append(f"| {r['n']}x{r['k']} | {r['m']} | {_f(r['gemv_us'])} | {_f(r['pct_roofline'], 0)} "
                     f"| {_f(r['scaled_mm_us'])} | {_f(r['bf16_us'])} | {_f(r['bf16_us'] / r['gemv_us'], 2)}x "
                     f"| {_f(vs_gemm, 2)}{'x' if vs_gemm else ''} | {_f(best['us']) if best else ''} | {cfg_s} |")
    sums = layer_sums(result)
    if sums:
        lines += ["", "One 7B decoder layer (7 matrices), µs:", "",
                  "| M | GEMV | _scaled_mm | bf16 | roofline |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['m']} | {_f(s['gemv_us'])} | {_f(s['scaled_mm_us'])} | {_f(s['bf16_us'])} "
                  f"| {_f(s['roofline_us'])} |" for s in sums]
    meta = result["meta"]
    lines += ["", f"{meta['device']}, torch {meta['torch']}, copy bandwidth {meta['copy_gbps']:.0f} GB/s, "
                  f"{meta['date']}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/fp8_gemv.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter (seconds)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="time only the default configuration")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return ap


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
    args.device = args.device or "cuda"
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first built
        torch.set_num_threads(1)
    return args


def main(argv=None) -> dict:
    result = run_and_save(argv, parse_args, run)
    print("\n" + markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
