"""GPU benchmark of the BitDelta kernels: correctness checks, copy bandwidth, decode and prefill timings.

One run does everything, so the roofline and the timings come from the same machine state:
  1. checks every kernel variant against the reference op on random inputs (never zeros);
  2. measures copy bandwidth (device-to-device copy, bytes read + written);
  3. sweeps a few launch configs, then times (triton.testing.do_bench, median) for Llama-2-7B
     linear shapes, fp16 and bf16: decode with B tenants x 1 token (ours, roofline, % of roofline,
     cuBLAS base-only, naive per-tenant unpack path) and prefill (2048 x 1 tenant, 16 x 128).
     Decode = cuBLAS base GEMM + the Triton delta kernel + one add; the delta kernel alone is
     timed too, against the bytes it must read (B·NK/8).
  4. the binary tensor-core decode kernel (bitdelta.ops.cuda_popc) side by side with the Triton
     decode path: its own checks, a small config sweep, then the whole op (serial, and with the
     delta on a side stream beside cuBLAS), the delta part alone against the plain read of its
     bytes (B·NK/8 at the copy bandwidth), both dtypes.
Prints a short table last and writes markdown + JSON to $OUT when set.

    python benchmarks/kernels.py            # full run
    python benchmarks/kernels.py --quick    # fewer configs (~5 min on an H100 with a cold Triton cache)
    python benchmarks/kernels.py --popc     # only step 4 (and the copy bandwidth)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script: the benchmarks package and the library

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from benchmarks._common import (  # noqa: E402
    copy_bandwidth,
    decode_op_bytes,
    graph_time_us,
    random_linear_inputs,
    roofline_us,
)
from bitdelta.ops import bitplane, triton_ops  # noqa: E402
from bitdelta.ops import reference as ref  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K in, N out): 4096->4096, 4096->11008, 11008->4096
BATCHES = [1, 4, 16, 64]
DTYPES = [torch.float16, torch.bfloat16]
_D = {"BKD": 256, "TG": 16, "DOT_MIN": 4, "SPLIT_K": 0, "GEMV": 0, "num_stages": 2}
# Decode: B distinct tenants x 1 token take the CUDA-core sign GEMV unless DOT_MIN <= 1; GEMV picks its
# arithmetic (0 select + fp32 add, 1 lookup tables, 2 packed fp16 pairs: triton_ops.DEFAULT_CONFIGS).
DEC_CONFIGS = [
    {**_D, "BN": 64, "BKW": 8, "num_warps": 4},
    {**_D, "BN": 128, "BKW": 8, "num_warps": 4},
    {**_D, "BN": 128, "BKW": 8, "num_warps": 4, "GEMV": 1},  # lookup-table GEMV (in the --quick set)
    {**_D, "BN": 128, "BKW": 8, "num_warps": 4, "GEMV": 2},  # packed-half GEMV, the default (--quick set)
    {**_D, "BN": 32, "BKW": 8, "num_warps": 4},
    {**_D, "BN": 64, "BKW": 4, "num_warps": 4, "GEMV": 1},
    {**_D, "BN": 64, "BKW": 4, "num_warps": 4, "GEMV": 2},
    {**_D, "BN": 64, "BKW": 4, "num_warps": 2},
    {**_D, "BN": 128, "BKW": 4, "num_warps": 8},
    {**_D, "BN": 64, "BKW": 8, "num_warps": 4, "DOT_MIN": 1},
    {**_D, "BN": 64, "BKW": 8, "num_warps": 4, "SPLIT_K": 1},
    {**_D, "BN": 256, "BKW": 8, "num_warps": 8},
]
# Fused segmented kernel (EXPAND_MIN 0); long segments are timed with the default EXPAND_MIN.
SEG_CONFIGS = [
    {"BM": 64, "BN": 128, "BK": 64, "SWAP": False, "num_warps": 4, "num_stages": 4},
    {"BM": 128, "BN": 128, "BK": 64, "SWAP": True, "num_warps": 8, "num_stages": 3},
    {"BM": 256, "BN": 128, "BK": 64, "SWAP": True, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 64, "BK": 64, "SWAP": True, "num_warps": 4, "num_stages": 4},
    {"BM": 256, "BN": 64, "BK": 64, "SWAP": True, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 64, "SWAP": False, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 256, "BK": 64, "SWAP": True, "num_warps": 8, "num_stages": 3},
]


def bench(fn, warmup=10, rep=50):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # microseconds


def make(t, n, k, d, bits, mode, dtype, ids, seed=0):
    """Random op inputs on the GPU (``_common.random_linear_inputs``): x, w, None, signs, scales, ids."""
    return random_linear_inputs(t, n, k, d, bits, mode, dtype, ids=ids, seed=seed, device="cuda")


def rel_err(y, r):
    return ((y.float() - r.float()).norm() / r.float().norm()).item()


def naive_path(x, w, signs, sc, mode, tenants_rows):
    """Reference-like two-pass path: cuBLAS base GEMM + per tenant unpack to dense + matmul."""
    y = F.linear(x, w)
    k = x.shape[1]
    for d, rows in tenants_rows:
        dense = ref.delta_dense(signs[d], sc[d], mode, k, dtype=x.dtype)
        y[rows] += x[rows] @ dense.T
    return y


def checks(log):
    """Every variant vs the reference: modes, bits, dtypes, mixed/-1 ids, odd shapes, segmented."""
    worst = 0.0
    cases = []
    for mode in ["scalar", "row", "col"]:
        for bits in [1, 2]:
            for dtype in DTYPES:
                cases.append((mode, bits, dtype))
    for mode, bits, dtype in cases:
        for t, n, k in [(1, 4096, 4096), (13, 1000, 2056), (64, 11008, 4096), (40, 4096, 11008)]:
            ids = torch.randint(-1, 6, (t,))
            x, w, b, s, sc, ids = make(t, n, k, 6, bits, mode, dtype, ids, seed=t)
            b = torch.randn(n, device="cuda").to(dtype)
            y = triton_ops.bitdelta_linear(x, w, b, s, sc, mode, ids)
            e = rel_err(y, ref.bitdelta_linear_ref(x, w, b, s, sc, mode, ids))
            worst = max(worst, e)
            assert e < 1e-2 and torch.isfinite(y).all(), (mode, bits, dtype, t, n, k, e)
            default_gemv = triton_ops.DEFAULT_CONFIGS["decode"]["GEMV"]  # checked by the call above
            for gemv in (0, 1, 2):  # the other GEMVs (int32 sign words: k % 32 == 0), every tenant
                if k % 32 or t > triton_ops.DECODE_MAX_TOKENS or gemv == default_gemv:
                    continue
                cfg = {**triton_ops.DEFAULT_CONFIGS["decode"], "GEMV": gemv, "DOT_MIN": 129}
                y = triton_ops.bitdelta_decode(x, w, b, s, sc, mode, ids, config=cfg)
                e = rel_err(y, ref.bitdelta_linear_ref(x, w, b, s, sc, mode, ids))
                worst = max(worst, e)
                assert e < 1e-2 and torch.isfinite(y).all(), ("gemv", gemv, mode, bits, dtype, t, n, k, e)
        # prefill / segmented, incl. a base-only segment, and the >64-token sort path
        t, n, k = 700, 1000, 2056
        starts = torch.tensor([0, 300, 300, 450, 700], dtype=torch.int32, device="cuda")
        sids = torch.tensor([3, 1, -1, 0], dtype=torch.int32, device="cuda")
        x, w, b, s, sc, _ = make(t, n, k, 4, bits, mode, dtype, [0], seed=5)
        y = triton_ops.bitdelta_segmented(x, w, None, s, sc, mode, starts, sids)
        e = rel_err(y, ref.bitdelta_linear_segmented_ref(x, w, None, s, sc, mode, starts, sids))
        worst = max(worst, e)
        assert e < 1e-2, ("segmented", mode, bits, dtype, e)
        ids = torch.randint(-1, 4, (t,), device="cuda", dtype=torch.int32)
        y = triton_ops.bitdelta_linear(x, w, None, s, sc, mode, ids)
        e = rel_err(y, ref.bitdelta_linear_ref(x, w, None, s, sc, mode, ids))
        worst = max(worst, e)
        assert e < 1e-2, ("sorted", mode, bits, dtype, e)
    # all -1 equals base-only
    x, w, _, s, sc, _ = make(16, 4096, 4096, 2, 1, "row", torch.float16, [0])
    ids = torch.full((16,), -1, dtype=torch.int32, device="cuda")
    e = rel_err(triton_ops.bitdelta_linear(x, w, None, s, sc, "row", ids), F.linear(x.float(), w.float()))
    assert e < 1e-3, e
    # CUDA graph capture of the decode path
    x, w, _, s, sc, ids = make(16, 4096, 4096, 16, 1, "row", torch.float16, list(range(16)))
    triton_ops.bitdelta_linear(x, w, None, s, sc, "row", ids)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = triton_ops.bitdelta_linear(x, w, None, s, sc, "row", ids)
    ids.copy_(ids.flip(0))
    x.copy_(torch.randn_like(x))
    g.replay()
    e = rel_err(yg, ref.bitdelta_linear_ref(x, w, None, s, sc, "row", ids))
    assert e < 1e-2, e
    log(f"checks passed: {len(cases)} mode/bits/dtype combos x 6 paths + graph capture; worst rel err {worst:.2e}")


ROTATE = 4  # input sets cycled in graph timing, so each call reads from HBM, not L2


def bench_graph(make_calls, inner=8, reps=15):
    """Median µs per call of GPU time, launch overhead excluded: ``make_calls()`` returns ROTATE
    closures over distinct input sets (together larger than L2); one CUDA graph replays them
    ``inner`` times in turn, as a decode step inside a captured model forward would run."""
    return graph_time_us(make_calls(), inner, reps)


def decode_sets(n, k, b, dtype):
    return [make(b, n, k, b, 1, "row", dtype, list(range(b)), seed=b + 100 * r) for r in range(ROTATE)]


def sweep_decode(log, quick):
    best = {}
    cfgs = DEC_CONFIGS[:4] if quick else DEC_CONFIGS
    for (k, n) in SHAPES:
        for b in BATCHES:
            sets = decode_sets(n, k, b, torch.float16)
            times = []
            for i, c in enumerate(cfgs):
                try:
                    times.append((bench_graph(lambda sets=sets, c=c: [
                        (lambda a=a: triton_ops.bitdelta_decode(a[0], a[1], None, a[3], a[4], "row", a[5], config=c))
                        for a in sets]), i))
                except Exception as exc:  # a config that does not compile (smem) is skipped
                    log(f"  config {c} failed: {type(exc).__name__}: {str(exc)[:120]}")
            times.sort()
            best[(k, n, b)] = cfgs[times[0][1]]
            del sets
            log(f"sweep decode {k}->{n} B={b}: "
                + ", ".join(f"c{i}={t:.1f}" for t, i in sorted(times, key=lambda z: z[1])))
    return best


def sweep_seg(log, quick):
    k, n = 4096, 4096
    t = 2048
    x, w, _, s, sc, _ = make(t, n, k, 16, 1, "row", torch.float16, [0])
    starts = torch.arange(0, t + 1, 128, dtype=torch.int32, device="cuda")
    sids = torch.arange(16, dtype=torch.int32, device="cuda")
    res = []
    for i, c in enumerate(SEG_CONFIGS[:2] if quick else SEG_CONFIGS):
        c = {**c, "EXPAND_MIN": 0}
        try:
            res.append((bench(lambda c=c: triton_ops.bitdelta_segmented(x, w, None, s, sc, "row", starts, sids,
                                                                        config=c)), i))
        except Exception as exc:
            log(f"  seg config {c} failed: {type(exc).__name__}: {str(exc)[:120]}")
    log("sweep prefill 16x128 tokens, 4096x4096: "
        + ", ".join(f"c{i}={t:.1f}" for t, i in sorted(res, key=lambda z: z[1])))
    return {**SEG_CONFIGS[min(res)[1]], "EXPAND_MIN": triton_ops.DEFAULT_CONFIGS["segmented"]["EXPAND_MIN"]}


# Binary tensor-core decode kernel (cuda_popc.DEFAULT_CONFIG keys): warps per block, tokens per pass,
# groups loaded ahead, target block count for the K split.
POPC_CONFIGS = [
    {"NW": 4, "TG": 4, "U": 4, "TARGET": 1024},  # the default (cuda_popc.DEFAULT_CONFIG)
    {"NW": 4, "TG": 1, "U": 4, "TARGET": 1024},
    {"NW": 4, "TG": 2, "U": 4, "TARGET": 1024},
    {"NW": 4, "TG": 1, "U": 8, "TARGET": 1024},
    {"NW": 2, "TG": 1, "U": 4, "TARGET": 2048},
    {"NW": 8, "TG": 1, "U": 4, "TARGET": 1024},
    {"NW": 4, "TG": 1, "U": 4, "TARGET": 4096},
]
# Decode batches where tenants have several tokens: (tokens, tenants), on 4096->11008.
MULTI_TOKEN = [(64, 4), (64, 1), (128, 16)]


def popc_checks(log):
    """The popc kernel vs its bit-plane spec (same quantisation, float32 rounding) and vs the fp32
    reference op (quantisation bound), on the benchmark's shapes and odd ones; graph capture."""
    from bitdelta.ops import cuda_popc

    worst_spec, worst_delta = 0.0, 0.0
    for mode in ["scalar", "row", "col"]:
        for bits in [1, 2]:
            for dtype in DTYPES:
                for t, n, k in [(1, 4096, 4096), (13, 1000, 2056), (64, 11008, 4096), (40, 4096, 11008)]:
                    ids = torch.randint(-1, 6, (t,))
                    ids[0] = 2  # at least one tenant token (an all -1 batch is checked below)
                    x, w, b, s, sc, ids = make(t, n, k, 6, bits, mode, dtype, ids, seed=t)
                    got = cuda_popc.decode_delta(x, s, sc, mode, ids)
                    assert torch.isfinite(got).all()
                    if n * k <= 4096 * 4096:  # the CPU spec is slow on the two large shapes
                        want = bitplane.delta_bitplane(x.cpu(), s.cpu(), sc.cpu(), mode, ids.cpu())
                        e = rel_err(got.cpu(), want)
                        worst_spec = max(worst_spec, e)
                        assert e < 1e-4, ("popc vs spec", mode, bits, dtype, t, n, k, e)
                    exact = ref.bitdelta_linear_ref(x.float(), torch.zeros_like(w, dtype=torch.float32), None, s, sc,
                                                    mode, ids)
                    e = rel_err(got, exact)
                    worst_delta = max(worst_delta, e)
                    assert e < 2e-2, ("popc delta vs fp32 reference", mode, bits, dtype, t, n, k, e)
    x, w, _, s, sc, ids = make(8, 1000, 2056, 2, 1, "col", torch.float16, [-1] * 8)
    assert torch.equal(cuda_popc.decode_delta(x, s, sc, "col", ids), torch.zeros(8, 1000, device="cuda"))
    x, w, _, s, sc, ids = make(16, 4096, 4096, 16, 1, "row", torch.float16, list(range(16)))
    for overlap in (False, True):
        cuda_popc.bitdelta_decode(x, w, None, s, sc, "row", ids, overlap=overlap)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = cuda_popc.bitdelta_decode(x, w, None, s, sc, "row", ids, overlap=overlap)
        ids.copy_(ids.flip(0))
        x.copy_(torch.randn_like(x))
        g.replay()
        e = rel_err(yg, ref.bitdelta_linear_ref(x, w, None, s, sc, "row", ids))
        assert e < 1e-2, ("graph", overlap, e)
    log(f"popc checks passed (3 modes x bits 1/2 x fp16/bf16 x 4 shapes, graph capture): worst rel err vs the "
        f"bit-plane spec {worst_spec:.1e}, delta term vs the fp32 reference {worst_delta:.2e}")


def popc_table(log, bw, records):
    """Decode, B tenants x 1 token, row scales, 1 bit: Triton default vs the popc kernel."""
    from bitdelta.ops import cuda_popc

    best = {}
    for (k, n) in SHAPES:  # config sweep on the delta part alone, fp16
        for b in BATCHES:
            sets = decode_sets(n, k, b, torch.float16)
            res = []
            for i, c in enumerate(POPC_CONFIGS):
                res.append((bench_graph(lambda sets=sets, c=c: [
                    (lambda a=a: cuda_popc.decode_delta(a[0], a[3], a[4], "row", a[5], config=c))
                    for a in sets]), i))
            best[(k, n, b)] = POPC_CONFIGS[min(res)[1]]
            log(f"popc sweep {k}->{n} B={b}: "
                + ", ".join(f"p{i}={t:.1f}" for t, i in sorted(res, key=lambda z: z[1])))
            del sets
    mt_rows = []
    k, n = 4096, 11008
    for t, d in MULTI_TOKEN:  # several tokens per tenant: the Triton kernel's tensor-core path vs popc passes
        sets = [make(t, n, k, d, 1, "row", torch.float16, [i % d for i in range(t)], seed=t + d + 100 * r)
                for r in range(ROTATE)]
        tri = bench_graph(lambda sets=sets: [
            (lambda a=a: triton_ops.bitdelta_decode(a[0], a[1], None, a[3], a[4], "row", a[5])) for a in sets])
        res = [(bench_graph(lambda sets=sets, c=c: [
                    (lambda a=a: cuda_popc.bitdelta_decode(a[0], a[1], None, a[3], a[4], "row", a[5], config=c))
                    for a in sets]), i)
               for i, c in enumerate(POPC_CONFIGS)]
        x, w, _, s, sc, ids = sets[0]
        err = rel_err(cuda_popc.bitdelta_decode(x, w, None, s, sc, "row", ids),
                      ref.bitdelta_linear_ref(x, w, None, s, sc, "row", ids))
        del sets
        records.append(dict(kind="decode_popc_multi", dtype="float16", k=k, n=n, T=t, tenants=d, triton_us=tri,
                            popc_us={i: v for v, i in res}, rel_err=err))
        mt_rows.append(f"| {t} tokens / {d} tenants | {tri:.1f} | " + " | ".join(f"{v:.1f}" for v, _ in res) + " |")
    log("\nfloat16 4096→11008, whole op µs, tenants with several tokens:\n\n| batch | Triton | "
        + " | ".join(f"popc p{i}" for i in range(len(POPC_CONFIGS))) + " |\n|---|---|"
        + "---|" * len(POPC_CONFIGS) + "\n" + "\n".join(mt_rows))
    rows = []
    for dtype in DTYPES:
        dname = str(dtype).split(".")[-1]
        for (k, n) in SHAPES:
            for b in BATCHES:
                sets = decode_sets(n, k, b, dtype)
                x, w, _, s, sc, ids = sets[0]
                cfg = None  # the default config: what the dispatcher runs (the sweep above shows the others)
                tri = bench_graph(lambda sets=sets: [
                    (lambda a=a: triton_ops.bitdelta_decode(a[0], a[1], None, a[3], a[4], "row", a[5]))
                    for a in sets])
                tri_d = bench_graph(lambda sets=sets: [
                    (lambda a=a: triton_ops.decode_delta(a[0], a[3], a[4], "row", a[5])) for a in sets])
                pop = bench_graph(lambda sets=sets, cfg=cfg: [
                    (lambda a=a: cuda_popc.bitdelta_decode(a[0], a[1], None, a[3], a[4], "row", a[5], config=cfg))
                    for a in sets])
                pov = bench_graph(lambda sets=sets, cfg=cfg: [
                    (lambda a=a: cuda_popc.bitdelta_decode(a[0], a[1], None, a[3], a[4], "row", a[5], config=cfg,
                                                           overlap=True))
                    for a in sets])
                pop_d = bench_graph(lambda sets=sets, cfg=cfg: [
                    (lambda a=a: cuda_popc.decode_delta(a[0], a[3], a[4], "row", a[5], config=cfg)) for a in sets])
                cub = bench_graph(lambda sets=sets: [(lambda a=a: F.linear(a[0], a[1])) for a in sets])
                y = cuda_popc.bitdelta_decode(x, w, None, s, sc, "row", ids, config=cfg)
                err = rel_err(y, ref.bitdelta_linear_ref(x, w, None, s, sc, "row", ids))
                del sets
                byts = decode_op_bytes(n, k, b)
                roof = roofline_us(byts, bw)
                read = roofline_us(b * n * k / 8, bw)
                best_pop = min(pop, pov)
                records.append(dict(kind="decode_popc", dtype=dname, k=k, n=n, B=b, triton_us=tri,
                                    triton_delta_us=tri_d, popc_us=pop, popc_overlap_us=pov, popc_delta_us=pop_d,
                                    cublas_base_us=cub, roofline_us=roof, read_us=read,
                                    pct_roofline_triton=100 * roof / tri, pct_roofline_popc=100 * roof / best_pop,
                                    rel_err=err, best_sweep_config=best[(k, n, b)]))
                rows.append(f"| {dname} | {k}→{n} | B={b} | {tri:.1f} ({100 * roof / tri:.0f}%) | {pop:.1f} "
                            f"| {pov:.1f} | {100 * roof / best_pop:.0f}% | {cub:.1f} | {tri_d:.1f} | {pop_d:.1f} "
                            f"| {read:.1f} | {pop_d / read:.2f}× | {tri / best_pop:.2f}× |")
        log(f"popc {dname} timed")
    head = [
        "Decode, B tenants × 1 token, row scales, 1 bit, popc default config; µs per call "
        "(CUDA-graph replay, 4 rotating input sets); "
        f"roofline = (2NK + B·NK/8 bytes) / {bw:.0f} GB/s; read = B·NK/8 bytes at that bandwidth.",
        "",
        "| dtype | shape | B | Triton (GEMV 2) µs (% roofline) | popc µs | popc overlap µs | popc % roofline (best) "
        "| cuBLAS base µs | Triton delta µs | popc delta µs | read µs | popc delta / read | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    log("\n" + "\n".join(head + rows))
    return head + rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--popc", action="store_true",
                    help="only the binary tensor-core decode kernel (and copy bandwidth)")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT")
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)
        if out_dir:
            with open(Path(out_dir, "kernels.log"), "a") as f:
                f.write(msg + "\n")

    dev = torch.cuda.get_device_name()
    log(f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; date {time.strftime('%Y-%m-%d')}")
    t0 = time.time()
    if args.popc:
        popc_checks(log)
        bw = copy_bandwidth("cuda")
        log(f"copy bandwidth: {bw:.0f} GB/s (1 GiB device-to-device copy, read + write)")
        records = []
        popc_table(log, bw, records)
        log(f"[{time.time() - t0:.0f}s] done")
        if out_dir:
            Path(out_dir, "kernels-popc.json").write_text(
                json.dumps({"device": dev, "copy_gbps": bw, "records": records}, indent=1))
        return
    checks(log)
    popc_checks(log)
    log(f"[{time.time() - t0:.0f}s] checks done")
    bw = copy_bandwidth("cuda")
    log(f"copy bandwidth: {bw:.0f} GB/s (1 GiB device-to-device copy, read + write)")

    best_dec = sweep_decode(log, args.quick)
    best_seg = sweep_seg(log, args.quick)
    log(f"[{time.time() - t0:.0f}s] sweeps done; prefill config {best_seg}")

    rows, records = [], []
    for dtype in DTYPES:
        dname = str(dtype).split(".")[-1]
        for (k, n) in SHAPES:
            for b in BATCHES:
                sets = decode_sets(n, k, b, dtype)
                x, w, _, s, sc, ids = sets[0]
                cfg = best_dec[(k, n, b)]
                ours = bench_graph(lambda sets=sets, cfg=cfg: [
                    (lambda a=a: triton_ops.bitdelta_decode(a[0], a[1], None, a[3], a[4], "row", a[5], config=cfg))
                    for a in sets])
                y = triton_ops.bitdelta_decode(x, w, None, s, sc, "row", ids, config=cfg)
                err = rel_err(y, ref.bitdelta_linear_ref(x, w, None, s, sc, "row", ids))
                cub = bench_graph(lambda sets=sets: [(lambda a=a: F.linear(a[0], a[1])) for a in sets])
                delta_only = bench_graph(lambda sets=sets, cfg=cfg: [
                    (lambda a=a: triton_ops.decode_delta(a[0], a[3], a[4], "row", a[5], config=cfg)) for a in sets])
                tr = [(d, slice(d, d + 1)) for d in range(b)]
                naive = bench(lambda x=x, w=w, s=s, sc=sc, tr=tr: naive_path(x, w, s, sc, "row", tr), warmup=5, rep=30)
                del sets
                byts = decode_op_bytes(n, k, b)
                roof = roofline_us(byts, bw)
                rec = dict(kind="decode", dtype=dname, k=k, n=n, B=b, ours_us=ours, roofline_us=roof,
                           pct_roofline=100 * roof / ours, gbps=byts / ours / 1e3, cublas_base_us=cub,
                           naive_us=naive, rel_err=err, config=cfg, delta_total_us=delta_only,
                           delta_gbps=(b * n * k / 8) / delta_only / 1e3)
                records.append(rec)
                rows.append(f"| decode | {dname} | {k}→{n} | B={b} | {ours:.1f} | {roof:.1f} "
                            f"| {100 * roof / ours:.0f}% | {byts / ours / 1e3:.0f} | {cub:.1f} "
                            f"| {naive:.1f} (delta part {delta_only:.1f}) |")
        for (k, n) in SHAPES:
            for name, segs in [("2048x1", [2048]), ("16x128", [128] * 16)]:
                t = sum(segs)
                d = len(segs)
                starts = torch.tensor([0] + list(itertools.accumulate(segs)), dtype=torch.int32, device="cuda")
                sids = torch.arange(d, dtype=torch.int32, device="cuda")
                x, w, _, s, sc, _ = make(t, n, k, d, 1, "row", dtype, [0], seed=d)
                ours = bench(lambda x=x, w=w, s=s, sc=sc, starts=starts, sids=sids: triton_ops.bitdelta_segmented(
                    x, w, None, s, sc, "row", starts, sids, config=best_seg))
                y = triton_ops.bitdelta_segmented(x, w, None, s, sc, "row", starts, sids, config=best_seg)
                err = rel_err(y, ref.bitdelta_linear_segmented_ref(x, w, None, s, sc, "row", starts, sids))
                cub = bench(lambda x=x, w=w: F.linear(x, w))
                st = starts.tolist()
                tr = [(i, slice(st[i], st[i + 1])) for i in range(d)]
                naive = bench(lambda x=x, w=w, s=s, sc=sc, tr=tr: naive_path(x, w, s, sc, "row", tr), warmup=5, rep=30)
                fused_cfg = {**best_seg, "EXPAND_MIN": 0}
                fused = bench(lambda x=x, w=w, s=s, sc=sc, starts=starts, sids=sids, fused_cfg=fused_cfg:
                              triton_ops.bitdelta_segmented(x, w, None, s, sc, "row", starts, sids, config=fused_cfg))
                tflops = 2 * t * n * k / ours / 1e6
                rec = dict(kind="prefill", dtype=dname, k=k, n=n, case=name, ours_us=ours, cublas_base_us=cub,
                           ratio=ours / cub, naive_us=naive, fused_only_us=fused, tflops=tflops, rel_err=err,
                           config=best_seg)
                records.append(rec)
                rows.append(f"| prefill {name} | {dname} | {k}→{n} | T={t} | {ours:.1f} | – "
                            f"| {ours / cub:.2f}× cuBLAS | {tflops:.0f} TFLOP/s | {cub:.1f} "
                            f"| {naive:.1f} (fused-only {fused:.1f}) |")
        log(f"[{time.time() - t0:.0f}s] {dname} timed")

    head = [
        f"Device: {dev}. Copy bandwidth measured in this run: {bw:.0f} GB/s. Times in µs (do_bench median).",
        "Decode: row scales, 1 bit, B tenants × 1 token; roofline = (2NK + B·NK/8 bytes) / copy bandwidth;",
        "decode times are CUDA-graph replays over 4 rotating input sets (GPU time, no launch overhead, no L2 reuse).",
        "",
        "| case | dtype | shape | batch | ours µs | roofline µs | % roofline / vs cuBLAS | GB/s or TFLOP/s "
        "| cuBLAS base-only µs | naive per-tenant µs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(head + rows)
    log("\n" + table)
    popc_table(log, bw, records)
    if out_dir:
        Path(out_dir, "kernels.md").write_text("\n".join(lines) + "\n")
        Path(out_dir, "kernels.json").write_text(json.dumps({"device": dev, "copy_gbps": bw, "records": records,
                                                             "best_decode": {str(k): v for k, v in best_dec.items()}},
                                                            indent=1))


if __name__ == "__main__":
    main()
