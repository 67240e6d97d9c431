"""Deltas with a low-rank correction in the engine: per-tenant factor buffers in the device pool, the
gathered decode term (in the graph layout) and the per-sequence prompt term, against merged models;
registration refuses a correction the pool has no room for, naming the setting."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import bitdelta
from arch_pairs import finetune_of, load_model, make_arch_model
from bitdelta.errors import BitDeltaError
from bitdelta.serving.config import EngineConfig
from bitdelta.serving.dispatch import lowrank_gathered
from bitdelta.serving.engine import Engine
from bitdelta.serving.models import DeltaModel
from bitdelta.serving.slots import DeltaSlots
from serving.engine_checks import (
    emulate_graph_layout,
    greedy,
    merged_models,
    random_prompts,
    run_to_completion,
    served_with_deltas,
)

RANK = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lowrank_serving")
    base = make_arch_model("llama", tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp / "base")
        for seed in (1, 2, 3):
            finetune_of(base, seed, scale=0.3).save_pretrained(tmp / f"ft{seed}")
    deltas = {"lowrank": bitdelta.compress(tmp / "base", tmp / "ft1", scale="row", lowrank_rank=RANK, progress=False),
              "budget": bitdelta.compress(tmp / "base", tmp / "ft3", lowrank_budget=0.5, progress=False),
              "plain": bitdelta.compress(tmp / "base", tmp / "ft2", progress=False)}
    return load_model(tmp / "base"), deltas


def _engine(base_hf, deltas, max_lowrank_rank):
    return served_with_deltas(base_hf, deltas, max_gpu_deltas=3, max_cpu_deltas=4, max_lowrank_rank=max_lowrank_rank)


def _run(engine, plan, vocab, seed=0):
    return run_to_completion(engine, random_prompts(plan, vocab, torch.Generator().manual_seed(seed)), max_steps=100)


# (tenant, arrival step, prompt length, new tokens): prompts of 33+ tokens take the per-sequence path
PLAN = [("lowrank", 0, 9, 8), ("plain", 0, 6, 10), ("budget", 0, 35, 6), (None, 1, 5, 6), ("lowrank", 2, 40, 5),
        ("plain", 3, 7, 6), ("budget", 3, 4, 7)]


@pytest.mark.parametrize("graph_layout", [False, True])
def test_mixed_tenants_with_and_without_lowrank_match_merged_models(setup, graph_layout):
    base_hf, deltas = setup
    assert deltas["lowrank"].modules["model.layers.0.mlp.up_proj"].lowrank_rank == RANK
    assert any(m.lowrank_rank for m in deltas["budget"].modules.values())
    max_rank = max(m.lowrank_rank for d in deltas.values() for m in d.modules.values())
    model, slots = _engine(base_hf, deltas, max_rank + 2)  # padded ranks: zero directions are exact
    merged = merged_models(base_hf, deltas)
    engine = Engine(model, slots, max_batch=8, kv_cache_mb=16)
    if graph_layout:  # decode steps in the graph layout (padding rows, span buckets), run eagerly on CPU
        emulate_graph_layout(engine)
    reqs = _run(engine, PLAN, model.vocab_size)
    if graph_layout:
        assert engine.graphs.replays >= 1
    for r in reqs:
        assert r.finish_reason == "length"
        want = greedy(merged[r.tenant], r.prompt, r.params.max_tokens)
        assert r.output == want, f"tenant {r.tenant}: {r.output} != merged {want}"


def test_the_lowrank_term_changes_the_tokens(setup):
    base_hf, deltas = setup
    without = {"lowrank": deltas["lowrank"].copy(modules={
        n: m.copy(lowrank_a=None, lowrank_b=None) for n, m in deltas["lowrank"].modules.items()})}
    merged = merged_models(base_hf, without)["lowrank"]
    model, slots = _engine(base_hf, deltas, RANK)
    engine = Engine(model, slots, max_batch=4, kv_cache_mb=16)
    reqs = _run(engine, [("lowrank", 0, 9, 12), ("lowrank", 0, 11, 12)], model.vocab_size, seed=5)
    assert any(r.output != greedy(merged, r.prompt, 12) for r in reqs)


def test_gathered_term_pads_ranks_and_skips_tokens_without_a_delta():
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(3, 6, 5)
    b = torch.zeros(3, 7, 6)
    a[1, :2], b[1, :, :2] = torch.randn(2, 5, generator=g), torch.randn(7, 2, generator=g)
    a[2], b[2] = torch.randn(6, 5, generator=g), torch.randn(7, 6, generator=g)
    x = torch.randn(4, 5, generator=g)
    got = lowrank_gathered(x, a, b, torch.tensor([1, -1, 2, 0], dtype=torch.int32))
    want = torch.stack([x[0] @ a[1, :2].t() @ b[1, :, :2].t(), torch.zeros(7), x[2] @ a[2].t() @ b[2].t(),
                        torch.zeros(7)])
    torch.testing.assert_close(got, want)


def test_a_pool_without_lowrank_capacity_refuses_naming_the_setting(setup):
    base_hf, deltas = setup
    model = DeltaModel.from_hf(base_hf)
    slots = DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=2)
    assert not any("lowrank_a" in p for p in slots.pool.pools.values())
    with pytest.raises(BitDeltaError, match="--max-lowrank-rank"):
        slots.register("lowrank", "<memory>", delta=deltas["lowrank"])
    slots.register("plain", "<memory>", delta=deltas["plain"])  # a plain delta still fits
    small = DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=2, max_lowrank_rank=RANK - 1)
    with pytest.raises(BitDeltaError, match=f"--max-lowrank-rank {RANK}"):
        small.register("lowrank", "<memory>", delta=deltas["lowrank"])
    assert EngineConfig().max_lowrank_rank == 0


def test_the_embeddings_get_no_factor_buffers(setup):
    base_hf, deltas = setup
    model, slots = _engine(base_hf, {"lowrank": deltas["lowrank"]}, RANK)
    pools = slots.pool.pools
    assert "lowrank_a" not in pools[model.embed_name] and "lowrank_a" in pools["lm_head"]
    n, k = model.delta_modules()["lm_head"]
    assert pools["lm_head"]["lowrank_a"].shape == (3, RANK, k) and pools["lm_head"]["lowrank_b"].shape == (3, n, RANK)


@pytest.mark.cuda
def test_captured_cuda_graphs_match_eager_with_lowrank_tenants(setup):
    """On a GPU (float32): the same workload with decode steps replayed from captured graphs and run
    eagerly gives the same tokens, tenants with and without a low-rank correction in one batch."""
    base_hf, deltas = setup
    max_rank = max(m.lowrank_rank for d in deltas.values() for m in d.modules.values())
    outputs = {}
    for graphs in (False, True):
        model = DeltaModel.from_hf(copy.deepcopy(base_hf), device="cuda", dtype=torch.float32)
        slots = DeltaSlots(model, max_gpu_deltas=3, max_cpu_deltas=4, max_lowrank_rank=max_rank)
        for name, delta in deltas.items():
            slots.register(name, f"<memory:{name}>", delta=delta)
        engine = Engine(model, slots, max_batch=8, kv_cache_mb=16, cuda_graphs=graphs)
        outputs[graphs] = [r.output for r in _run(engine, PLAN, model.vocab_size)]
        if graphs:
            assert engine.graphs.replays >= 1
    assert outputs[True] == outputs[False]
