"""GPU benchmark of the fused base kernels (bitdelta.ops.fused_norm): checks, per-op timings, whole decode steps.

One run does everything:
  1. checks every kernel against its PyTorch reference (bitdelta.ops.fused_base_reference) in
     bfloat16 and float16 at Llama-2-7B shapes (hidden 4096, MLP 11008, 32 heads of 128): add +
     RMSNorm (residual bit-exact; the base's weight, per-token weights and rows of a tenants'
     table; Llama and Gemma numerics), RMSNorm,
     gated SiLU and GELU-tanh (two tensors and Phi-3's one), RoPE with the paged KV write (full and
     partial rotary, with and without per-head q/k norms, rows scattered over the cache);
  2. times each fused op against the eager ops it replaces, as the serving layers run them, at
     T = 1, 8, 32, 64, 512 tokens: medians of replays from a CUDA graph;
  3. builds a Llama-2-7B-shaped served model of a few layers (random weights, two synthetic 1-bit
     deltas) and times a whole decode step (the engine's CUDA-graph step layout, graph-replayed) with
     BITDELTA_FUSED_BASE=1 and =0, base only and with deltas, and counts the GPU kernels of one step.
Prints a short table last; ``--out`` (default ``$OUT/fused_base.json`` when ``$OUT`` is set) writes JSON.

    python benchmarks/fused_base.py                       # H200: about two minutes
    python benchmarks/fused_base.py --dtype fp16 --layers 8
    python benchmarks/fused_base.py --smoke               # CPU interpreter, tiny shapes: the code runs
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root and src/ on the path
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]

import torch
from torch.nn import functional as F

from benchmarks._common import (
    LLAMA2_7B,
    SMOKE,
    BenchDevice,
    RunLog,
    build_base,
    check,
    run_and_save,
    synthetic_delta,
    time_us,
)

SHAPES = {"full": dict(hidden=4096, inter=11008, heads=32, kv_heads=32, head_dim=128),
          "smoke": dict(hidden=72, inter=40, heads=4, kv_heads=2, head_dim=24)}
EPS = 1e-5
BLOCK_SIZE = 16
CONTEXT = 512  # decode-step positions: every sequence has this many tokens before the new one


# ---------------------------------------------------------------------------------- helpers


def rand(*shape, dtype, device, seed, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def rope_inputs(t, shape, rot, dtype, device, seed):
    """q, k, v, cos/sin tables at random positions, caches with room for ``t`` scattered rows, the rows."""
    from bitdelta.serving.models.common import rope_tables

    heads, kv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    q = rand(t, heads, d, dtype=dtype, device=device, seed=seed)
    k = rand(t, kv, d, dtype=dtype, device=device, seed=seed + 1)
    v = rand(t, kv, d, dtype=dtype, device=device, seed=seed + 2)
    g = torch.Generator(device=device).manual_seed(seed)
    positions = torch.randint(0, 4096, (t,), generator=g, device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
    cos, sin = rope_tables(positions, inv_freq, 1.0, dtype)
    blocks = 2 * (-(-t // BLOCK_SIZE)) + 1
    kc = rand(blocks, BLOCK_SIZE, kv, d, dtype=dtype, device=device, seed=seed + 3)
    vc = rand(blocks, BLOCK_SIZE, kv, d, dtype=dtype, device=device, seed=seed + 4)
    rows = torch.randperm(blocks * BLOCK_SIZE, generator=g, device=device)[:t]
    return q, k, v, cos, sin, kc, vc, rows


def norm_weight(kind, t, dim, dtype, device):
    """(weight as the kernel takes it, its rows or None, the per-token weight the reference takes): the
    base's ``[D]``, per-token ``[T, D]``, or a table of 17 tenants' rows (the serving path's)."""
    if kind == "table":
        table = rand(17, dim, dtype=dtype, device=device, seed=5, scale=0.1) + 1
        rows = torch.randint(0, 17, (t,), generator=torch.Generator(device=device).manual_seed(t), device=device)
        return table, rows, table[rows]
    w = rand(*((t, dim) if kind == "per-token" else (dim,)), dtype=dtype, device=device, seed=5, scale=0.1) + 1
    return w, None, w


# ---------------------------------------------------------------------------------- 1. checks


def run_checks(shape, dtypes, dev, log) -> list[dict]:
    from bitdelta.ops import fused_base_reference as ref
    from bitdelta.ops import fused_norm as fused

    dim, inter, device = shape["hidden"], shape["inter"], dev.device
    rows = []

    def record(what, dtype, err):
        rows.append({"check": what, "dtype": str(dtype).removeprefix("torch."), "max_abs_err": err})

    for dtype in dtypes:
        for t in (1, 7, 64):
            x = rand(t, dim, dtype=dtype, device=device, seed=t)
            res = rand(t, dim, dtype=dtype, device=device, seed=t + 1, scale=3.0)
            for kind, offset in itertools.product(("base", "per-token", "table"), (0.0, 1.0)):
                w, w_rows, per_token = norm_weight(kind, t, dim, dtype, device)
                what = f"add_rms_norm T={t} {kind} {'gemma' if offset else 'llama'}"
                want_res, got_res = res.clone(), res.clone()
                want = ref.add_rms_norm_reference(x, want_res, per_token, EPS, offset)
                got = fused.add_rms_norm(x, got_res, w, EPS, offset, weight_rows=w_rows)
                if not torch.equal(got_res, want_res):
                    raise AssertionError(f"{what}: the residual sum is not bit-exact")
                record(what, dtype, check(got, want, dtype, what))
                what = what.replace("add_rms_norm", "rms_norm")
                want = ref.rms_norm_reference(res, per_token, EPS, offset)
                record(what, dtype, check(fused.rms_norm(res, w, EPS, offset, weight_rows=w_rows), want, dtype, what))
            gate_up = rand(t, 2 * inter, dtype=dtype, device=device, seed=t + 2, scale=2.0)
            for act in ("silu", "gelu_tanh"):
                gate, up = gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous()
                what = f"gated_activation T={t} {act}"
                record(what, dtype, check(fused.gated_activation(gate, up, act),
                                          ref.gated_activation_reference(gate, up, act), dtype, what))
                what += " gate_up"
                record(what, dtype, check(fused.gated_activation(gate_up, act=act),
                                          ref.gated_activation_reference(gate_up, act=act), dtype, what))
            for rot, qk_norm in ((shape["head_dim"], None), (shape["head_dim"] // 2, None),
                                 (shape["head_dim"], "table"), (shape["head_dim"], "base")):
                q, k, v, cos, sin, kc, vc, kv_rows = rope_inputs(t, shape, rot, dtype, device, seed=t + rot)
                norms, ref_norms = {}, {}
                if qk_norm:  # Qwen3's per-head norms before RoPE (Gemma-3's numerics on the table rows)
                    qw, w_rows, q_per_token = norm_weight(qk_norm, t, shape["head_dim"], dtype, device)
                    offset = 1.0 if qk_norm == "table" else 0.0
                    kw = qw.flip(-1).contiguous()
                    k_per_token = kw if w_rows is None else kw[w_rows]
                    norms = dict(q_weight=qw, k_weight=kw, weight_rows=w_rows, eps=EPS, offset=offset)
                    ref_norms = dict(q_weight=q_per_token, k_weight=k_per_token, eps=EPS, offset=offset)
                want_kc, want_vc = kc.clone(), vc.clone()
                want_q, want_k = ref.rope_kv_write_reference(q, k, v, cos, sin, want_kc, want_vc, kv_rows, **ref_norms)
                got_q, got_k = fused.rope_kv_write(q, k, v, cos, sin, kc, vc, kv_rows, return_k=True, **norms)
                what = f"rope_kv_write T={t} rotary {rot}/{shape['head_dim']}" + (f" q/k norms {qk_norm}"
                                                                                   if qk_norm else "")
                if not torch.equal(vc, want_vc):
                    raise AssertionError(f"{what}: the value cache differs")
                err = max(check(got_q, want_q, dtype, what + " q"), check(got_k, want_k, dtype, what + " k"),
                          check(kc, want_kc, dtype, what + " k cache"))
                record(what, dtype, err)
    log(f"checks: {len(rows)} kernel calls match the reference in {', '.join(map(str, dtypes))} (max abs error "
        f"{max(r['max_abs_err'] for r in rows):.2e})")
    return rows


# ---------------------------------------------------------------------------------- 2. per-op timings


def op_cases(t, shape, dtype, device):
    """Per op: (unfused eager ops as the serving layers run them, the fused kernel)."""
    from bitdelta.ops import fused_norm as fused
    from bitdelta.serving.models.common import apply_rope

    dim, inter = shape["hidden"], shape["inter"]
    kvh, d = shape["kv_heads"], shape["head_dim"]
    x = rand(t, dim, dtype=dtype, device=device, seed=1)
    res = rand(t, dim, dtype=dtype, device=device, seed=2)
    w = rand(dim, dtype=dtype, device=device, seed=3, scale=0.1) + 1
    gate = rand(t, inter, dtype=dtype, device=device, seed=4)
    up = rand(t, inter, dtype=dtype, device=device, seed=5)
    q, k, v, cos, sin, kc, vc, rows = rope_inputs(t, shape, d, dtype, device, seed=6)

    def norm_eager(h):
        return w * F.rms_norm(h.float(), (dim,), eps=EPS).to(dtype)

    def rope_eager():
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kc.view(-1, kvh, d).index_copy_(0, rows, kr)
        vc.view(-1, kvh, d).index_copy_(0, rows, v)
        return qr

    return {
        "add + RMSNorm": (lambda: norm_eager(res + x), lambda: fused.add_rms_norm(x, res, w, EPS)),
        "RMSNorm": (lambda: norm_eager(res), lambda: fused.rms_norm(res, w, EPS)),
        "SiLU(gate) * up": (lambda: F.silu(gate) * up, lambda: fused.gated_activation(gate, up, "silu")),
        "RoPE + KV write": (rope_eager, lambda: fused.rope_kv_write(q, k, v, cos, sin, kc, vc, rows)),
    }


def run_ops(shape, tokens, dtype, dev, reps, log) -> list[dict]:
    rows = []
    for t in tokens:
        cases = op_cases(t, shape, dtype, dev.device)
        for op, (eager, fused) in cases.items():
            row = {"op": op, "tokens": t, "unfused_us": time_us(eager, dev, reps),
                   "fused_us": time_us(fused, dev, reps)}
            row["speedup"] = row["unfused_us"] / row["fused_us"]
            rows.append(row)
            log(f"{op} T={t}: unfused {row['unfused_us']:.1f} us, fused {row['fused_us']:.1f} us "
                f"({row['speedup']:.2f}x)")
        dev.free_memory()
    return rows


# ---------------------------------------------------------------------------------- 3. decode steps


@contextlib.contextmanager
def fused_switch(on: bool):
    old = os.environ.get("BITDELTA_FUSED_BASE")
    os.environ["BITDELTA_FUSED_BASE"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BITDELTA_FUSED_BASE", None)
        else:
            os.environ["BITDELTA_FUSED_BASE"] = old


def kernels_per_step(fn, dev: BenchDevice) -> int | None:
    """GPU kernels one eager call of ``fn`` launches (profiler), None where the profiler cannot tell."""
    if not dev.on_gpu:
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            dev.sync()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    except Exception:  # an older profiler, or no CUPTI: the timings still stand
        return None


def build_served(model_shape, dtype, dev, log):
    from bitdelta.serving.residency import DeltaSlots

    t0 = time.perf_counter()
    model = build_base(model_shape, dtype, dev.device)
    slots = DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=4)
    tenant_slots = []
    for i in range(2):
        slots.register(f"tenant-{i}", f"<memory:tenant-{i}>", delta=synthetic_delta(model, seed=i))
        tenant_slots.append(slots.load(f"tenant-{i}"))
        assert tenant_slots[-1] is not None
    dev.sync()
    log(f"served model: {model_shape['layers']} layers of hidden {model_shape['hidden']}, 2 delta tenants "
        f"({time.perf_counter() - t0:.1f}s)")
    return model, slots, tenant_slots


def run_steps(model, slots, tenant_slots, batches, context, dev, reps, log) -> list[dict]:
    """A decode step of every batch size, base only and with deltas, with the switch on and off."""
    from bitdelta.serving.graphs import DecodeGraphs, pack_step, pick
    from bitdelta.serving.kv_cache import KVCache

    top = max(batches)
    kv = KVCache(model.num_layers, top, 2 * context, model.kv_heads, model.head_dim, model.dtype, model.device,
                 block_size=BLOCK_SIZE)
    graphs = DecodeGraphs(model, kv, slots, top, capture=False)
    rows = []
    for b in batches:
        bucket = pick(b, graphs.batches)
        span = pick(context + 1, graphs.spans)
        for delta in (False, True):
            entries = [(i, context, [17 + i], tenant_slots[i % 2] if delta else -1) for i in range(b)]
            for slot, start, _, _ in entries:
                assert kv.ensure(slot, start + 1)
            graphs.inputs[bucket].copy_(pack_step(entries, bucket, kv))
            row = {"batch": b, "bucket": bucket, "deltas": delta}
            logits = {}
            for on in (False, True):
                key = "fused" if on else "unfused"
                with fused_switch(on):
                    def step(b=bucket, s=span, d=delta):  # the switch is read as the forward runs
                        return graphs._forward(b, s, d)
                    logits[key] = step().float()
                    row[f"{key}_us"] = time_us(step, dev, reps)
                    row[f"{key}_kernels"] = kernels_per_step(step, dev)
            row["speedup"] = row["unfused_us"] / row["fused_us"]
            scale = float(logits["unfused"].abs().max())
            row["max_logit_diff"] = float((logits["fused"] - logits["unfused"]).abs().max())
            row["logit_scale"] = scale
            rows.append(row)
            log(f"decode step B={b} ({'deltas' if delta else 'base'}): unfused {row['unfused_us']:.0f} us "
                f"({row['unfused_kernels']} kernels), fused {row['fused_us']:.0f} us ({row['fused_kernels']} "
                f"kernels): {row['speedup']:.2f}x; logits differ by at most {row['max_logit_diff']:.3g} "
                f"(largest {scale:.3g})")
    return rows


# ---------------------------------------------------------------------------------- report


def table(result: dict) -> str:
    lines = ["| op | T | unfused µs | fused µs | × |", "|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['tokens']} | {r['unfused_us']:.1f} | {r['fused_us']:.1f} | {r['speedup']:.2f}× |"
              for r in result["ops"]]
    lines += ["", "| decode step | B | unfused µs | fused µs | × | kernels unfused → fused |",
              "|---|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {'deltas' if r['deltas'] else 'base'} | {r['batch']} | {r['unfused_us']:.0f} | "
                     f"{r['fused_us']:.0f} | {r['speedup']:.2f}× | {r['unfused_kernels']} → {r['fused_kernels']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/fused_base.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="the timings' dtype (checks run both)")
    ap.add_argument("--tokens", default="1,8,32,64,512", help="per-op timings: tokens per call")
    ap.add_argument("--batches", default="1,8,32,64", help="decode steps: sequences per step")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-shaped model")
    ap.add_argument("--reps", type=int, default=30, help="timing repetitions (ms of replays on a GPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument("--out", default=None, help="JSON file to write (default: $OUT/fused_base.json when $OUT is set)")
    return ap


def run(args) -> dict:
    if args.smoke:
        args.device = args.device or "cpu"
        args.tokens, args.batches, args.reps = "1,3", "1,3", 1
    dev = BenchDevice(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not dev.on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported
    if args.out is None and os.environ.get("OUT"):
        args.out = str(Path(os.environ["OUT"]) / "fused_base.json")
    shape = SHAPES["smoke" if args.smoke else "full"]
    model_shape = dict(SMOKE if args.smoke else LLAMA2_7B, layers=2 if args.smoke else args.layers)
    if args.smoke:
        model_shape.update(hidden=shape["hidden"], heads=shape["heads"], kv_heads=shape["kv_heads"],
                           inter=shape["inter"])
    dtype = torch.float32 if not dev.on_gpu else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    check_dtypes = [torch.float32] if not dev.on_gpu else [torch.bfloat16, torch.float16]
    log = RunLog()
    meta = {"device": dev.name(), "torch": torch.__version__, "dtype": str(dtype), "shape": shape,
            "model": model_shape, "context": CONTEXT, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log(f"device {meta['device']}; torch {meta['torch']}; {meta['dtype']}")
    checks = run_checks(shape, check_dtypes, dev, log)
    ops = run_ops(shape, [int(t) for t in args.tokens.split(",")], dtype, dev, args.reps, log)
    model, slots, tenant_slots = build_served(model_shape, dtype, dev, log)
    context = 20 if args.smoke else CONTEXT
    batches = [int(b) for b in args.batches.split(",")]
    steps = run_steps(model, slots, tenant_slots, batches, context, dev, args.reps, log)
    log("done")
    return {"meta": meta, "checks": checks, "ops": ops, "steps": steps}


def main(argv=None) -> dict:
    results = run_and_save(argv, build_parser().parse_args, run)
    print("\n" + table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
