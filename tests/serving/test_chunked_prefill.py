"""Chunked prefill under the per-step token budget, and the memory-sized start-up plan.

Prompts split into several chunks give the greedy tokens of unchunked prefills and of the merged
Hugging Face models (a delta tenant and sliding-window families included); a running stream gets a
token every step while a long prompt is prefilled beside it; no step holds more tokens than the
budget; decode-only steps still take the graph layout; a request cancelled mid-prefill frees its
slot. The KV sizing is checked with made-up memory figures and the plan text on CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bitdelta
from arch_pairs import finetune_of, load_model, make_arch_model
from bitdelta.errors import ConfigError
from bitdelta.serving.config import EngineConfig
from bitdelta.serving.engine import DEFAULT_STEP_TOKENS, Engine, Request, SamplingParams, step_token_budget
from bitdelta.serving.graphs import DecodeGraphs
from bitdelta.serving.memory_plan import HEADROOM_FIXED_BYTES, kv_blocks_that_fit, kv_budget_from_free
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

WINDOW = 5
SLIDING = {"mistral": {"sliding_window": WINDOW},
           "gemma3": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}}


class StepLog:
    """``wrap_forward`` that records each step's sequences ``(kv_slot, start, new tokens)`` and kind."""

    def __init__(self):
        self.steps: list[list[tuple[int, int, int]]] = []
        self.replayed: list[bool] = []
        self.continuing = 0  # sequences that continued a prompt with several tokens over their cache

    def __call__(self, run, batch):
        self.steps.append(list(batch.seqs))
        self.replayed.append(batch.replay is not None)
        if batch.attn is not None:
            self.continuing += len(batch.attn.other)
        return run()

    def tokens(self, i: int) -> int:
        return sum(n for _, _, n in self.steps[i])


def _family(arch, tmp):
    base = make_arch_model(arch, **SLIDING[arch])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp / "base")
        finetune_of(base, 1, scale=0.3).save_pretrained(tmp / "ft")
    delta = bitdelta.compress(tmp / "base", tmp / "ft", scale="row", progress=False)
    base_hf = load_model(tmp / "base")
    return base_hf, delta, merged_models(base_hf, {"row": delta})


def _serve(base_hf, delta, plan, prompt_rows: bool = True, **engine_kw):
    """Runs ``plan`` ((tenant, arrival step, prompt, new tokens) per request) to the end; ``prompt_rows``:
    steps with prompt chunks in the graph layout too (as one-token rows), else eagerly."""
    model, slots = served_with_deltas(base_hf, {"row": delta}, max_gpu_deltas=2, max_cpu_deltas=2)
    log = StepLog()
    engine = Engine(model, slots, kv_cache_mb=16, wrap_forward=log, **engine_kw)
    emulate_graph_layout(engine, prompts=prompt_rows)
    reqs = run_to_completion(engine, plan, max_steps=200)
    return engine, reqs, log


@pytest.mark.parametrize("prompt_rows", [False, True], ids=["eager-prompts", "prompt-rows"])
@pytest.mark.parametrize("arch", list(SLIDING))
def test_chunked_greedy_equals_unchunked_and_merged(arch, prompt_rows, tmp_path):
    base_hf, delta, merged = _family(arch, tmp_path)
    g = torch.Generator().manual_seed(0)
    vocab = base_hf.config.vocab_size
    plan = random_prompts([(None, 0, 14, 6), ("row", 0, 17, 5), ("row", 2, 13, 7), (None, 5, 11, 4)], vocab, g)
    budget = 4  # prompts of 11 to 17 tokens take 3 to 5 chunks, fewer tokens a step while others decode
    chunked, chunked_reqs, log = _serve(base_hf, delta, plan, prompt_rows, max_batch=4, max_step_tokens=budget)
    _, whole_reqs, whole_log = _serve(base_hf, delta, plan, prompt_rows, max_batch=4)
    assert all(log.tokens(i) <= budget for i in range(len(log.steps)))
    assert max(whole_log.tokens(i) for i in range(len(whole_log.steps))) > budget  # the budget did split
    if prompt_rows:  # later chunks replayed as one-token rows over the sequence's cache, across the window
        assert chunked.prompt_graph_steps >= 5 and log.continuing == 0
    else:
        assert log.continuing >= 3  # later chunks of several tokens went through the continuing path
    assert any(log.replayed) and chunked.graphs.replays == sum(log.replayed)
    for r, w in zip(chunked_reqs, whole_reqs):
        assert r.finish_reason == w.finish_reason == "length"
        want = greedy(merged[r.tenant], r.prompt, r.params.max_tokens)
        assert r.output == w.output == want, f"{arch} tenant {r.tenant}"
    assert sorted(chunked.free_kv) == list(range(chunked.max_batch))


def _tiny(tiny_models, **kw):
    model = DeltaModel.from_hf(load_model(tiny_models["base"]))
    log = StepLog()
    kw.setdefault("kv_cache_mb", 16)
    engine = Engine(model, DeltaSlots(model, max_gpu_deltas=1), wrap_forward=log, **kw)
    return engine, log


def test_running_stream_gets_a_token_every_step_of_a_chunked_prefill(tiny_models):
    engine, log = _tiny(tiny_models, max_batch=4, max_step_tokens=8)
    stream = engine.submit(Request(prompt=[0, 40, 41], params=SamplingParams(max_tokens=60, temperature=0)))
    engine.step()
    assert len(stream.output) == 1
    long_prompt = [0] + torch.randint(3, 200, (99,), generator=torch.Generator().manual_seed(1)).tolist()
    events = []
    late = engine.submit(Request(prompt=long_prompt, params=SamplingParams(max_tokens=3, temperature=0),
                                 on_event=events.append))
    chunks = 0
    while not late.prefilled:
        before, done = len(stream.output), late.prompt_done
        assert not events  # no token before the prompt's last chunk
        engine.step()
        chunks += 1
        assert len(stream.output) == before + 1  # the stream decoded in this step too
        assert late.prompt_done - done == min(7, len(long_prompt) - done)  # the budget less the decode token
        assert log.tokens(-1) <= 8
    assert chunks == 15 and late.prompt_done == len(long_prompt)
    assert [e.token for e in events] == late.output[:1]  # the step completing the prompt sampled its first token
    while late.finish_reason is None:
        engine.step()
    alone, _ = _tiny(tiny_models, max_batch=4)
    ref = alone.submit(Request(prompt=long_prompt, params=SamplingParams(max_tokens=3, temperature=0)))
    alone.step()
    assert ref.prefilled  # one step without the budget
    while ref.finish_reason is None:
        alone.step()
    assert late.output == ref.output


def test_prompts_waiting_together_are_chunked_in_arrival_order(tiny_models):
    engine, log = _tiny(tiny_models, max_batch=4, max_step_tokens=10)
    p = SamplingParams(max_tokens=2, temperature=0)
    first = engine.submit(Request(prompt=list(range(3, 28)), params=p))  # 25 tokens: 10 + 10 + 5
    second = engine.submit(Request(prompt=list(range(30, 42)), params=p))  # 12 tokens
    engine.step()
    assert (first.prompt_done, second.prompt_done, second.kv_slot) == (10, 0, None)  # not admitted yet
    engine.step()
    assert (first.prompt_done, second.prompt_done) == (20, 0)
    engine.step()  # first's last 5 tokens, then second's first 5
    assert (first.prompt_done, second.prompt_done) == (25, 5) and first.prefilled and not second.prefilled
    slots = (first.kv_slot, second.kv_slot)
    assert log.steps[-1] == [(slots[0], 20, 5), (slots[1], 0, 5)]
    engine.step()  # first decodes its second (last) token, second takes the 7 it has left
    assert log.steps[-1] == [(slots[0], 25, 1), (slots[1], 5, 7)] and second.prefilled
    assert first.finish_reason == "length" and len(second.output) == 1


def test_cancel_mid_prefill_frees_the_slot(tiny_models):
    engine, _ = _tiny(tiny_models, max_batch=2, max_step_tokens=4)
    events = []
    req = engine.submit(Request(prompt=list(range(3, 40)), params=SamplingParams(max_tokens=4, temperature=0),
                                on_event=events.append))
    engine.step()
    engine.step()
    assert req.kv_slot is not None and req.prompt_done == 8 and not req.prefilled
    engine.cancel(req)
    engine.step()
    assert req.finish_reason == "abort" and req.kv_slot is None and [e.finish for e in events] == ["abort"]
    assert sorted(engine.free_kv) == [0, 1] and not engine.running
    # the freed slot serves the next request from position 0 (the abandoned chunks do not leak into it)
    nxt = engine.submit(Request(prompt=[0, 50, 51, 52, 53, 54], params=SamplingParams(max_tokens=3, temperature=0)))
    while nxt.finish_reason is None:
        engine.step()
    fresh, _ = _tiny(tiny_models, max_batch=2, max_step_tokens=4)
    ref = fresh.submit(Request(prompt=nxt.prompt, params=SamplingParams(max_tokens=3, temperature=0)))
    while ref.finish_reason is None:
        fresh.step()
    assert nxt.output == ref.output


def test_failure_mid_prefill_frees_the_slot_and_spares_the_stream(tiny_models):
    engine, _ = _tiny(tiny_models, max_batch=2, max_step_tokens=4)
    stream = engine.submit(Request(prompt=[0, 40, 41], params=SamplingParams(max_tokens=8, temperature=0)))
    engine.step()
    events = []
    doomed = engine.submit(Request(prompt=list(range(3, 23)), params=SamplingParams(max_tokens=4, temperature=0),
                                   on_event=events.append))
    engine.step()
    assert doomed.prompt_done == 3 and not doomed.prefilled
    forward, slot = engine.model.forward, doomed.kv_slot

    def fails_on_its_chunks(batch, kv, deltas=None):  # batched and alone, as a corrupt delta would
        if any(k == slot and start > 0 for k, start, _ in batch.seqs):
            raise RuntimeError("broken chunk")
        return forward(batch, kv, deltas)

    engine.model.forward = fails_on_its_chunks
    before = len(stream.output)
    engine.step()
    assert doomed.finish_reason == "error" and events[-1].code == "engine_error" and "broken chunk" in events[-1].error
    assert doomed.kv_slot is None and slot in engine.free_kv and len(stream.output) == before + 1
    while stream.finish_reason is None:
        engine.step()
    alone, _ = _tiny(tiny_models, max_batch=2)
    ref = alone.submit(Request(prompt=stream.prompt, params=SamplingParams(max_tokens=8, temperature=0)))
    while ref.finish_reason is None:
        alone.step()
    assert stream.output == ref.output and sorted(engine.free_kv) == [0, 1]


@torch.no_grad()
def test_scored_prompt_stays_within_the_budget(tiny_models):
    engine, log = _tiny(tiny_models, max_batch=2, max_step_tokens=6)
    prompt = [0] + list(range(40, 70))
    req = Request(prompt=prompt, params=SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))
    events = []
    req.on_event = events.append
    engine.submit(req)
    while req.finish_reason is None:
        engine.step()
    assert all(log.tokens(i) <= 6 for i in range(len(log.steps))) and len(log.steps) >= 6
    scores = next(e.prompt_logprobs for e in events if e.prompt_logprobs is not None)
    hf = load_model(tiny_models["base"])
    want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    got = [s.logprob for s in scores[1:]]
    assert got == pytest.approx([float(want[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=2e-4)


# ---------------------------------------------------------------------- budget and memory sizing


def test_step_budget_default_and_limits():
    assert step_token_budget(None, 64) == DEFAULT_STEP_TOKENS
    assert step_token_budget(None, 1024) == 1024  # every running sequence can still decode each step
    assert step_token_budget(100, 64) == 100
    with pytest.raises(ValueError, match="--max-step-tokens .*--max-batch"):
        step_token_budget(32, 64)


def test_kv_sizing_from_free_memory():
    gib = 2**30
    # 80 GiB device, 60 GiB free after the base and the pool: 8 GiB + the fixed margin stay free
    budget = kv_budget_from_free(60 * gib, 80 * gib)
    assert budget == 52 * gib - HEADROOM_FIXED_BYTES
    per_block = 2 * 2**20  # e.g. 16 tokens of a 7B model in half precision
    per_seq = 256  # blocks of a 4096-token sequence
    assert kv_blocks_that_fit(budget, per_block, per_seq, max_len=4096, sized_from_free=True) == 26368  # 51.5 GiB
    assert kv_blocks_that_fit(per_seq * per_block, per_block, per_seq, max_len=4096) == per_seq
    assert kv_budget_from_free(5 * gib, 80 * gib) == 0  # less free than the headroom
    with pytest.raises(ConfigError, match="--max-model-len.*--kv-cache-mb"):
        kv_blocks_that_fit(0, per_block, per_seq, max_len=4096, sized_from_free=True)
    with pytest.raises(ConfigError, match="raise --kv-cache-mb"):
        kv_blocks_that_fit(per_seq * per_block - 1, per_block, per_seq, max_len=4096)


def test_engine_sizes_its_block_pool_from_its_kv_budget(tiny_models):
    engine, _ = _tiny(tiny_models, max_batch=16, kv_cache_mb=1)
    model, kv = engine.model, engine.kv
    per_block = 2 * model.num_layers * kv.block_size * model.kv_heads * model.head_dim * 4
    per_seq = -(-engine.max_len // kv.block_size)
    # the pool is the budget's blocks (a scratch block besides), at most what max_batch whole sequences need
    assert kv.num_blocks == min(2**20 // per_block, 16 * per_seq) >= per_seq
    assert kv.num_blocks * kv.block_size < 16 * engine.max_len  # less than max_batch whole sequences ...
    assert engine.max_batch == 16  # ... and yet max_batch is not capped by max_batch x max_len memory
    assert _tiny(tiny_models, max_batch=64, kv_cache_mb=1)[0].max_batch == kv.num_blocks  # a block each at least
    assert engine.kv_cache_bytes == (kv.num_blocks + 1) * per_block == engine.kv.k.nbytes + engine.kv.v.nbytes
    with pytest.raises(ValueError, match="--max-step-tokens"):
        _tiny(tiny_models, max_batch=8, max_step_tokens=4)


def test_startup_plan_text_on_cpu(tiny_models):
    from bitdelta.cli import build_parser
    from bitdelta.serving.runtime import build_runtime

    args = build_parser().parse_args(["serve", "--base", "b", "--max-step-tokens", "16", "--max-batch", "4"])
    cfg = EngineConfig.from_args(args)
    assert cfg.max_step_tokens == 16
    rt = build_runtime(tiny_models["base"], {}, config=cfg, start=False, kv_cache_mb=16, device="cpu")
    lines = rt.plan().splitlines()
    assert [ln.split()[0] for ln in lines] == ["device", "base", "delta", "KV", "max_batch", "step", "CUDA"]
    text = rt.plan()
    assert "device        cpu, float32" in text and "unquantized base, " in text
    assert f"delta pool    {rt.slots.num_slots} slots x " in text
    kv = rt.engine.kv
    assert f"KV cache      {kv.num_blocks} blocks x {kv.block_size} tokens = {kv.tokens} tokens, " in text
    assert "max_batch     4 running sequences" in text and "step budget   16 tokens" in text
    assert "CUDA graphs   off" in text
    rt.engine.graphs = DecodeGraphs(rt.model, rt.engine.kv, rt.slots, 4, capture=False, min_span=64)
    assert "CUDA graphs   layout only, not captured: batch buckets [1, 2, 4]" in rt.plan()


@pytest.mark.cuda
def test_cuda_kv_cache_sized_from_free_memory(tiny_models):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from bitdelta.serving.runtime import build_runtime

    rt = build_runtime(tiny_models["base"], {}, start=False, max_batch=8, device="cuda")
    free, _ = torch.cuda.mem_get_info()
    assert rt.engine.max_batch == 8 and rt.engine.kv_cache_bytes > 0 and free > HEADROOM_FIXED_BYTES
    assert rt.plan().splitlines()[0].split()[1].startswith("cuda")


def test_an_idle_engine_takes_a_burst_of_prompts_in_one_step_with_the_default_budget(tiny_models):
    """With the default step budget, prompts reaching an engine where nobody decodes share one step up
    to max_prefill_tokens (no stream's pace to protect); once streams decode, the budget caps the step
    again; a budget the user gave is a hard cap even when idle. Tokens as with chunking."""
    g = torch.Generator().manual_seed(3)

    def prompt(n):
        return [0] + torch.randint(3, 200, (n - 1,), generator=g).tolist()

    burst = [prompt(200) for _ in range(3)]  # 600 tokens: more than the default budget
    later = [prompt(250) for _ in range(3)]

    def serve(**kw):
        engine, log = _tiny(tiny_models, max_batch=8, **kw)
        reqs = [engine.submit(Request(prompt=p, params=SamplingParams(max_tokens=4, temperature=0))) for p in burst]
        engine.step()
        return engine, log, reqs

    def finish(engine):
        while engine.running or engine.waiting:
            engine.step()

    engine, log, reqs = serve()
    assert log.tokens(0) == 600 > DEFAULT_STEP_TOKENS and all(r.prefilled for r in reqs)
    late = [engine.submit(Request(prompt=p, params=SamplingParams(max_tokens=2, temperature=0))) for p in later]
    engine.step()  # three streams decode now: the new prompts get what the default budget leaves
    assert log.tokens(-1) == DEFAULT_STEP_TOKENS and sum(r.prompt_done for r in late) == DEFAULT_STEP_TOKENS - 3
    finish(engine)
    capped, capped_log, capped_reqs = serve(max_step_tokens=DEFAULT_STEP_TOKENS)
    assert capped_log.tokens(0) == DEFAULT_STEP_TOKENS and not capped_reqs[2].prefilled
    finish(capped)
    assert [r.output for r in reqs] == [r.output for r in capped_reqs]
    _, small_log, _ = serve(max_prefill_tokens=300)  # below the budget: the budget stays the limit
    assert small_log.tokens(0) == 300
