"""Parts of benchmarks/serve on their own: the per-step recorder sees every forward through the
engine's ``wrap_forward`` hook, tenant counts and arrivals, the Zipf trace and its LRU prediction, and the
merged-per-tenant schedule."""

from __future__ import annotations

import pytest
import torch

from benchmarks._common import SMOKE, BenchDevice, build_base, synthetic_delta
from benchmarks.routing_sim import lru_hit_rate
from benchmarks.serve.merged import merged_schedule
from benchmarks.serve.recorder import StepRecorder
from benchmarks.serve.workload import make_prompts, poisson_arrivals, tenant_counts
from benchmarks.serve.zipf import hit_rates, zipf_trace
from bitdelta.serving.engine import Engine, Request, SamplingParams
from bitdelta.serving.slots import DeltaSlots


def test_recorder_records_every_step_through_the_engine_hook(tmp_path):
    model = build_base({**SMOKE, "layers": 1}, torch.float32, "cpu")
    synthetic_delta(model, seed=0).save_pretrained(tmp_path / "d0")
    slots = DeltaSlots(model, max_gpu_deltas=1)
    slots.register("t0", tmp_path / "d0")
    recorder = StepRecorder(BenchDevice("cpu"), profile_decode_step=0)  # profiles only on a GPU
    engine = Engine(model, slots, max_batch=2, max_len=16, kv_cache_mb=1, wrap_forward=recorder)
    prompts = make_prompts(2, 5, model.vocab_size, seed=0)
    reqs = [engine.submit(Request(prompt=p, tenant=t, params=SamplingParams(max_tokens=3, temperature=0,
                                                                              ignore_eos=True)))
            for p, t in zip(prompts, ["t0", None])]
    while any(r.finish_reason is None for r in reqs):
        engine.step()
    assert len(recorder.records) == engine.steps and recorder.profile is None
    decode = [r for r in recorder.records if r["decode"]]
    assert sum(not r["decode"] for r in recorder.records) >= 1 and len(decode) == 2
    assert all(r["tokens"] == 2 and r["seqs"] == 2 and r["tenants"] == 1 and r["host_s"] > 0 for r in decode)
    # positions of the two decoded tokens: 5 then 6 for each sequence (cache rows read besides the new one)
    assert [r["ctx"] for r in decode] == [10, 12]
    assert all(len(r.output) == 3 for r in reqs)


def test_recorder_counts_only_decode_steps_of_the_full_batch(tmp_path):
    """A burst whose prompts take several steps: the first requests decode beside later prompts and
    alone; with ``full_batch`` only decode steps of every sequence count towards the profiled one."""
    model = build_base({**SMOKE, "layers": 1}, torch.float32, "cpu")
    slots = DeltaSlots(model, max_gpu_deltas=1)
    recorder = StepRecorder(BenchDevice("cpu"), profile_decode_step=1, full_batch=3)
    engine = Engine(model, slots, max_batch=3, max_len=24, kv_cache_mb=1, wrap_forward=recorder, max_step_tokens=6)
    reqs = [engine.submit(Request(prompt=p, params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
            for p, n in zip(make_prompts(3, 5, model.vocab_size, seed=1), (9, 9, 2))]
    while any(r.finish_reason is None for r in reqs):
        engine.step()
    recs = recorder.records
    assert any(r["decode"] and r["seqs"] < 3 for r in recs)  # decode steps before the last prompt was in
    assert all(r["counted"] == (r["decode"] and r["seqs"] == 3) for r in recs) and sum(r["counted"] for r in recs) >= 1


def test_tenant_counts_and_poisson_arrivals():
    ns, skipped = tenant_counts("8,1,max,9,1", nmax=5)
    assert ns == [1, 5] and skipped == ["N=8: does not fit (largest N 5)", "N=9: does not fit (largest N 5)"]
    arr = poisson_arrivals(4.0, 400)
    assert arr[0] == 0.0 and all(b >= a for a, b in zip(arr, arr[1:]))
    assert arr[-1] / 399 == pytest.approx(0.25, rel=0.2)  # mean gap 1 / rate
    assert poisson_arrivals(4.0, 10) == arr[:10]  # seeded


def test_tenant_counts_take_max_and_none_and_refuse_nonsense():
    assert tenant_counts("64,max", nmax=4) == ([4], ["N=64: does not fit (largest N 4)"])
    assert tenant_counts("1,8,32,64,max", nmax=133) == ([1, 8, 32, 64, 133], [])
    assert tenant_counts("", nmax=4) == ([], [])
    assert tenant_counts("max", nmax=0) == ([], ["N=max: not even one tenant fits"])
    for bad in ("0", "-1", "eight"):
        with pytest.raises(ValueError, match="neither a positive integer nor 'max'"):
            tenant_counts(bad, nmax=4)


def test_zipf_trace_is_seeded_and_the_lru_simulation_counts_hits():
    ranks = zipf_trace(1000, 1.0, 5000)
    assert ranks == zipf_trace(1000, 1.0, 5000) and ranks != zipf_trace(1000, 1.0, 5000, seed=1)
    assert all(0 <= k < 1000 for k in ranks)
    # Zipf(1) over 1000: rank 0 draws 1 / H(1000) of the requests, rank 1 half as many
    share = [ranks.count(k) / len(ranks) for k in (0, 1)]
    assert share[0] == pytest.approx(0.1336, abs=0.015) and share[1] == pytest.approx(share[0] / 2, abs=0.015)
    # capacity 2: miss 0, miss 1, hit 0, miss 2 (evicts 1), miss 1 (evicts 0), hit 2, hit 1
    assert lru_hit_rate([0, 1, 0, 2, 1, 2, 1], 2) == pytest.approx(3 / 7)
    assert lru_hit_rate([], 2) == 0.0
    assert lru_hit_rate(ranks, 32) < lru_hit_rate(ranks, 128) < 1.0


def test_zipf_hit_rates_from_labels():
    per = [{"label": lab} for lab in ("disk", "device", "host", "device", "disk")]
    rates = hit_rates(per)
    assert rates["counts"] == {"device": 2, "host": 1, "disk": 2, "failed": 0}
    assert rates["device_hit_rate"] == pytest.approx(2 / 5) and rates["host_hit_rate"] == pytest.approx(1 / 3)
    assert hit_rates([])["device_hit_rate"] is None


def test_merged_schedule_overlaps_one_copy_with_the_running_model():
    # one resident model; each next one is copied in (0.5 s) once the previous buffer's model ends
    s = merged_schedule(3, t_req=1.0, ttft1=0.1, resident=1, load_times=[0.5] * 3)
    assert s["total_s"] == pytest.approx(4.0) and s["stall_s"] == pytest.approx(1.0)
    assert s["ttft_ms_p50"] == pytest.approx(1600.0)
    everything_resident = merged_schedule(3, 1.0, 0.1, resident=3, load_times=[0.5] * 3)
    assert everything_resident["total_s"] == pytest.approx(3.0) and everything_resident["stall_s"] == pytest.approx(0.0)
