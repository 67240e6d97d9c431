"""GPU benchmark of prompt prefill with deltas: where a prefill step's time goes, and its ops alone.

A serving run showed prompt steps that cost hundreds of milliseconds with deltas where the base
alone takes tens. This script isolates them on a Llama-2-7B-shaped model (``--layers`` of its 32
layers, random bf16 weights, synthetic 1-bit deltas):

* engine prefill: ``n`` requests of ``len`` prompt tokens (each its own tenant, or the base alone)
  put through :class:`~bitdelta.serving.engine.Engine` with one generated token, at the default
  step token budget and at a budget that holds every prompt in one step; wall time per step and in
  all, and one prompt step under the torch profiler, its GPU time grouped by part;
* a mixed step: ``--mixed`` requests decoding (CUDA graphs on) when a 128-token prompt arrives; the
  step that prefills it beside their tokens runs eagerly: its wall and host time and profiled GPU
  time, against a decode-only step (the stall the Poisson and Zipf serving runs show);
* the segmented op alone on the three 7B matrix shapes for the same row layouts: cuBLAS base-only,
  the default configuration, the fused Triton GEMM only (``EXPAND_MIN`` 0) and the expand path only
  (``EXPAND_MIN`` 1), each checked against the reference op first; for at most 128 rows also the
  decode op's binary tensor-core kernel (``cuda_popc``) at several tokens per program (``TG``), and
  at engine level the mode "bitdelta (prompts on decode op)": sequences of up to 128 tokens kept on
  the decode op (``op_calls.SEGMENT_MIN_TOKENS`` raised to 129) instead of the segmented op.

    python -m benchmarks.prefill_step --layers 8 --cases 1x128,4x128,32x128,1x2048 --sweep --mixed 0,31

Prints a table last and writes ``prefill_step.json`` to ``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bitdelta.ops import cuda_popc, triton_ops
from bitdelta.ops import reference as ref
from bitdelta.ops.segment_table import SegmentTable
from bitdelta.serving.engine import PROMPT_GRAPHS_ENV, Engine, Request
from bitdelta.serving.sampling import SamplingParams

from ._common import LLAMA2_7B, build_base, random_linear_inputs, synthetic_delta, write_json
from .kernels import SEG_CONFIGS
from .serve.recorder import by_group_ms, gpu_kernels
from .serve.setup import SharedArtifactSlots
from .serve.workload import kv_bytes_per_seq

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (k, n) of q/k/v/o, gate/up, down
MODES = ("base", "bitdelta", "bitdelta (no host table)", "bitdelta (prompts on decode op)")
POPC_TG = (4, 8, 16)  # tokens per program of the popc decode kernel tried on prompt rows


@contextmanager
def prompts_on_decode_op(on: bool):
    """With ``on``, sequences of up to 128 tokens take the decode op instead of the segmented op."""
    if not on:
        yield
        return
    import bitdelta.serving.op_calls as op_calls

    real = op_calls.SEGMENT_MIN_TOKENS
    op_calls.SEGMENT_MIN_TOKENS = 129
    try:
        yield
    finally:
        op_calls.SEGMENT_MIN_TOKENS = real


@contextmanager
def segment_tables(on: bool):
    """With ``on`` False, the engine's segmented calls run without their host segment tables (the
    op reads the table back from the device and uses its default tiles, as before the tables)."""
    if on:
        yield
        return
    import bitdelta.serving.dispatch as dispatch

    real = dispatch.bitdelta_linear_segmented
    dispatch.bitdelta_linear_segmented = lambda *a, table=None, **k: real(*a, **k)
    try:
        yield
    finally:
        dispatch.bitdelta_linear_segmented = real


@contextmanager
def prompt_graphs(on: bool):
    """The engine's switch ``BITDELTA_PROMPT_GRAPHS`` for engines built inside: with ``on`` False, steps
    with prompt tokens run eagerly (decode steps still replay graphs)."""
    real = os.environ.get(PROMPT_GRAPHS_ENV)
    os.environ[PROMPT_GRAPHS_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if real is None:
            del os.environ[PROMPT_GRAPHS_ENV]
        else:
            os.environ[PROMPT_GRAPHS_ENV] = real


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"1x128,32x128"`` -> [(1, 128), (32, 128)]: sequences x prompt tokens."""
    out = []
    for part in text.split(","):
        n, length = part.lower().split("x")
        out.append((int(n), int(length)))
    return out


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


T0 = time.perf_counter()


# ------------------------------------------------------------------------------------ engine level


class ProfileOnce:
    """``wrap_forward`` hook: records each forward's wall time (synchronised) and runs the first
    forward with prompt tokens under the torch profiler when ``armed``."""

    def __init__(self, armed: bool):
        self.armed, self.steps, self.profile = armed, [], None

    def __call__(self, forward, batch):
        prompt = batch.has_prompt
        torch.cuda.synchronize()
        t = time.perf_counter()
        host = None
        if prompt and self.armed:
            self.armed = False
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                out = forward()
                torch.cuda.synchronize()
            kernels = gpu_kernels(prof)
            top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:10]
            self.profile = {"gpu_busy_ms": sum(v[0] for v in kernels.values()) / 1e3,
                            "kernels": sum(v[1] for v in kernels.values()),
                            "by_group_ms": by_group_ms(kernels),
                            "top": [(n[:90], v[0] / 1e3, v[1]) for n, v in top],
                            "tokens": sum(n for _, _, n in batch.seqs)}
        else:
            out = forward()
            host = (time.perf_counter() - t) * 1e3  # until the forward returned: the host's part of the step
        torch.cuda.synchronize()
        self.steps.append({"ms": (time.perf_counter() - t) * 1e3, "host_ms": host,
                           "tokens": sum(n for _, _, n in batch.seqs), "prompt": prompt,
                           "replayed": batch.replay is not None})
        return out


def engine_prefill(model, slots, tenants, length: int, budget: int | None, profile: bool) -> dict:
    """Every request prefilled and given one token; the steps' times (and one profiled prompt step)."""
    n = len(tenants)
    hook = ProfileOnce(profile)
    per_seq = kv_bytes_per_seq(model, length + 4)
    engine = Engine(model, slots, max_batch=n, max_queue=n + 1, max_len=length + 4,
                    kv_cache_mb=(per_seq * n + 2**20) / 2**20, cuda_graphs=False, wrap_forward=hook,
                    max_step_tokens=budget, max_prefill_tokens=max(budget or 0, 4096))
    g = torch.Generator().manual_seed(length + n)
    reqs = [Request(prompt=torch.randint(0, model.vocab_size, (length,), generator=g).tolist(), tenant=t,
                    params=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)) for t in tenants]
    t = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    while engine.running or engine.waiting:
        engine.step()
    wall = (time.perf_counter() - t) * 1e3
    prompt_steps = [s for s in hook.steps if s["prompt"]]
    del engine
    torch.cuda.empty_cache()
    return {"wall_ms": wall, "steps": len(hook.steps), "prompt_steps": len(prompt_steps),
            "prompt_ms": sum(s["ms"] for s in prompt_steps), "step_ms": [round(s["ms"], 2) for s in hook.steps],
            "profile": hook.profile}


def engine_mixed(model, slots, tenants, decoding: int, length: int, profile: bool, graphed: bool) -> dict:
    """``decoding`` requests decoding (one token a step, each its own tenant) when one more request of
    ``length`` prompt tokens arrives: the step that prefills it beside their decode tokens (a graph
    replay with its prompt as one-token rows, or with ``graphed`` off eager), against the
    decode-only steps around it. What a stream sees when another tenant's request arrives (the
    Poisson and Zipf runs' inter-token stalls)."""
    n = decoding + 1
    hook = ProfileOnce(profile)
    per_seq = kv_bytes_per_seq(model, length + 64)
    with prompt_graphs(graphed):
        engine = Engine(model, slots, max_batch=n, max_queue=n + 1, max_len=length + 64,
                        kv_cache_mb=(per_seq * n + 2**20) / 2**20, cuda_graphs=True, wrap_forward=hook)
    g = torch.Generator().manual_seed(length + n)

    def request(tenant, plen, new):
        return Request(prompt=torch.randint(0, model.vocab_size, (plen,), generator=g).tolist(), tenant=tenant,
                       params=SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))

    for t in tenants[:decoding]:
        engine.submit(request(t, 8, 48))
    for _ in range(12):  # past their prompts: decode steps only
        engine.step()
    hook.steps.clear()
    engine.submit(request(tenants[decoding], length, 2))
    for _ in range(4):
        engine.step()
    step = next(s for s in hook.steps if s["prompt"])
    others = [s["ms"] for s in hook.steps if not s["prompt"]]
    del engine
    torch.cuda.empty_cache()
    return {"mixed_ms": step["ms"], "mixed_host_ms": step["host_ms"], "tokens": step["tokens"],
            "decode_ms": min(others) if others else None, "profile": hook.profile, "replayed": step["replayed"]}


# ---------------------------------------------------------------------------------------- op level


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50) * 1e3  # µs


def op_rows(cases, dtype, sweep: bool) -> list[dict]:
    """The segmented op on each 7B shape and row layout: checked, then timed by variant."""
    rows = []
    for n_seq, length in cases:
        for k, n in SHAPES:
            row = op_row(n_seq, length, k, n, dtype, sweep)
            rows.append(row)
            log(f"op {row['case']:>7} {row['shape']:>11}: cuBLAS {row['cublas_us']:.0f} µs, default "
                f"{row['default_us']:.0f}, host table {row['host table_us']:.0f}, fused {row['fused only_us']:.0f}, "
                f"expand {row['expand only_us']:.0f}"
                + (f"; configs {row['sweep_us']}" if sweep else ""))
    return rows


def op_row(n_seq: int, length: int, k: int, n: int, dtype, sweep: bool) -> dict:
    """``n_seq`` segments of ``length`` rows, one tenant each, through a ``k -> n`` matrix."""
    t = n_seq * length
    x, w, _, s, sc, _ = random_linear_inputs(t, n, k, n_seq, 1, "scalar", dtype, ids=[0] * t, seed=t + n,
                                              device="cuda")
    starts = torch.arange(0, t + 1, length, dtype=torch.int32, device="cuda")
    sids = torch.arange(n_seq, dtype=torch.int32, device="cuda")
    want = ref.bitdelta_linear_segmented_ref(x.float(), w.float(), None, s, sc, "scalar", starts, sids)
    variants = {"default": None, "host table": None, "fused only": {"EXPAND_MIN": 0}, "expand only": {"EXPAND_MIN": 1}}
    row = {"case": f"{n_seq}x{length}", "shape": f"{k}->{n}", "cublas_us": bench(lambda: torch.mm(x, w.t()))}
    table = SegmentTable(starts.tolist(), sids.tolist())
    for name, cfg in variants.items():
        tab = None if name == "default" else table  # "default": the op as called before host tables
        y = triton_ops.bitdelta_segmented(x, w, None, s, sc, "scalar", starts, sids, config=cfg, table=tab)
        err = ((y.float() - want).norm() / want.norm()).item()
        assert err < 2e-2, (name, row, err)
        row[f"{name}_us"] = bench(lambda cfg=cfg, tab=tab: triton_ops.bitdelta_segmented(
            x, w, None, s, sc, "scalar", starts, sids, config=cfg, table=tab))
    if t <= 128 and cuda_popc.available(x.device):  # the decode op's kernel on the same rows
        ids = torch.arange(t, device="cuda", dtype=torch.int32) // length
        for tg in POPC_TG:
            try:
                y = cuda_popc.bitdelta_decode(x, w, None, s, sc, "scalar", ids, config={"TG": tg})
                err = ((y.float() - want).norm() / want.norm()).item()
                assert err < 2e-2, ("popc", tg, row, err)
                row[f"popc TG{tg}_us"] = bench(lambda tg=tg: cuda_popc.bitdelta_decode(
                    x, w, None, s, sc, "scalar", ids, config={"TG": tg}))
            except Exception as exc:  # noqa: BLE001 (a configuration that does not compile is reported)
                log(f"  popc TG{tg} failed: {type(exc).__name__}: {str(exc)[:100]}")
    if sweep:  # the fused GEMM's tile configurations, to choose one per row count
        times = []
        for c in SEG_CONFIGS:
            c = {**c, "EXPAND_MIN": 0}
            try:
                times.append(round(bench(lambda c=c: triton_ops.bitdelta_segmented(
                    x, w, None, s, sc, "scalar", starts, sids, config=c, table=table)), 1))
            except Exception as exc:  # noqa: BLE001 (a configuration that does not fit is skipped)
                log(f"  config {c} failed: {type(exc).__name__}: {str(exc)[:100]}")
                times.append(None)
        row["sweep_us"] = times
    return row

# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B shape (32 = all)")
    ap.add_argument("--cases", default="1x128,4x128,32x128,1x2048", help="sequences x prompt tokens")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--skip-ops", action="store_true")
    ap.add_argument("--mixed", default="0,31",
                    help="requests decoding when a 128-token prompt arrives, per mixed-step case ('' = none)")
    ap.add_argument("--sweep", action="store_true", help="time every fused-GEMM tile configuration per op row")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "a GPU benchmark"
    cases = parse_cases(args.cases)
    dtype = torch.bfloat16
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "date": time.strftime("%Y-%m-%d"), "engine": [], "ops": []}
    shape = {**LLAMA2_7B, "layers": args.layers}
    model = build_base(shape, dtype, "cuda")
    mixed = [int(v) for v in args.mixed.split(",") if v.strip()]
    most = max([n for n, _ in cases] + [d + 1 for d in mixed])
    scratch = Path(tempfile.mkdtemp(prefix="bitdelta-prefill-"))
    delta = synthetic_delta(model, seed=0)
    path = scratch / "delta-0"
    delta.save_pretrained(path)
    slots = SharedArtifactSlots(model, [path], max_gpu_deltas=most, max_cpu_deltas=most + 2)
    tenants = [f"t{i}" for i in range(most)]
    for name in tenants:
        slots.register(name, path, delta=delta)
        assert slots.load(name) is not None
    del delta
    log(f"model of {args.layers} layers and {most} tenants ready")
    for n_seq, length in cases:
        for mode in MODES:
            names = tenants[:n_seq] if mode != "base" else [None] * n_seq
            for budget in (None, n_seq * length):
                with segment_tables(mode != "bitdelta (no host table)"), \
                        prompts_on_decode_op(mode == "bitdelta (prompts on decode op)"):
                    engine_prefill(model, slots, names, length, budget, False)  # compiles every shape
                    r = engine_prefill(model, slots, names, length, budget, False)
                    r["profile"] = engine_prefill(model, slots, names, length, budget, True)["profile"]
                r.update(case=f"{n_seq}x{length}", mode=mode, budget=budget or "default")
                result["engine"].append(r)
                p = r["profile"] or {}
                log(f"engine {r['case']:>7} {mode:>24} budget {str(r['budget']):>7}: {r['prompt_steps']} prompt "
                    f"steps, {r['prompt_ms']:.1f} ms (all {r['wall_ms']:.1f} ms; steps {r['step_ms']}); "
                    "profiled step GPU "
                    f"{p.get('gpu_busy_ms', 0):.1f} ms in {p.get('kernels', 0)} kernels "
                    f"{ {g: round(v, 1) for g, v in p.get('by_group_ms', {}).items()} }")
                for name, ms_, count in p.get("top", [])[:6]:
                    log(f"    {ms_:8.2f} ms  {count:5d}x  {name}")
    result["mixed"] = []
    for decoding in mixed:
        for mode, graphed in itertools.product(("base", "bitdelta"), (True, False)):
            names = tenants if mode == "bitdelta" else [None] * len(tenants)
            engine_mixed(model, slots, names, decoding, 128, False, graphed)  # compiles and captures
            r = engine_mixed(model, slots, names, decoding, 128, False, graphed)
            r["profile"] = engine_mixed(model, slots, names, decoding, 128, True, graphed)["profile"]
            r.update(decoding=decoding, mode=mode, step_as="graph" if r["replayed"] else "eager")
            result["mixed"].append(r)
            p = r["profile"] or {}
            log(f"mixed {decoding:>3} decoding + 1 x 128 {mode:>8} ({r['step_as']}): "
                f"prompt step {r['mixed_ms']:.1f} ms "
                f"(host {r['mixed_host_ms']:.1f} until the forward returned), decode step {r['decode_ms']:.1f} ms; "
                f"profiled GPU {p.get('gpu_busy_ms', 0):.1f} ms in {p.get('kernels', 0)} kernels "
                f"{ {g: round(v, 1) for g, v in p.get('by_group_ms', {}).items()} }")
    if not args.skip_ops:
        result["ops"] = op_rows(cases, dtype, args.sweep)
    print("\nPrefill through the engine (bf16, Llama-2-7B shapes, "
          f"{args.layers} layers, {result['device']}); ms of prompt steps:")
    print("| case | budget | steps | base ms | bitdelta ms (÷ base) | without host tables ms (÷ base) "
          "| prompts on decode op ms (÷ base) |")
    print("|---|---|---|---|---|---|---|")
    eng = result["engine"]
    for b in eng:
        if b["mode"] != "base":
            continue
        d, o, p = (next(r for r in eng if r["mode"] == m and r["case"] == b["case"] and r["budget"] == b["budget"])
                   for m in MODES[1:])
        print(f"| {b['case']} | {b['budget']} | {d['prompt_steps']} | {b['prompt_ms']:.1f} | {d['prompt_ms']:.1f} "
              f"({d['prompt_ms'] / b['prompt_ms']:.2f}x) | {o['prompt_ms']:.1f} "
              f"({o['prompt_ms'] / b['prompt_ms']:.2f}x) | {p['prompt_ms']:.1f} "
              f"({p['prompt_ms'] / b['prompt_ms']:.2f}x) |")
    if result["mixed"]:
        print("\nA 128-token prompt arriving while others decode (ms; host = until the forward returned):")
        print("| decoding | mode | prompt step as | prompt step | host | GPU busy (profiled) | kernels "
              "| decode-only step |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["mixed"]:
            p = r["profile"] or {}
            print(f"| {r['decoding']} | {r['mode']} | {r['step_as']} | {r['mixed_ms']:.1f} | "
                  f"{r['mixed_host_ms']:.1f} | "
                  f"{p.get('gpu_busy_ms', 0):.1f} | {p.get('kernels', 0)} | {r['decode_ms']:.1f} |")
    if result["ops"]:
        print("\nSegmented op alone, µs (scalar scales, 1 bit):")
        popc = [f"popc TG{tg}" for tg in POPC_TG]
        print("| case | shape | cuBLAS | default | host table (÷ cuBLAS) | fused only | expand only | "
              + " | ".join(f"decode op {p}" for p in popc) + " |")
        print("|---|---|---|---|---|---|---|" + "---|" * len(popc))
        for r in result["ops"]:
            cells = " | ".join(f"{r[p + '_us']:.0f} ({r[p + '_us'] / r['cublas_us']:.2f}x)" if p + "_us" in r else "–"
                               for p in popc)
            print(f"| {r['case']} | {r['shape']} | {r['cublas_us']:.0f} | {r['default_us']:.0f} | "
                  f"{r['host table_us']:.0f} ({r['host table_us'] / r['cublas_us']:.2f}x) | {r['fused only_us']:.0f} | "
                  f"{r['expand only_us']:.0f} | {cells} |")
    if args.out:
        write_json(Path(args.out) / "prefill_step.json", result)
    return result


if __name__ == "__main__":
    main()
