"""benchmarks/scale_out.py: its parts without Ray (tenant mixes, the load generator against a real
single-process server, its statistics, recovery after a kill, hit rates, scaling and goal arithmetic,
the table, the random base and store it writes), and one end-to-end run on a local Ray cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmarks._common import LLAMA2_7B, SMOKE, dir_bytes
from benchmarks.routing_sim import simulate, zipf_weights
from benchmarks.scale_out import PRESETS, build_parser, inputs_bytes, prepare_inputs, resolve
from benchmarks.scale_out_inputs import (
    byte_tokenizer,
    inputs_ready,
    mark_inputs,
    tenant_names,
    write_random_base,
    write_random_store,
)
from benchmarks.scale_out_load import (
    Attempt,
    LoadSpec,
    Record,
    closed_loop,
    in_flight_at,
    prompt_ids,
    recovery,
    summarize,
    tenant_stream,
)
from benchmarks.scale_out_report import goal_checks, hit_rates, markdown, predicted_hit, scaling_efficiency

ROOT = Path(__file__).resolve().parents[2]
SHAPE = {**SMOKE, "vocab": 320}  # a byte-level tokenizer needs 259 ids at least


# ---------------------------------------------------------------------------------- tenant mixes and prompts


def test_tenant_stream_is_seeded_and_follows_its_zipf_weights():
    tenants = tenant_names(8)
    a = tenant_stream(tenants, 1.0, 20_000, seed=3)
    assert a == tenant_stream(tenants, 1.0, 20_000, seed=3) and a != tenant_stream(tenants, 1.0, 20_000, seed=4)
    counts = Counter(a)
    for name, w in zip(tenants, zipf_weights(8, 1.0)):
        assert abs(counts[name] / len(a) - w) < 0.015, name
    uniform = Counter(tenant_stream(tenants, 0.0, 20_000, seed=3))
    assert set(uniform) == set(tenants) and max(uniform.values()) / min(uniform.values()) < 1.15


def test_prompt_ids_are_fixed_per_request_and_skip_the_special_ids():
    p = prompt_ids(5, 64, 100)
    assert p == prompt_ids(5, 64, 100) and p != prompt_ids(6, 64, 100)
    assert len(p) == 64 and min(p) >= 3 and max(p) < 100


# ---------------------------------------------------------------------------------- statistics


def _record(sent, first, done, tokens, failures=()):
    tries = [Attempt(sent, rep, sent + 0.05, err) for rep, err in failures]
    return Record("t000", sent, first, done, tokens, [], tries + ([Attempt(sent, "r1", done)] if done else []))


def test_summarize_counts_tokens_of_finished_requests_over_the_wall_time():
    recs = [_record(0.0, 0.1, 1.1, 11), _record(0.5, 0.9, 2.9, 21, failures=[("r2", "APIError: broke")]),
            _record(1.0, None, None, 0, failures=[("r2", "x"), ("r1", "y"), ("r1", "z")])]
    s = summarize(recs)
    assert (s["requests"], s["finished"], s["lost"]) == (3, 2, 1)
    assert (s["failed_attempts"], s["requests_with_failures"]) == (4, 2)
    assert s["tokens"] == 32 and s["wall_s"] == pytest.approx(2.9) and s["tok_s"] == pytest.approx(32 / 2.9)
    # TTFT from the first send: 0.1 and 0.4 s; TPOT: 1.0 s over 10 gaps, 2.0 s over 20 gaps
    assert s["ttft_ms_p50"] == pytest.approx(100) and s["ttft_ms_p99"] == pytest.approx(400)
    assert s["tpot_ms_p50"] == pytest.approx(100) and s["tpot_ms_p99"] == pytest.approx(100)
    assert recs[1].failures == [("r2", "APIError: broke")] and recs[2].replica == "r1" and not recs[2].active


def test_in_flight_at_counts_attempts_a_replica_had_started_and_not_ended():
    def rec(*attempts):
        return Record("t", attempts[0].start, attempts=list(attempts))

    recs = [rec(Attempt(1.0, "v", 5.0, "broke"), Attempt(5.2, "w", 6.0)),  # on v at 4.0, failed at the kill
            rec(Attempt(3.9, "v", 4.2)),  # finished on v just after 4.0 (its headers were read late)
            rec(Attempt(2.0, "v", 3.0)),  # over before 4.0
            rec(Attempt(4.5, "v")),  # sent after 4.0
            rec(Attempt(3.0, "w")), rec(Attempt(3.0, None, 4.1, "503"))]  # elsewhere; no replica named
    assert in_flight_at(recs, "v", 4.0) == 2 and in_flight_at(recs, "w", 4.0) == 1
    assert recs[3].active and recs[3].replica == "v" and not recs[0].active


def _ticks(lo, hi, per_s):
    n = int(round((hi - lo) * per_s))
    return [lo + k / per_s for k in range(n)]


def test_recovery_finds_the_dip_after_a_kill_and_when_throughput_is_back():
    times = _ticks(0, 10, 20) + _ticks(10, 13, 2) + _ticks(13, 25, 20)  # kill at 10 s, 3 s slow
    r = recovery(times, kill_at=10.0, window_s=1.0)
    assert r["baseline_chunks_s"] == pytest.approx(20) and r["dipped"]
    assert r["lowest_chunks_s"] == pytest.approx(2) and r["recovered_after_s"] == pytest.approx(3.0)
    assert r["chunks_per_second"][r["chunks_per_second_from"] * -1] == pytest.approx(2)  # the second after the kill
    steady = recovery(_ticks(0, 20, 20), kill_at=10.0, window_s=1.0)
    assert not steady["dipped"] and steady["recovered_after_s"] == 0.0
    never = recovery(_ticks(0, 10, 20) + _ticks(10, 20, 5), kill_at=10.0, window_s=1.0)
    assert never["dipped"] and never["recovered_after_s"] is None


# ---------------------------------------------------------------------------------- hit rates, scaling, goals


def test_hit_rates_per_replica_and_in_all_from_counter_readings():
    before = {"a": {"loads": 4, "requests": 10}, "b": {"loads": 2, "requests": 5}}
    after = {"a": {"loads": 9, "requests": 30}, "b": {"loads": 12, "requests": 25}, "c": {"loads": 1, "requests": 0}}
    h = hit_rates(before, after)
    assert h["replicas"]["a"] == {"requests": 20, "loads": 5, "hit": 0.75}
    assert h["replicas"]["b"]["hit"] == pytest.approx(0.5) and h["replicas"]["c"]["hit"] is None
    assert (h["requests"], h["loads"]) == (40, 16) and h["hit"] == pytest.approx(0.6)
    assert h["margin95"] == pytest.approx(1.96 * (0.6 * 0.4 / 40) ** 0.5)


def test_predicted_hit_is_the_simulators_for_the_same_case():
    got = predicted_hit(16, 2, 4, 1.0, in_flight=4, max_ongoing=8, requests=4000, warmup=500, seed=1)
    w = zipf_weights(16, 1.0)
    assert got["multiplex"] == simulate("multiplex", w, 2, 4, 4000, 500, 4, 8, 1)["hit"]
    assert got["pow2"] == simulate("pow2", w, 2, 4, 4000, 500, 4, 8, 1)["hit"]
    assert got["multiplex"] > got["pow2"] + 0.1  # routing by tenant keeps more deltas hot
    one = predicted_hit(16, 1, 4, 0.0, in_flight=2, max_ongoing=8, requests=20_000, warmup=1000)
    assert one["multiplex"] == pytest.approx(4 / 16, abs=0.02)  # one LRU of 4 under uniform traffic


def _phase(replicas, zipf, tok_s, hit, sim):
    return {"name": f"{replicas}x {zipf}", "replicas": replicas, "zipf": zipf, "in_flight": 4 * replicas,
            "load": {"tok_s": tok_s, "finished": 10, "requests": 10, "ttft_ms_p50": 10.0, "ttft_ms_p99": 20.0,
                     "tpot_ms_p50": 1.0, "tpot_ms_p99": None, "failed_attempts": 0, "lost": 0},
            "hit": {"hit": hit, "margin95": 0.05, "replicas": {}}, "sim": {"multiplex": sim, "pow2": sim / 2}}


def _kill(failures, in_flight_on_victim=2, lost=0, back=3.5):
    return {"name": "kill", "replicas": 2, "zipf": 1.0, "in_flight": 8, "victim": "v",
            "in_flight_on_victim": in_flight_on_victim, "failures": failures,
            "load": {"tok_s": 50.0, "finished": 10 - lost, "requests": 10, "lost": lost, "ttft_ms_p50": None,
                     "ttft_ms_p99": None, "tpot_ms_p50": None, "tpot_ms_p99": None,
                     "requests_with_failures": len({f[1] for f in failures})},
            "recovery": {"recovered_after_s": back}, "replaced": True, "replaced_after_s": 12.0}


def test_goal_checks_scaling_hit_rate_and_the_kill():
    assert scaling_efficiency(100.0, 180.0, 2) == pytest.approx(0.9) and scaling_efficiency(0.0, 1.0, 2) is None
    phases = [_phase(1, 0.0, 100.0, 0.25, 0.26), _phase(2, 0.0, 185.0, 0.50, 0.56),
              _phase(1, 1.0, 100.0, 0.45, 0.46), _phase(2, 1.0, 170.0, 0.70, 0.71),
              _kill([("v", "APIError: a"), ("v", "APIError: b")])]
    checks = {c["goal"]: c for c in goal_checks(phases, replicas=2)}
    scaling = [c for g, c in checks.items() if g.startswith("2 replicas")]
    assert [c["ok"] for c in scaling] == [True, False]  # 0.925 uniform, 0.85 Zipf
    hits = {g.rsplit(", ", 1)[1]: c for g, c in checks.items() if g.startswith("hit rate")}
    assert hits["2x 0.0"]["ok"] is False and hits["2x 0.0"]["value"] == pytest.approx(-6.0)
    assert all(c["ok"] for name, c in hits.items() if name != "2x 0.0")
    kill = [c for g, c in checks.items() if g.startswith("no request lost")][0]
    assert kill["ok"] and checks["no failed attempt while no replica is killed"]["ok"]
    phases[1]["load"]["failed_attempts"] = 1  # a retried failure in a throughput phase: no request lost, still a miss
    assert not {c["goal"]: c for c in goal_checks(phases, 2)}["no failed attempt while no replica is killed"]["ok"]
    # a failure on a replica that was not killed, a lost request, more failures than streams in flight: each fails it
    for bad in (_kill([("v", "a"), ("w", "b")]), _kill([("v", "a")], lost=1), _kill([("v", "a"), ("v", "b")], 1)):
        assert not [c for c in goal_checks([bad], 2) if c["goal"].startswith("no request lost")][0]["ok"]
    assert not [c for c in goal_checks([_kill([], back=None)], 2) if c["goal"].startswith("throughput")][0]["ok"]


def test_markdown_has_a_row_per_phase_and_per_goal():
    phases = [_phase(1, 0.0, 100.0, 0.25, 0.26), _phase(2, 0.0, 150.0, 0.5, 0.5), _kill([("v", "x")])]
    checks = goal_checks(phases, 2)
    text = markdown(phases, checks)
    lines = text.splitlines()
    assert lines[0].startswith("| phase |")
    assert "| 2x 0.0 | 2 | 8 | 10/10 | 150.0 | 10 / 20 | 1.0 / - | 50.0% ± 5 | 50.0% |" in lines
    assert any(line.startswith("| kill | 2 | 8 |") and line.endswith("| - | - |") for line in lines)
    assert sum(line.endswith("| NO |") for line in lines) == 1  # 0.75 x scaling
    assert len([line for line in lines if line.startswith("| ") and not line.startswith("| phase")
                and not line.startswith("| goal")]) == len(phases) + len(checks)


# ---------------------------------------------------------------------------------- presets and inputs


def test_presets_fill_unset_flags_and_refuse_a_single_replica():
    a = resolve(build_parser().parse_args(["--preset", "cpu-tiny", "--capacity", "3"]))
    assert a.capacity == 3 and a.replicas == 2 and a.tenants == PRESETS["cpu-tiny"]["tenants"]
    assert a.work_dir.endswith("bitdelta-scale-out-cpu-tiny")
    with pytest.raises(SystemExit, match="at least 2 replicas"):
        resolve(build_parser().parse_args(["--preset", "cpu-tiny", "--replicas", "1"]))


def test_inputs_size_estimate_matches_what_is_written(tmp_path):
    model = write_random_base(tmp_path / "base", SHAPE, torch.bfloat16, "cpu")
    write_random_store(tmp_path / "store", model, ["a"], distinct=1, log=lambda _: None)
    written = dir_bytes(tmp_path / "base") + dir_bytes(tmp_path / "store")
    tensors_only = written - sum(f.stat().st_size for f in tmp_path.rglob("*.json"))
    assert 0.85 < inputs_bytes(SHAPE, 1) / tensors_only < 1.0  # norms and file headers left out
    assert inputs_bytes(LLAMA2_7B, 0) == pytest.approx(13.48e9, rel=0.01)  # the bf16 7B base
    assert inputs_bytes(LLAMA2_7B, 1) - inputs_bytes(LLAMA2_7B, 0) == pytest.approx(0.843e9, rel=0.01)


def test_byte_tokenizer_decodes_every_id_of_the_vocabulary():
    tok = byte_tokenizer(400)
    assert len(tok) == 400 and tok.eos_token_id == 1
    assert all(tok.decode([i]) for i in range(259, 400))  # the three-letter tokens past the bytes
    assert tok.decode(tok.encode("to be", add_special_tokens=False)) == "to be"
    with pytest.raises(ValueError, match="at least 259"):
        byte_tokenizer(100)


def test_inputs_record_says_when_a_work_dir_can_be_reused(tmp_path):
    want = {"preset": "gpu7b", "tenants": 64}
    assert not inputs_ready(tmp_path, want)
    mark_inputs(tmp_path, want)
    assert inputs_ready(tmp_path, want) and not inputs_ready(tmp_path, {**want, "tenants": 32})


def test_a_work_dir_the_benchmark_did_not_write_is_never_deleted(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    a = resolve(build_parser().parse_args(["--preset", "cpu-tiny", "--work-dir", str(tmp_path)]))
    with pytest.raises(SystemExit, match="holds no scale-out inputs"):
        prepare_inputs(a, log=lambda _: None)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    """The single-process server on a random base written as gpu7b writes it, three tenants over two artifacts."""
    import uvicorn

    from bitdelta.serving.http.app import create_app
    from bitdelta.serving.runtime import build_runtime

    work = tmp_path_factory.mktemp("scale-out")
    model = write_random_base(work / "base", SHAPE, torch.bfloat16, "cpu")
    write_random_store(work / "store", model, tenant_names(3), distinct=2, log=lambda _: None)
    rt = build_runtime(str(work / "base"), {t: str(work / "store" / t) for t in tenant_names(3)}, base_name="base",
                       max_gpu_deltas=3, max_batch=4, kv_cache_mb=8)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(rt), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", work
    server.should_exit = True
    thread.join(timeout=10)
    rt.shutdown()


def test_store_tenants_past_distinct_share_files_through_hard_links(random_server):
    _, work = random_server
    first, third = work / "store" / "t000", work / "store" / "t002"
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in third.iterdir())
    assert all(os.path.samefile(f, third / f.name) for f in first.iterdir())
    assert not os.path.samefile(first / "delta_config.json", work / "store" / "t001" / "delta_config.json")


def test_closed_loop_streams_every_request_through_the_openai_client(random_server):
    import asyncio

    url, _ = random_server
    stream = tenant_stream(tenant_names(3), 1.0, 9, seed=0)
    spec = LoadSpec(url, stream, concurrency=3, max_tokens=5, vocab=SHAPE["vocab"], prompt_len=6)
    seen_in_flight = []

    async def watch(live):
        while not live.stop.is_set():
            seen_in_flight.append(sum(r.active for r in live.records))
            await asyncio.sleep(0.005)

    records = asyncio.run(closed_loop(spec, controller=watch))
    assert [r.tenant for r in records] == stream  # each in the stream's order, none twice
    assert max(seen_in_flight) == 3  # closed loop: never more than the concurrency
    s = summarize(records)
    assert (s["finished"], s["lost"], s["failed_attempts"]) == (9, 0, 0)
    assert all(r.tokens == 5 and r.first is not None and r.sent < r.first <= r.done for r in records)
    assert all(r.replica is None for r in records)  # the single server names no replica
    assert s["tokens"] == 45 and s["tok_s"] > 0 and s["ttft_ms_p50"] > 0 and s["tpot_ms_p50"] >= 0


def test_a_request_to_a_missing_tenant_fails_each_attempt_and_is_lost(random_server):
    import asyncio

    url, _ = random_server
    spec = LoadSpec(url, ["t000", "nobody"], concurrency=1, max_tokens=2, vocab=SHAPE["vocab"], prompt_len=4,
                    retries=1)
    records = asyncio.run(closed_loop(spec))
    assert records[0].done is not None and records[1].done is None
    assert [e.split(":")[0] for _, e in records[1].failures] == ["NotFoundError", "NotFoundError"]
    assert summarize(records)["lost"] == 1


# ---------------------------------------------------------------------------------- end to end on Ray


@pytest.mark.slow
def test_cpu_tiny_run_end_to_end_on_a_local_ray_cluster(tmp_path):
    pytest.importorskip("ray", reason="the scale-out run needs Ray: pip install 'bitdelta[ray]'")
    out = tmp_path / "scale_out.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scale_out.py"), "--preset", "cpu-tiny", "--replicas", "2",
           "--tenants", "6", "--capacity", "2", "--warmup-per-replica", "2", "--requests-per-replica", "6",
           "--max-tokens", "3", "--kill-after", "4", "--settle", "2", "--window", "1", "--work-dir",
           str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [p["name"] for p in result["phases"]]
    assert names == ["1x uniform", "1x Zipf 1", "2x uniform", "2x Zipf 1", "kill"]
    for p in result["phases"][:4]:
        assert p["load"]["finished"] == p["load"]["requests"] == 6 * p["replicas"]
        assert p["hit"]["requests"] == 6 * p["replicas"] and len(p["hit"]["replicas"]) == p["replicas"]
        assert 0 <= p["hit"]["hit"] <= 1 and 0 < p["sim"]["multiplex"] <= 1
    kill = result["phases"][4]
    assert kill["replaced"] and kill["victim"] != kill["replacement"] and kill["load"]["lost"] == 0
    assert {f[0] for f in kill["failures"]} <= {kill["victim"]}, kill["failures"]
    assert len(result["goals"]) == 10 and "CPU run" in result["meta"]["note"]
    assert [g["ok"] for g in result["goals"] if g["goal"].startswith("no failed attempt")] == [True]
    assert "| kill | 2 |" in done.stdout and done.stdout.rstrip().endswith("|")
