"""Steps with prompt tokens in the CUDA-graph layout: each prompt chunk split into one-token rows that
attend through their sequence's block table up to their own position; which steps qualify; and that
they give the eager engine's tokens and prompt log-probabilities. Run on the CPU in the graph layout,
eagerly (the capture itself is the GPU tests')."""

from __future__ import annotations

import pytest
import torch

import bitdelta.serving.graphs as graphs_mod
from bitdelta.serving.engine import Engine, Request, SamplingParams
from bitdelta.serving.graphs import MAX_PROMPT_ROW_KEYS, DecodeGraphs
from bitdelta.serving.model import DeltaLlama
from bitdelta.serving.slots import DeltaSlots
from serving.engine_checks import base_and_row_deltas, emulate_graph_layout, random_prompts, run_to_completion


@pytest.fixture(scope="module")
def served(tiny_models):
    return base_and_row_deltas(tiny_models)


class Steps:
    """``wrap_forward`` recording, per step, whether it held prompt tokens and whether it replayed."""

    def __init__(self):
        self.steps: list[tuple[bool, bool]] = []

    def __call__(self, run, batch):
        self.steps.append((batch.has_prompt, batch.replay is not None))
        return run()

    def replayed_prompt_steps(self) -> int:
        return sum(prompt and replayed for prompt, replayed in self.steps)


def _engine(served, graphs: bool = True, **kw) -> Engine:
    base_hf, deltas = served
    model = DeltaLlama.from_hf(base_hf)
    slots = DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=4)
    for name, delta in deltas.items():
        slots.register(name, f"<memory:{name}>", delta=delta)
    kw.setdefault("max_batch", 6)
    engine = Engine(model, slots, max_queue=32, kv_cache_mb=16, wrap_forward=Steps(), **kw)
    if graphs:
        emulate_graph_layout(engine)
    return engine


def test_token_rows_split_prompt_chunks_and_keep_decode_steps(served):
    g = _engine(served, max_batch=4).graphs
    assert g.max_tokens == 512 and g.batches == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    decode = [[(0, 7, [5], -1)], [(1, 3, [6], 0)]]
    assert g.token_rows(decode) is decode
    rows = g.token_rows([[(0, 7, [5], -1)], [(2, 4, [8, 9, 10], 1)]])
    assert rows == [[(0, 7, [5], -1)], [(2, 4, [8], 1), (2, 5, [9], 1), (2, 6, [10], 1)]]
    assert g.token_rows([[(0, 0, list(range(200)), -1)]]) is not None  # a fresh 200-token prompt: 20,100 keys
    assert g.token_rows([[(0, 0, list(range(513)), -1)]]) is None  # more rows than the largest bucket
    # a chunk deep into a long prompt: each of its rows reads the whole context before it
    assert 100 * 1000 > MAX_PROMPT_ROW_KEYS and g.token_rows([[(0, 1000, list(range(100)), -1)]]) is None
    # without prompt buckets only decode steps replay
    off = DecodeGraphs(g.model, g.kv, g.slots, 4, capture=False, min_span=8)
    assert off.batches == [1, 2, 4] and off.token_rows([[(2, 4, [8, 9], 1)]]) is None
    assert off.token_rows(decode) is decode


def test_the_switch_keeps_prompt_steps_eager(served, monkeypatch):
    monkeypatch.setenv("BITDELTA_PROMPT_GRAPHS", "0")
    engine = _engine(served)
    assert engine._graph_tokens() == 0 and engine.graphs.batches == [1, 2, 4, 6]
    g = torch.Generator().manual_seed(6)
    plan = random_prompts([(None, 0, 9, 5), ("shk", 1, 7, 5)], 2048, g, low=3)
    run_to_completion(engine, plan, max_steps=50)
    steps = engine.wrap_forward.steps
    assert engine.prompt_graph_steps == 0 and all(not replayed for prompt, replayed in steps if prompt)
    assert any(replayed for prompt, replayed in steps if not prompt)  # decode steps still replay
    monkeypatch.setenv("BITDELTA_PROMPT_GRAPHS", "maybe")
    with pytest.raises(ValueError, match="BITDELTA_PROMPT_GRAPHS must be 1 or 0"):
        engine._graph_tokens()


def test_prompt_graph_rows_shrink_where_a_bucket_would_hold_too_much(served):
    """A bucket's float32 logits (vocabulary x rows) and, in a pool with low-rank capacity, the factors
    gathered per row stay within the engine's budget: the largest prompt bucket shrinks."""
    from bitdelta.serving.engine import GRAPH_MAX_LOGITS_BYTES

    base_hf, _ = served
    model = DeltaLlama.from_hf(base_hf)
    widest = max(max(n, k) for n, k in model.delta_modules().values())
    rank = 64
    slots = DeltaSlots(model, max_gpu_deltas=1, max_lowrank_rank=rank)
    engine = Engine(model, slots, max_batch=4, kv_cache_mb=16)
    want = GRAPH_MAX_LOGITS_BYTES // (2 * rank * widest * 4)  # float32 factors
    assert want < 512 and engine._graph_tokens() == want
    plain = Engine(model, DeltaSlots(model, max_gpu_deltas=1), max_batch=4, kv_cache_mb=16)
    assert plain._graph_tokens() == min(512, GRAPH_MAX_LOGITS_BYTES // (4 * model.vocab_size))


def test_prompts_arriving_while_others_decode_replay_with_the_eager_tokens(served):
    g = torch.Generator().manual_seed(3)
    plan = random_prompts([(None, 0, 9, 8), ("shk", 0, 23, 6), ("gsm", 1, 5, 9), ("shk", 2, 40, 5),
                           (None, 3, 3, 7), ("gsm", 5, 17, 6), ("shk", 6, 1, 4)], 2048, g, low=3)
    want = [r.output for r in run_to_completion(_engine(served, graphs=False), plan, max_steps=100)]
    engine = _engine(served)
    got = [r.output for r in run_to_completion(engine, plan, max_steps=100)]
    assert got == want
    steps = engine.wrap_forward
    assert engine.prompt_graph_steps == steps.replayed_prompt_steps() >= 5
    assert all(replayed for _, replayed in steps.steps)  # every step fits a graph here


def test_a_step_whose_prompt_rows_read_too_many_keys_runs_eagerly(served, monkeypatch):
    monkeypatch.setattr(graphs_mod, "MAX_PROMPT_ROW_KEYS", 40)
    g = torch.Generator().manual_seed(4)
    # step 0: a 12-token prompt alone (78 keys: eager); step 1: a 5-token prompt beside it (15 keys: replayed)
    plan = random_prompts([(None, 0, 12, 6), ("shk", 1, 5, 6)], 2048, g, low=3)
    want = [r.output for r in run_to_completion(_engine(served, graphs=False), plan, max_steps=50)]
    engine = _engine(served)
    assert [r.output for r in run_to_completion(engine, plan, max_steps=50)] == want
    steps = engine.wrap_forward.steps
    assert steps[0] == (True, False) and steps[1] == (True, True) and engine.prompt_graph_steps == 1


def test_scored_prompts_replay_with_the_eager_log_probabilities(served):
    prompt = torch.randint(3, 2048, (21,), generator=torch.Generator().manual_seed(5)).tolist()

    def run(engine):
        stream = engine.submit(Request(prompt=prompt[:4], tenant="gsm",
                                       params=SamplingParams(max_tokens=12, temperature=0)))
        engine.step()
        scored = engine.submit(Request(prompt=prompt, tenant="shk", params=SamplingParams(
            max_tokens=4, temperature=0, logprobs=2, prompt_logprobs=2)))
        while stream.finish_reason is None or scored.finish_reason is None:
            engine.step()
        return stream.output, scored.output, [s.logprob for s in scored.prompt_scores]

    want = run(_engine(served, graphs=False))
    engine = _engine(served)
    got = run(engine)
    assert got[:2] == want[:2] and len(got[2]) == len(prompt) - 1
    assert got[2] == pytest.approx(want[2], abs=1e-5)
    assert engine.wrap_forward.replayed_prompt_steps() >= 1  # the scored rows replayed beside the stream
