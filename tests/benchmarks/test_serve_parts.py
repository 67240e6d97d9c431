"""Parts of benchmarks/serve on their own: the per-step recorder sees every forward through the
engine's ``wrap_forward`` hook, tenant counts and arrivals, and the merged-per-tenant schedule."""

from __future__ import annotations

import pytest
import torch

from benchmarks._common import SMOKE, BenchDevice, build_base, synthetic_delta
from benchmarks.serve.merged import merged_schedule
from benchmarks.serve.recorder import StepRecorder
from benchmarks.serve.workload import make_prompts, poisson_arrivals, tenant_counts
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


def test_tenant_counts_and_poisson_arrivals():
    ns, skipped = tenant_counts("8,1,max,9,1", nmax=5)
    assert ns == [1, 5] and skipped == ["N=8: does not fit (largest N 5)", "N=9: does not fit (largest N 5)"]
    arr = poisson_arrivals(4.0, 400)
    assert arr[0] == 0.0 and all(b >= a for a, b in zip(arr, arr[1:]))
    assert arr[-1] / 399 == pytest.approx(0.25, rel=0.2)  # mean gap 1 / rate
    assert poisson_arrivals(4.0, 10) == arr[:10]  # seeded


def test_merged_schedule_overlaps_one_copy_with_the_running_model():
    # one resident model; each next one is copied in (0.5 s) once the previous buffer's model ends
    s = merged_schedule(3, t_req=1.0, ttft1=0.1, resident=1, load_times=[0.5] * 3)
    assert s["total_s"] == pytest.approx(4.0) and s["stall_s"] == pytest.approx(1.0)
    assert s["ttft_ms_p50"] == pytest.approx(1600.0)
    everything_resident = merged_schedule(3, 1.0, 0.1, resident=3, load_times=[0.5] * 3)
    assert everything_resident["total_s"] == pytest.approx(3.0) and everything_resident["stall_s"] == pytest.approx(0.0)
