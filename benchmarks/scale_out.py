"""Scale-out on Ray Serve, measured in one run: R replicas against one, delta hit rate against the
routing simulator, and one replica killed under load.

Phases, each printed as a line and recorded in the JSON (``--out``):

1. one replica under a closed loop of C streamed requests in flight (the ``openai`` client against
   the HTTP ingress), tenants uniform, then Zipf(``--zipf``): tokens/s, TTFT and TPOT p50/p99;
2. R replicas at the same load per replica (C·R in flight), the same two tenant mixes; scaling
   efficiency = tok/s(R) / (R · tok/s(1));
3. in phases 1 and 2, the delta hit rate of each replica from its own counters (delta loads and
   finished requests over the measured requests, after a warm-up) against
   ``benchmarks/routing_sim.py`` run here for the same tenants, replicas, deltas per replica, Zipf
   exponent and requests in flight;
4. R replicas under Zipf load; the replica with the most streams in flight is SIGKILLed: requests
   failed and lost against those in flight on it, how long throughput takes to come back to 90% of
   before, and whether (and when) Serve replaces the replica.

A markdown table with the goal checks comes last. Presets: ``gpu7b`` (a 7B-shaped random bf16 base
and 64 random 1-bit deltas written once under ``--work-dir``, one GPU per replica, R = the GPU count)
and ``cpu-tiny`` (the bundled tiny base and copies of its two deltas, CPU replicas: checks the
mechanics; its throughput figures say nothing about scale-out).

    python benchmarks/scale_out.py --preset gpu7b --prepare-only             # write base + store (~70 GB)
    python benchmarks/scale_out.py --preset gpu7b --replicas 2 --out $OUT/scale_out.json
    python benchmarks/scale_out.py --preset cpu-tiny --replicas 2 --out /tmp/scale_out.json   # CPU, ~4 min
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script: the benchmarks package and the library

from benchmarks._common import LLAMA2_7B, RunLog  # noqa: E402
from benchmarks.scale_out_inputs import (  # noqa: E402
    INPUTS_RECORD,
    inputs_ready,
    mark_inputs,
    tenant_names,
    write_random_base,
    write_random_store,
    write_tiny_store,
)
from benchmarks.scale_out_load import (  # noqa: E402
    LoadSpec,
    chunk_times,
    closed_loop,
    in_flight_at,
    recovery,
    summarize,
    tenant_stream,
)
from benchmarks.scale_out_report import goal_checks, hit_rates, markdown, phase_line, predicted_hit  # noqa: E402

PRESETS = {
    "gpu7b": dict(tenants=64, distinct_deltas=64, capacity=16, concurrency=32, max_batch=64, prompt_len=128,
                  max_tokens=128, warmup_per_replica=64, requests_per_replica=256, duration=60.0, kill_after=20.0,
                  kill_timeout=300.0, settle=15.0, window=2.0, gpus_per_replica=1.0, cpus_per_replica=2.0,
                  kv_cache_mb=None, dtype="bfloat16"),
    "cpu-tiny": dict(tenants=16, distinct_deltas=2, capacity=4, concurrency=2, max_batch=8, prompt_len=16,
                     max_tokens=6, warmup_per_replica=16, requests_per_replica=80, duration=60.0, kill_after=10.0,
                     kill_timeout=150.0, settle=6.0, window=3.0, gpus_per_replica=0.0, cpus_per_replica=1.0,
                     kv_cache_mb=64.0, dtype=None),
}
CPU_NOTE = ("CPU run: the replicas, Ray, the ingress and the load generator share this machine's cores, so "
            "tokens/s and the scaling efficiency say nothing about scale-out; this run checks the mechanics")


# ---------------------------------------------------------------------------------- inputs


def matrix_params(shape: dict) -> int:
    """Weights of a Llama ``shape``'s matrices (every decoder layer's seven, the embedding and the head)."""
    h, i, v = shape["hidden"], shape["inter"], shape["vocab"]
    kv = h // shape["heads"] * shape["kv_heads"]
    return shape["layers"] * (2 * h * h + 2 * kv * h + 3 * h * i) + 2 * v * h


def inputs_bytes(shape: dict, distinct: int) -> int:
    """Disk the gpu7b inputs take: the bf16 base plus ``distinct`` 1-bit deltas (a sign bit per weight,
    row scales on the vocabulary matrices), norms left out."""
    return 2 * matrix_params(shape) + distinct * (matrix_params(shape) // 8 + 2 * shape["vocab"] * 4)


def prepare_inputs(a, log) -> dict:
    """Writes (or finds from an earlier run) the base directory and the delta store under ``--work-dir``."""
    work = Path(a.work_dir)
    tenants = tenant_names(a.tenants)
    if a.preset == "cpu-tiny":
        want = {"preset": a.preset, "tenants": a.tenants}
        base = ROOT / "models" / "tiny" / "base"
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    else:
        want = {"preset": a.preset, "shape": LLAMA2_7B, "dtype": "bfloat16", "tenants": a.tenants,
                "distinct": min(a.distinct_deltas, a.tenants)}
        base, vocab = work / "base", LLAMA2_7B["vocab"]
    inputs = {"base": str(base), "store": str(work / "store"), "tenants": tenants, "vocab": vocab}
    if inputs_ready(work, want):
        log(f"inputs found in {work} (written by an earlier run)")
        return inputs
    if work.exists() and any(work.iterdir()):
        if not (work / INPUTS_RECORD).exists():  # never delete a directory this benchmark did not write
            raise SystemExit(f"{work} is not empty and holds no scale-out inputs: pick another --work-dir")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if a.preset == "cpu-tiny":
        write_tiny_store(work / "store", ROOT / "models" / "tiny", tenants)
    else:
        write_gpu7b_inputs(work, want["distinct"], tenants, log)
    mark_inputs(work, want)
    log(f"inputs written to {work}")
    return inputs


def write_gpu7b_inputs(work: Path, distinct: int, tenants: list[str], log) -> None:
    import torch

    need = inputs_bytes(LLAMA2_7B, distinct)
    free = shutil.disk_usage(work).free
    if need > free:
        raise SystemExit(f"{work} has {free / 1e9:.0f} GB free and the inputs take {need / 1e9:.0f} GB: "
                         f"pass a --work-dir on a larger disk or fewer --distinct-deltas")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"writing a 7B-shaped random bf16 base and {distinct} random 1-bit deltas ({need / 1e9:.0f} GB) to {work}")
    model = write_random_base(work / "base", LLAMA2_7B, torch.bfloat16, device)
    log("base written")
    write_random_store(work / "store", model, tenants, distinct, log=log)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # GPU 0 goes to a replica next: hand back what the base took


# ---------------------------------------------------------------------------------- phases


def settings_for(a, inputs: dict, replicas: int):
    from bitdelta.serving.ray.settings import RaySettings

    return RaySettings(base=inputs["base"], base_name="base", store=inputs["store"], replicas=replicas,
                       gpus_per_replica=a.gpus_per_replica, cpus_per_replica=a.cpus_per_replica,
                       max_gpu_deltas=a.capacity, max_batch=a.max_batch, kv_cache_mb=a.kv_cache_mb, dtype=a.dtype,
                       max_bits=1, max_extra_vocab=0, report_interval_s=0.5, ingress_replicas=a.ingress_replicas)


def load_spec(a, inputs: dict, cluster, tenants: list[str], in_flight: int, duration_s=None) -> LoadSpec:
    return LoadSpec(cluster.url, tenants, concurrency=in_flight, max_tokens=a.max_tokens, vocab=inputs["vocab"],
                    prompt_len=a.prompt_len, duration_s=duration_s)


def throughput_phase(a, inputs: dict, cluster, replicas: int, zipf: float, log) -> dict:
    """Warm-up, then the measured requests at C·R in flight; hit rates from the counters between them."""
    in_flight = a.concurrency * replicas
    warm_n, meas_n = a.warmup_per_replica * replicas, a.requests_per_replica * replicas
    stream = tenant_stream(inputs["tenants"], zipf, warm_n + meas_n, seed=a.seed + replicas)
    asyncio.run(closed_loop(load_spec(a, inputs, cluster, stream[:warm_n], in_flight, a.duration)))
    before = cluster.settled_counters(replicas)
    records = asyncio.run(closed_loop(load_spec(a, inputs, cluster, stream[warm_n:], in_flight, a.duration)))
    after = cluster.settled_counters(replicas)
    name = f"{replicas}x {'uniform' if zipf == 0 else f'Zipf {zipf:g}'}"
    phase = {"name": name, "replicas": replicas, "zipf": zipf, "in_flight": in_flight, "load": summarize(records),
             "hit": hit_rates(before, after),
             "sim": predicted_hit(len(inputs["tenants"]), replicas, a.capacity, zipf, in_flight, a.max_batch,
                                  seed=a.seed)}
    log(phase_line(phase))
    return phase


def kill_phase(a, inputs: dict, cluster, replicas: int, log) -> dict:
    """Zipf load on R replicas; one replica's process is killed after ``--kill-after`` seconds."""
    from benchmarks.scale_out_cluster import kill_controller

    in_flight = a.concurrency * replicas
    found: dict = {}
    control = kill_controller(cluster, replicas, a.kill_after, found, timeout_s=a.kill_timeout, settle_s=a.settle)
    stream = tenant_stream(inputs["tenants"], a.zipf, 1_000_000, seed=a.seed + 99)
    limit = a.kill_after + a.kill_timeout + a.settle + 30
    records = asyncio.run(closed_loop(load_spec(a, inputs, cluster, stream, in_flight, limit), control))
    phase = {"name": "kill", "replicas": replicas, "zipf": a.zipf, "in_flight": in_flight, "load": summarize(records),
             **{k: v for k, v in found.items() if k != "kill_at"},
             "failures": [f for r in records for f in r.failures]}
    if found.get("victim") is None:
        raise RuntimeError("the load ended before a replica was killed: raise --kill-timeout or lower --kill-after")
    # streams the victim had started by the kill, counted afterwards: at the kill itself the client has not
    # yet read the headers of streams the replica had just begun
    phase["in_flight_on_victim"] = in_flight_at(records, found["victim"], found["kill_at"])
    phase["recovery"] = recovery(chunk_times(records), found["kill_at"], a.window)
    try:
        phase["serve_status"] = cluster.engine_status()
    except Exception as e:  # noqa: BLE001 - a status read that fails does not undo the measurement
        phase["serve_status"] = f"unavailable: {type(e).__name__}: {e}"
    back = phase["recovery"]["recovered_after_s"]
    log(phase_line(phase) + f"; killed {found['victim']} (pid {found['pid']}) with {phase['in_flight_on_victim']} "
        f"streams in flight on it ({found['in_flight_seen_on_victim']} seen by the client at the kill): "
        f"{phase['load']['requests_with_failures']} requests failed an attempt, "
        f"{phase['load']['lost']} lost; throughput back to 90% "
        f"{'never' if back is None else f'after {back:.1f} s'}; replaced by Serve: "
        f"{'after %.1f s' % found['replaced_after_s'] if found['replaced'] else 'no'}")
    return phase


# ---------------------------------------------------------------------------------- the run


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return f"{torch.cuda.device_count()} x {', '.join(sorted(names))}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").exists() else "CPU"
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def resolve(a) -> argparse.Namespace:
    """Fills every flag left unset from the preset; R defaults to the GPU count."""
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.replicas is None:
        import torch

        a.replicas = torch.cuda.device_count() if a.gpus_per_replica else 2
    if a.replicas < 2 and not a.prepare_only:
        raise SystemExit(f"scale-out needs at least 2 replicas (got {a.replicas}): pass --replicas 2 or more")
    a.work_dir = a.work_dir or str(Path(tempfile.gettempdir()) / f"bitdelta-scale-out-{a.preset}")
    return a


def write_result(a, result: dict) -> None:
    if not a.out:
        return
    path = Path(a.out)
    if path.is_dir() or str(a.out).endswith("/"):
        path = path / "scale_out.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))


def run_phases(a, inputs: dict, result: dict, log) -> None:
    from benchmarks.scale_out_cluster import LocalCluster

    ray_cpus = None if a.gpus_per_replica else int(a.replicas * a.cpus_per_replica) + 2
    cluster = LocalCluster(num_cpus=ray_cpus).start()
    try:
        for replicas in (1, a.replicas):
            t = time.perf_counter()
            cluster.deploy(settings_for(a, inputs, replicas), timeout_s=a.deploy_timeout)
            log(f"{replicas} replica(s) deployed and reporting in {time.perf_counter() - t:.0f} s")
            for zipf in (0.0, a.zipf):
                result["phases"].append(throughput_phase(a, inputs, cluster, replicas, zipf, log))
                write_result(a, result)
        if not a.no_kill:
            result["phases"].append(kill_phase(a, inputs, cluster, a.replicas, log))
    finally:
        cluster.shutdown()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/scale_out.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--replicas", type=int, help="R engine replicas (default: the GPU count; 2 on CPU)")
    ap.add_argument("--gpus-per-replica", type=float, help="1 with gpu7b, 0 with cpu-tiny")
    ap.add_argument("--cpus-per-replica", type=float)
    ap.add_argument("--ingress-replicas", type=int, default=1, help="ingress replicas (each relays every stream)")
    ap.add_argument("--tenants", type=int, help="T tenants in the store (64 / 16)")
    ap.add_argument("--distinct-deltas", type=int, help="gpu7b: distinct artifacts; other tenants hard-link them (64)")
    ap.add_argument("--capacity", type=int, help="deltas each replica holds (its device slots; 16 / 4)")
    ap.add_argument("--concurrency", type=int, help="C requests in flight per replica (32 / 2)")
    ap.add_argument("--max-batch", type=int, help="running sequences per replica, also Serve's max_ongoing_requests")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens per request (128 / 16)")
    ap.add_argument("--max-tokens", type=int, help="generated tokens per request, eos ignored (128 / 8)")
    ap.add_argument("--warmup-per-replica", type=int, help="warm-up requests per replica before each measurement")
    ap.add_argument("--requests-per-replica", type=int, help="measured requests per replica in each phase")
    ap.add_argument("--duration", type=float, help="seconds after which a phase (and its warm-up) sends no new request")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the skewed mix (default 1.0)")
    ap.add_argument("--kill-after", type=float, help="seconds of load before the kill")
    ap.add_argument("--kill-timeout", type=float, help="seconds to wait for Serve's replacement replica")
    ap.add_argument("--settle", type=float, help="seconds of load kept on after the replacement reports")
    ap.add_argument("--window", type=float, help="seconds per throughput window when judging recovery")
    ap.add_argument("--no-kill", action="store_true", help="skip the kill phase")
    ap.add_argument("--kv-cache-mb", type=float, help="KV cache per replica (default: free GPU memory / 64 on CPU)")
    ap.add_argument("--dtype", help="base dtype on the replicas (bfloat16 with gpu7b)")
    ap.add_argument("--deploy-timeout", type=float, default=900.0, help="seconds for the replicas to come up")
    ap.add_argument("--work-dir", help="where the base and the store are written, and found again next time")
    ap.add_argument("--prepare-only", action="store_true", help="write the inputs and stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="JSON file (a directory: scale_out.json in it)")
    return ap


def main(argv=None) -> dict:
    a = resolve(build_parser().parse_args(argv))
    log = RunLog()
    on_cpu = not a.gpus_per_replica
    args = argv if argv is not None else sys.argv[1:]
    result = {"meta": {"preset": a.preset, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                       "command": "python benchmarks/scale_out.py " + " ".join(args),
                       "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
                       "note": CPU_NOTE if on_cpu else None},
              "phases": []}
    log(f"{a.preset} on {result['meta']['machine']}: R={a.replicas}, {a.tenants} tenants, {a.capacity} deltas per "
        f"replica, {a.concurrency} in flight per replica, {a.prompt_len} + {a.max_tokens} tokens per request")
    inputs = prepare_inputs(a, log)
    if a.prepare_only:
        return result
    try:
        run_phases(a, inputs, result, log)
    finally:
        result["goals"] = goal_checks(result["phases"], a.replicas)
        write_result(a, result)
    import ray

    result["meta"]["ray"] = ray.__version__
    write_result(a, result)
    if on_cpu:
        print(f"\n{CPU_NOTE}.")
    print("\n" + markdown(result["phases"], result["goals"]), flush=True)
    return result


if __name__ == "__main__":
    main()
