"""The paged KV cache: its block allocator, the paged decode attention against a dense reference, and
the engine on it.

Engine outputs on a paged cache with small blocks (prompts and outputs crossing block boundaries)
equal the merged Hugging Face models' greedy tokens; a pool too small for every request at once
preempts sequences, and each still gets exactly the tokens it gets alone, streamed once each; every
block comes back after finishes and aborts; the memory a sequence takes follows its tokens, not the
context length; the CUDA-graph decode layout (static inputs with block tables) run eagerly on CPU
equals a plain eager step.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bitdelta
from arch_pairs import finetune_of, load_model, make_arch_model
from bitdelta.serving.engine import Engine, PromptTooLong, Request, SamplingParams
from bitdelta.serving.graphs import DecodeGraphs, pack_step
from bitdelta.serving.kv_cache import BlockAllocator, KVCache, blocks_for
from bitdelta.serving.mapping import BatchMapping
from bitdelta.serving.paged_decode import paged_decode_attention
from serving.engine_checks import greedy, merged_models, random_prompts, run_to_completion, served_with_deltas

BLOCK = 4  # small blocks: every prompt and output here crosses several block boundaries


# ---------------------------------------------------------------------- allocator and cache


def test_block_allocator_hands_out_lowest_first_and_refuses_when_empty():
    a = BlockAllocator(5)
    assert a.allocate(2) == [0, 1] and a.num_free == 3
    assert a.allocate(4) is None and a.num_free == 3  # nothing taken on refusal
    assert a.allocate(3) == [2, 3, 4] and a.allocate(1) is None
    a.free([3, 0])
    assert a.num_free == 2 and a.allocate(2) == [0, 3]
    with pytest.raises(ValueError, match="not in this pool"):
        a.free([5])
    a.reset()
    assert a.num_free == 5
    with pytest.raises(ValueError, match="at least one block"):
        BlockAllocator(0)


def test_kv_cache_tables_indices_and_sizes():
    kv = KVCache(2, 3, 10, 2, 4, torch.float32, "cpu", num_blocks=6, block_size=4)
    assert kv.k.shape == (2, 7, 4, 2, 4) and kv.max_blocks == 3 and kv.scratch == 6 and kv.tokens == 24
    assert kv.nbytes == 7 * KVCache.bytes_per_block(2, 4, 2, 4, torch.float32) == 2 * 2 * 7 * 4 * 2 * 4 * 4
    per_block = KVCache.bytes_per_block(2, 4, 2, 4, torch.float32)
    assert KVCache.blocks_in_budget(6 * per_block + 1, 2, 4, 2, 4, torch.float32) == 6
    assert KVCache.bytes_per_sequence(2, 10, 2, 4, torch.float32, block_size=4) == 3 * per_block
    assert kv.ensure(1, 5) and kv.tables[1] == [0, 1]  # 5 positions: 2 blocks
    assert kv.host_tables[1].tolist() == [0, 1, 6] and kv.host_tables[0].tolist() == [6, 6, 6]
    assert kv.ensure(0, 4) and kv.tables[0] == [2]
    assert kv.ensure(1, 8) and kv.tables[1] == [0, 1]  # still 2 blocks
    assert kv.ensure(1, 9) and kv.tables[1] == [0, 1, 3]
    assert kv.flat_index(1, [0, 4, 8]) == [0, 4, 12] and kv.flat_index(0, [3]) == [11]
    with pytest.raises(ValueError, match="holds 1 KV blocks"):
        kv.flat_index(0, [4])
    assert kv.table_row(0, 3) == [2, 6, 6] and kv.pad_index == 24
    assert kv.ensure(2, 8) and kv.blocks_free == 0
    assert not kv.ensure(0, 5) and kv.tables[0] == [2]  # pool empty: nothing changes
    with pytest.raises(ValueError, match="past the cache's context"):
        kv.ensure(0, 11)
    kv.release(1)
    assert kv.blocks_free == 3 and kv.tables[1] == [] and kv.ensure(0, 10) and kv.tables[0] == [2, 0, 1]
    assert kv.host_tables.tolist() == [[2, 0, 1], [6, 6, 6], [4, 5, 6]]  # in step with the lists
    kv.k.fill_(1.0)
    kv.reset()
    assert kv.blocks_free == 6 and all(t == [] for t in kv.tables) and not kv.k.any()
    assert (kv.host_tables == kv.scratch).all()


# ---------------------------------------------------------------------- paged decode attention


def _dense_reference(q, k_cache, v_cache, tables, lens, scale, window, softcap):
    """Row by row in float64: the row's keys laid out by its table, then plain softmax attention."""
    b, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        blocks = tables[i, :blocks_for(n, bs)].long()
        keys = k_cache[blocks].reshape(-1, kvh, d)[:n].double()
        vals = v_cache[blocks].reshape(-1, kvh, d)[:n].double()
        lo = max(0, n - window) if window is not None else 0
        for head in range(h):
            g = head // (h // kvh)
            s = keys[lo:, g] @ q[i, head].double() * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            out[i, head] = s.softmax(0) @ vals[lo:, g]
    return out


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 3.0), (7, 2.5)])
def test_paged_decode_attention_matches_a_dense_reference(window, softcap):
    g = torch.Generator().manual_seed(7)
    b, h, kvh, d, bs, nblocks = 5, 6, 2, 12, 3, 23
    q = torch.randn(b, h, d, generator=g)
    k_cache, v_cache = torch.randn(nblocks, bs, kvh, d, generator=g), torch.randn(nblocks, bs, kvh, d, generator=g)
    lens = torch.tensor([1, 7, 3, 11, 9], dtype=torch.int32)
    order = torch.randperm(nblocks, generator=g)  # blocks scattered through the pool
    width = 5
    tables = torch.full((b, width), -7, dtype=torch.int32)  # entries past a row's blocks: garbage
    at = 0
    for i in range(b):
        n = blocks_for(int(lens[i]), bs)
        tables[i, :n] = order[at:at + n].to(torch.int32)
        at += n
    scale = 0.37
    got = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=scale, window=window, softcap=softcap)
    want = _dense_reference(q, k_cache, v_cache, tables, lens, scale, window, softcap)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.dtype == q.dtype and got.shape == (b, h, d)
    # a host bound on the lengths (a graph's span bucket) reads more blocks but gives the same result
    wider = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=scale, window=window, softcap=softcap,
                                   max_len=width * bs)
    torch.testing.assert_close(wider, got, rtol=1e-6, atol=1e-6)
    default_scale = paged_decode_attention(q, k_cache, v_cache, tables, lens, window=window, softcap=softcap)
    want_default = _dense_reference(q, k_cache, v_cache, tables, lens, d ** -0.5, window, softcap)
    torch.testing.assert_close(default_scale.double(), want_default, rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_refuses_mismatched_shapes():
    q, cache = torch.randn(2, 4, 8), torch.randn(3, 4, 2, 8)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_tables must be"):
        paged_decode_attention(q, cache, cache, torch.zeros(3, 1, dtype=torch.int32), lens)
    with pytest.raises(ValueError, match="cannot read"):
        paged_decode_attention(torch.randn(2, 3, 8), cache, cache, torch.zeros(2, 1, dtype=torch.int32), lens)


# ---------------------------------------------------------------------- the engine on a paged cache


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama base (64-token context), a row- and a column-scaled delta, and their merged models."""
    tmp = tmp_path_factory.mktemp("paged")
    base = make_arch_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp / "base")
        finetune_of(base, 1, scale=0.3).save_pretrained(tmp / "ft1")
        finetune_of(base, 2, scale=0.3).save_pretrained(tmp / "ft2")
    deltas = {"row": bitdelta.compress(tmp / "base", tmp / "ft1", scale="row", progress=False),
              "col": bitdelta.compress(tmp / "base", tmp / "ft2", scale="col", progress=False)}
    base_hf = load_model(tmp / "base")
    return base_hf, deltas, merged_models(base_hf, deltas)


def _engine(family, blocks: int | None = None, graphs: bool = False, **kw) -> Engine:
    """An engine on ``family``'s base with blocks of :data:`BLOCK` tokens; ``blocks``: a pool of that
    many blocks (through the byte budget); ``graphs``: decode steps in the graph layout, run eagerly."""
    base_hf, deltas, _ = family
    model, slots = served_with_deltas(base_hf, deltas, max_gpu_deltas=2, max_cpu_deltas=2)
    if blocks is not None:
        per_block = KVCache.bytes_per_block(model.num_layers, BLOCK, model.kv_heads, model.head_dim, model.dtype)
        kw["kv_cache_mb"] = blocks * per_block / 2**20
    kw.setdefault("kv_cache_mb", 16)
    engine = Engine(model, slots, kv_block_size=BLOCK, **kw)
    if graphs:
        engine.graphs = DecodeGraphs(model, engine.kv, slots, engine.max_batch, capture=False, min_span=8)
    return engine


def _all_returned(engine: Engine) -> bool:
    kv = engine.kv
    return (kv.blocks_free == kv.num_blocks and all(t == [] for t in kv.tables)
            and sorted(engine.free_kv) == list(range(engine.max_batch)))


def test_paged_engine_equals_merged_greedy_across_block_boundaries(family):
    _, _, merged = family
    engine = _engine(family, graphs=True, max_batch=4)
    g = torch.Generator().manual_seed(0)
    vocab = engine.model.vocab_size
    # prompts of 5 to 13 tokens and outputs of 5 to 18: every sequence spans several 4-token blocks; the
    # last steps decode base and row tenants only (graph layout; a column-scaled tenant decodes eagerly)
    plan = random_prompts([(None, 0, 9, 8), ("row", 0, 5, 18), ("col", 0, 13, 6), ("row", 2, 7, 9),
                           ("col", 3, 4, 7), (None, 4, 12, 5)], vocab, g)
    reqs = run_to_completion(engine, plan, max_steps=100)
    assert engine.graphs.replays >= 1
    for r in reqs:
        assert r.finish_reason == "length"
        assert r.output == greedy(merged[r.tenant], r.prompt, r.params.max_tokens), r.tenant
    assert engine.preemptions == 0 and _all_returned(engine)


def _alone(family, tenant, prompt, n) -> list[int]:
    engine = _engine(family, max_batch=1)
    r = engine.submit(Request(prompt=prompt, tenant=tenant, params=SamplingParams(max_tokens=n, temperature=0)))
    while r.finish_reason is None:
        engine.step()
    return r.output


@pytest.mark.parametrize("graphs", [False, True])
def test_small_pool_preempts_and_every_request_gets_its_own_tokens_once(family, graphs):
    # 64-token context in 4-token blocks: the pool must hold one whole sequence (16 blocks); 18 blocks
    # cannot hold five requests of up to 33 tokens (9 blocks each) at once.
    engine = _engine(family, blocks=18, graphs=graphs, max_batch=5)
    assert engine.kv.num_blocks == 18 and engine.max_batch == 5
    g = torch.Generator().manual_seed(3)
    vocab = engine.model.vocab_size
    specs = [(None, 10, 22), ("row", 7, 24), ("col", 12, 20), (None, 5, 26), ("row", 9, 21)]
    streams: dict[int, list[int]] = {}
    reqs = []
    for tenant, plen, n in specs:
        prompt = torch.randint(0, vocab, (plen,), generator=g).tolist()
        events: list[int] = []
        r = Request(prompt=prompt, tenant=tenant, params=SamplingParams(max_tokens=n, temperature=0),
                    on_event=lambda ev, events=events: events.append(ev.token) if ev.token is not None else None)
        reqs.append(engine.submit(r))
        streams[r.id] = events
    for _ in range(400):
        if all(r.finish_reason for r in reqs):
            break
        engine.step()
        assert engine.kv.blocks_free >= 0
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.preemptions >= 1 and any(r.preemptions for r in reqs)
    for r, (tenant, _, n) in zip(reqs, specs):
        assert streams[r.id] == r.output and len(r.output) == n  # each token streamed exactly once
        assert r.output == _alone(family, tenant, r.prompt, n), tenant
    assert _all_returned(engine)
    assert engine.stats()["preemptions"] == engine.preemptions


def test_blocks_return_after_finish_and_abort(family):
    engine = _engine(family, max_batch=4, max_step_tokens=6)
    g = torch.Generator().manual_seed(5)
    vocab = engine.model.vocab_size
    done = engine.submit(Request(prompt=[3, 4, 5], params=SamplingParams(max_tokens=2, temperature=0)))
    decoding = engine.submit(Request(prompt=[6, 7, 8, 9, 10], tenant="row",
                                     params=SamplingParams(max_tokens=40, temperature=0)))
    engine.step()
    engine.step()
    assert done.finish_reason == "length" and engine.kv.tables[decoding.kv_slot]
    prefilling = engine.submit(Request(prompt=torch.randint(0, vocab, (30,), generator=g).tolist(), tenant="col",
                                       params=SamplingParams(max_tokens=5, temperature=0)))
    waiting = engine.submit(Request(prompt=[1, 2], params=SamplingParams(max_tokens=5, temperature=0)))
    engine.step()
    assert not prefilling.prefilled and prefilling.kv_slot is not None  # mid-prefill (chunks of a small budget)
    used = engine.kv.num_blocks - engine.kv.blocks_free
    assert used == sum(len(t) for t in engine.kv.tables) > 0
    for r in (decoding, prefilling, waiting):
        engine.cancel(r)
    engine.step()
    assert all(r.finish_reason == "abort" for r in (decoding, prefilling, waiting))
    assert not engine.running and _all_returned(engine)


def test_memory_follows_tokens_not_context_length(family):
    engine = _engine(family, max_batch=8)
    kv = engine.kv
    assert engine.max_len == 64 and kv.num_blocks == 8 * 16  # never more than max_batch whole sequences
    lens = [1, 4, 5, 9, 13]
    reqs = [engine.submit(Request(prompt=list(range(3, 3 + n)), params=SamplingParams(max_tokens=3, temperature=0)))
            for n in lens]
    engine.step()  # every prompt prefilled, each sequence holding the blocks of its tokens only
    assert [len(kv.tables[r.kv_slot]) for r in reqs] == [blocks_for(n, BLOCK) for n in lens]
    assert kv.num_blocks - kv.blocks_free == sum(blocks_for(n, BLOCK) for n in lens) == 11  # not 5 x 16
    engine.step()  # the first token of each is now in the cache: a 4-token prompt crosses into a new block
    assert [len(kv.tables[r.kv_slot]) for r in reqs] == [blocks_for(n + 1, BLOCK) for n in lens]
    # a budget of 20 whole-context sequences, max_batch 64: the pool is the budget, not max_batch x max_len
    per_block = KVCache.bytes_per_block(engine.model.num_layers, BLOCK, engine.model.kv_heads,
                                        engine.model.head_dim, engine.model.dtype)
    small = _engine(family, blocks=20 * 16, max_batch=64)
    assert small.max_batch == 64 and small.kv.num_blocks == 320 and small.kv_cache_bytes == 321 * per_block


def test_prompt_that_cannot_fit_the_pool_is_refused(family):
    engine = _engine(family, max_batch=2)
    engine.kv = KVCache(engine.model.num_layers, 2, engine.max_len, engine.model.kv_heads, engine.model.head_dim,
                        engine.model.dtype, "cpu", num_blocks=3, block_size=BLOCK)
    with pytest.raises(PromptTooLong, match="needs 4 KV-cache blocks of 4 tokens and the whole cache holds 3"):
        engine.submit(Request(prompt=list(range(3, 15))))
    engine.submit(Request(prompt=list(range(3, 14))))  # 11 tokens and one generated: 3 blocks


def test_graph_static_inputs_run_eagerly_equal_a_plain_eager_step(family):
    engine = _engine(family, graphs=True, max_batch=4)
    for i, (tenant, n) in enumerate([(None, 6), ("row", 3), ("row", 9)]):  # (col-scaled tenants decode eagerly)
        engine.submit(Request(prompt=list(range(5 + i, 5 + i + n)), tenant=tenant,
                              params=SamplingParams(max_tokens=8, temperature=0)))
    for _ in range(3):  # prefill, then two decode steps in the graph layout
        engine.step()
    # rows are entries in order, whatever their sequence slots (here the reverse of the slots' order)
    entries = [(r.kv_slot, len(r.prompt) + len(r.output) - 1, [r.output[-1]], r.delta_slot)
               for r in reversed(engine.running)]
    assert [e[0] for e in entries] == [2, 1, 0]
    kv, model = engine.kv, engine.model
    assert all(kv.ensure(slot, pos + 1) for slot, pos, _, _ in entries)  # as the engine does before a step
    host = pack_step(entries, 4, kv)
    head, tables = host[:24].view(6, 4), host[24:].view(4, kv.max_blocks)
    for j, (slot, pos, _, _) in enumerate(entries):
        assert head[3, j] == pos + 1 and head[5, j] == kv.flat_index(slot, [pos])[0]
        assert tables[j].tolist() == kv.table_row(slot, kv.max_blocks)
    assert head[5, 3] == kv.pad_index and tables[3].tolist() == [kv.scratch] * kv.max_blocks  # the padding row
    # the same step, eagerly, on a copy of the cache (each path writes this step's keys)
    saved_k, saved_v = kv.k.clone(), kv.v.clone()
    eager = model.forward(BatchMapping.build(entries, model.device, kv), kv, engine.slots)
    kv.k.copy_(saved_k)
    kv.v.copy_(saved_v)
    kv.k[:, kv.scratch].zero_()
    batch = engine.graphs.prepare(entries)
    assert batch is not None and batch.replay is not None
    graphed = model.forward(batch, kv, engine.slots)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)  # one row per entry, in entry order
    # the scratch block took the padding row's key; no sequence's block did
    assert kv.k[:, kv.scratch].abs().sum() > 0


def test_stats_metrics_and_exports_name_blocks(family):
    import bitdelta.serving as serving
    from bitdelta.serving.mapping import KVCache as FromMapping
    from bitdelta.serving.metrics import Metrics

    assert serving.KVCache is FromMapping is KVCache
    engine = _engine(family, max_batch=2)
    engine.submit(Request(prompt=list(range(3, 10)), params=SamplingParams(max_tokens=4, temperature=0)))
    engine.step()
    st = engine.stats()
    assert (st["kv_blocks_total"], st["kv_blocks_free"], st["kv_block_size"]) == (32, 30, BLOCK)
    assert st["free_kv_slots"] == 1 and st["max_batch"] == 2 and st["preemptions"] == 0
    text = Metrics().render(engine, engine.slots)
    assert "bitdelta_kv_blocks_free 30" in text and "bitdelta_kv_blocks_total 32" in text
    assert "bitdelta_kv_slots_free 1" in text and "bitdelta_kv_slots_total 2" in text
    assert "bitdelta_kv_preemptions_total 0" in text


def test_a_preempted_scored_request_sends_its_prompt_logprobs_once(family):
    engine = _engine(family, blocks=18, max_batch=3)
    g = torch.Generator().manual_seed(11)
    vocab = engine.model.vocab_size
    events: list = []
    first = [engine.submit(Request(prompt=torch.randint(0, vocab, (9,), generator=g).tolist(), tenant=t,
                                   params=SamplingParams(max_tokens=30, temperature=0))) for t in (None, "row")]
    scored_prompt = torch.randint(0, vocab, (8,), generator=g).tolist()
    scored = engine.submit(Request(prompt=scored_prompt, tenant="row", on_event=events.append,
                                   params=SamplingParams(max_tokens=25, temperature=0, prompt_logprobs=2)))
    for _ in range(300):
        if all(r.finish_reason for r in [*first, scored]):
            break
        engine.step()
    assert scored.preemptions >= 1 and all(r.finish_reason == "length" for r in [*first, scored])
    with_scores = [e for e in events if e.prompt_logprobs is not None]
    assert len(with_scores) == 1 and len(with_scores[0].prompt_logprobs) == len(scored_prompt)
    assert [e.token for e in events if e.token is not None] == scored.output
    assert scored.output == _alone(family, "row", scored_prompt, 25)
    assert _all_returned(engine)


def _decode_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 4, 8, generator=g)
    k, v = torch.randn(2, 10, 4, 2, 8, generator=g).unbind(0)
    tables = torch.tensor([[3, 1, 0], [2, 4, 7], [9, 5, 6]], dtype=torch.int32)
    lens = torch.tensor([9, 4, 11], dtype=torch.int32)
    return q, k, v, tables, lens


@pytest.mark.parametrize("kernel", ["right", "wrong", "raises"])
def test_decode_attention_uses_the_kernel_only_after_its_trial(monkeypatch, kernel):
    """Where the model would take the Triton kernel (CUDA), a kernel that fails or disagrees with the PyTorch path on
    its first call is never used (the PyTorch path answers); one that agrees is used from then on."""
    import bitdelta.ops.paged_attention as ops_attention
    from bitdelta.serving import paged_decode

    calls = []

    def fake_kernel(q, k, v, tables, lens, *, scale=None, window=None, softcap=None, max_seq_len=None):
        calls.append(1)
        if kernel == "raises":
            raise RuntimeError("does not compile here")
        out = paged_decode.paged_decode_attention(q, k, v, tables, lens, scale=scale, window=window, softcap=softcap,
                                                  max_len=max_seq_len)
        return out if kernel == "right" else out + 1.0

    monkeypatch.setattr(paged_decode, "_wants_kernel", lambda q: True)
    monkeypatch.setattr(paged_decode, "_KERNELS", {})
    monkeypatch.setattr(ops_attention, "paged_decode_attention_triton", fake_kernel)
    monkeypatch.setattr("bitdelta.ops.triton_available", lambda: True)
    q, k, v, tables, lens = _decode_inputs()
    want = paged_decode.paged_decode_attention(q, k, v, tables, lens, window=6, max_len=11)
    for _ in range(3):
        got = paged_decode.decode_attention(q, k, v, tables, lens, window=6, max_len=11)
        assert torch.allclose(got, want, atol=1e-6)
    # the trial calls the kernel once (on the first call); a kernel that passed it then answers all three calls
    assert len(calls) == (4 if kernel == "right" else 1)
