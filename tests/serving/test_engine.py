"""Engine correctness: a mixed batch gives each request exactly its merged model's greedy output."""

from __future__ import annotations

import pytest
import torch

import bitdelta
from bitdelta.serving.engine import Engine, QueueFull, Request, SamplingParams
from bitdelta.serving.graphs import batch_buckets, pack_inputs, pick, span_buckets
from bitdelta.serving.model import BatchMapping, DeltaLlama
from bitdelta.serving.slots import DeltaSlots
from models import finetune_like
from serving.engine_checks import (
    emulate_graph_layout,
    greedy,
    load_hf,
    merged_models,
    random_prompts,
    run_to_completion,
)


@pytest.fixture(scope="module")
def tenants(tiny_models, tmp_path_factory):
    """Deltas of several kinds against the tiny base: row, scalar, col, 2-bit, added tokens."""
    tmp = tmp_path_factory.mktemp("engine-deltas")
    base = tiny_models["base"]
    out = {
        "shk_row": bitdelta.compress(base, tiny_models["shakespeare"], scale="row", progress=False),
        "gsm_scalar": bitdelta.compress(base, tiny_models["gsm8k"], scale="scalar", progress=False),
        "gsm_col": bitdelta.compress(base, tiny_models["gsm8k"], scale="col", progress=False),
        "shk_2bit": bitdelta.compress(base, tiny_models["shakespeare"], scale="row", bits=2, progress=False),
    }
    ft = finetune_like(load_hf(base), seed=5, scale=0.3, extra_vocab=3)
    ft.save_pretrained(tmp / "extra")
    out["extra_vocab"] = bitdelta.compress(base, tmp / "extra", scale="row", progress=False)
    return out


def test_mixed_batch_matches_merged_greedy(tiny_models, tenants):
    base_hf = load_hf(tiny_models["base"])
    model = DeltaLlama.from_hf(base_hf)
    slots = DeltaSlots(model, max_gpu_deltas=3, max_cpu_deltas=8, max_bits=2, max_extra_vocab=4)
    for name, delta in tenants.items():
        slots.register(name, f"<memory:{name}>", delta=delta)
    engine = Engine(model, slots, max_batch=8, max_queue=16, kv_cache_mb=64)

    g = torch.Generator().manual_seed(0)
    vocab = model.vocab_size
    # Prompts of 37 and 40 tokens take the segmented op (serving/op_calls.py), the one at step 3 in
    # a step with other sequences' decode tokens.
    plan = [  # (tenant, arrival step, prompt length, new tokens)
        (None, 0, 7, 12), ("shk_row", 0, 5, 12), ("gsm_col", 0, 37, 10), ("gsm_scalar", 2, 4, 12),
        ("shk_2bit", 3, 40, 9), (None, 5, 3, 8), ("extra_vocab", 6, 6, 10), ("shk_row", 8, 13, 6),
    ]
    reqs = run_to_completion(engine, random_prompts(plan, vocab, g, low=3), max_steps=200)
    # 5 deltas over 3 device slots: some had to wait for a slot and evict another.
    assert slots.totals["evictions"] >= 1
    merged = merged_models(base_hf, tenants)
    for r in reqs:
        assert r.finish_reason == "length"
        want = greedy(merged[r.tenant], r.prompt, r.params.max_tokens)
        assert r.output == want, f"tenant {r.tenant}: {r.output} != merged {want}"


def test_base_requests_match_base_model(tiny_models):
    base_hf = load_hf(tiny_models["base"])
    model = DeltaLlama.from_hf(base_hf)
    engine = Engine(model, DeltaSlots(model, max_gpu_deltas=1), max_batch=2, kv_cache_mb=16)
    r = engine.submit(Request(prompt=[5, 6, 7, 8], params=SamplingParams(max_tokens=6, temperature=0)))
    while r.finish_reason is None:
        engine.step()
    assert r.output == greedy(base_hf, [5, 6, 7, 8], 6)


def test_sampling_seeded_and_queue_bound(tiny_models):
    model = DeltaLlama.from_hf(load_hf(tiny_models["base"]))
    engine = Engine(model, DeltaSlots(model, max_gpu_deltas=1), max_batch=1, max_queue=2, kv_cache_mb=16)
    p = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=20, seed=123)
    a = engine.submit(Request(prompt=[5, 6, 7], params=p))
    b = engine.submit(Request(prompt=[5, 6, 7], params=p))
    with pytest.raises(QueueFull):
        engine.submit(Request(prompt=[5, 6, 7], params=p))
    while a.finish_reason is None or b.finish_reason is None:
        engine.step()
    assert a.output == b.output and len(a.output) == 8  # same seed, same tokens
    with pytest.raises(ValueError, match="context"):
        engine.submit(Request(prompt=[5] * engine.max_len, params=p))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_mixed_batch(tiny_models, tenants, dtype):
    """On a GPU (Triton ops via backend auto): float32 equals the merged greedy; bf16 mostly agrees."""
    base_hf = load_hf(tiny_models["base"])
    model = DeltaLlama.from_hf(base_hf, device="cuda", dtype=dtype)
    slots = DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=8, max_bits=2, max_extra_vocab=4)
    for name, delta in tenants.items():
        slots.register(name, f"<memory:{name}>", delta=delta)
    engine = Engine(model, slots, max_batch=8, max_queue=16)
    g = torch.Generator().manual_seed(1)
    reqs = []
    for i, tenant in enumerate([None, *tenants, "shk_row", None]):
        prompt = torch.randint(3, model.vocab_size, (4 + i,), generator=g).tolist()
        params = SamplingParams(max_tokens=10, temperature=0)
        reqs.append(engine.submit(Request(prompt=prompt, tenant=tenant, params=params)))
        engine.step()
    for _ in range(400):
        if all(r.finish_reason for r in reqs):
            break
        engine.step()
    merged = merged_models(base_hf, tenants)
    agree = total = 0
    for r in reqs:
        want = greedy(merged[r.tenant], r.prompt, 10)
        if dtype == torch.float32:
            assert r.output == want, f"tenant {r.tenant}: {r.output} != merged {want}"
        first_diff = next((i for i, (a, b) in enumerate(zip(r.output, want)) if a != b), len(want))
        agree += first_diff
        total += len(want)
    assert agree >= 0.5 * total  # bf16: greedy paths may part after a near-tie, but mostly agree


def test_waiting_tenant_is_not_starved(tiny_models, tenants):
    """With every delta slot busy, a stream of requests for resident tenants cannot starve another."""
    model = DeltaLlama.from_hf(load_hf(tiny_models["base"]))
    slots = DeltaSlots(model, max_gpu_deltas=1, max_cpu_deltas=8, max_bits=2, max_extra_vocab=4)
    for name in ("shk_row", "gsm_scalar"):
        slots.register(name, f"<memory:{name}>", delta=tenants[name])
    engine = Engine(model, slots, max_batch=4, kv_cache_mb=16)
    p = SamplingParams(max_tokens=4, temperature=0)
    first = engine.submit(Request(prompt=[5, 6], tenant="shk_row", params=p))
    engine.step()
    other = engine.submit(Request(prompt=[5, 6], tenant="gsm_scalar", params=p))
    for _ in range(30):  # a new request for the resident tenant every step, throughout
        engine.submit(Request(prompt=[7, 8], tenant="shk_row", params=p))
        engine.step()
    assert first.finish_reason == "length"
    assert other.finish_reason == "length", "the request for the non-resident tenant starved"


# ---------------------------------------------------------------------------------- CUDA-graph decode

def _mixed_workload(engine, names, seed=1, max_tokens=10, at_once=False):
    """Requests of every tenant in ``names`` (None = base) arriving one per step, or all before the
    first step with ``at_once``; greedy outputs. (test_cuda_mixed_batch's workload, whose float32
    tokens equal the merged models'.)"""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i, tenant in enumerate(names):
        prompt = torch.randint(3, engine.model.vocab_size, (4 + i % 16,), generator=g).tolist()
        reqs.append(engine.submit(Request(prompt=prompt, tenant=tenant,
                                          params=SamplingParams(max_tokens=max_tokens, temperature=0))))
        if not at_once:
            engine.step()
    for _ in range(400):
        if all(r.finish_reason for r in reqs):
            break
        engine.step()
    assert all(r.finish_reason == "length" for r in reqs)
    return [r.output for r in reqs]


def _decode_entries(engine):
    """The next step's entries, as Engine.step builds them, for sequences past their prompt."""
    return [(r.kv_slot, len(r.prompt) + len(r.output) - 1, [r.output[-1]], r.delta_slot) for r in engine.running]


def _graph_vs_eager_logits(engine, names):
    """One decode step computed by the graph path and eagerly, on the same cache: both logits."""
    for i, tenant in enumerate(names):
        engine.submit(Request(prompt=[5 + i, 6, 7, 8 + 2 * i], tenant=tenant,
                              params=SamplingParams(max_tokens=6, temperature=0)))
    for _ in range(3):  # prefill, then two graph decode steps
        engine.step()
    entries = _decode_entries(engine)
    model = engine.model
    eager = model.forward(BatchMapping.build(entries, model.device), engine.kv, engine.slots)
    batch = engine.graphs.prepare(entries)
    assert batch is not None and batch.replay is not None
    return model.forward(batch, engine.kv, engine.slots), eager


def test_graph_buckets_and_inputs():
    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]  # past the decode op's 128 rows too
    assert span_buckets(144) == [144] and span_buckets(4096) == [256, 512, 1024, 2048, 4096]
    assert span_buckets(300, min_span=64) == [64, 128, 256, 300]
    assert pick(1, [1, 2, 4]) == 1 and pick(3, [1, 2, 4]) == 4 and pick(5, [1, 2, 4]) is None
    # Two sequences in KV slots 2 and 0 of a 4-row bucket: rows are entries in order, rows 2 and 3 padding.
    got = torch.tensor(pack_inputs([(2, 9, [41], 1), (0, 4, [42], -1)], 4)).view(5, 4)
    assert got[0].tolist() == [41, 42, 0, 0]  # tokens
    assert got[1].tolist() == [9, 4, 0, 0]  # positions (padding: 0)
    assert got[2].tolist() == [1, -1, -1, -1]  # delta slots (padding: base)
    assert got[3].tolist() == [10, 5, 1, 1]  # context lengths incl. the new token (padding: 1)
    assert got[4].tolist() == [0, 1, 0, 0]  # each entry's row


def _past_the_decode_ops_rows(tiny_models, tenants, device="cpu"):
    """A model, delta slots and tenant names for one more decode row than the decode op takes in a call,
    plus twice over (``DECODE_MAX_TOKENS + 2`` sequences)."""
    from bitdelta.ops import DECODE_MAX_TOKENS

    model = DeltaLlama.from_hf(load_hf(tiny_models["base"]), device=device)
    slots = DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=8, max_bits=2)
    for name in ("shk_row", "shk_2bit"):
        slots.register(name, f"<memory:{name}>", delta=tenants[name])
    names = [("shk_row", "shk_2bit", None)[i % 3] for i in range(DECODE_MAX_TOKENS + 2)]
    return model, slots, names


@pytest.mark.slow  # 130 sequences through the tiny model, eager and in the graph layout
def test_graph_bucket_past_the_decode_ops_rows_matches_eager(tiny_models, tenants, monkeypatch):
    """A decode step of more sequences than the decode op takes in one call (130 > 128) replays the
    last bucket, whose delta products run in chunks of 128 rows: same tokens as the eager engine."""
    import bitdelta.serving.dispatch as dispatch
    from bitdelta.ops import DECODE_MAX_TOKENS

    model, slots, names = _past_the_decode_ops_rows(tiny_models, tenants)
    n = len(names)
    kw = dict(max_batch=n, max_queue=n, kv_cache_mb=64, max_step_tokens=1024, max_len=48)  # one span bucket
    want = _mixed_workload(Engine(model, slots, **kw), names, 3, 4, at_once=True)
    engine = Engine(model, slots, **kw)
    graphs = emulate_graph_layout(engine)
    assert n in graphs.batches and graphs.batches[-1] == 512  # max_batch's bucket, then prompt steps' ones
    replayed, chunks = [], []
    real_forward = graphs._forward
    monkeypatch.setattr(graphs, "_forward", lambda b, span, delta: replayed.append(b) or real_forward(b, span, delta))
    for op in ("bitdelta_linear", "bitdelta_linear_group"):  # separate or stacked projections
        real = getattr(dispatch, op)
        monkeypatch.setattr(dispatch, op, lambda x, *a, real=real, **k: chunks.append(x.shape[0]) or real(x, *a, **k))
    assert _mixed_workload(engine, names, 3, 4, at_once=True) == want
    assert replayed.count(n) >= 2  # every decode step held all the sequences
    assert DECODE_MAX_TOKENS in chunks and 2 in chunks  # the delta ops ran in chunks of the bucket's rows


@pytest.mark.cuda
def test_cuda_graph_bucket_past_the_decode_ops_rows(tiny_models, tenants, monkeypatch, caplog):
    """On a GPU (float32): 130 sequences replay a captured 130-row graph and give the eager tokens;
    and a bucket past 128 rows whose capture fails is dropped with a warning, its steps run eagerly."""
    from bitdelta.serving.graphs import DecodeGraphs

    model, slots, names = _past_the_decode_ops_rows(tiny_models, tenants, device="cuda")
    n = len(names)
    kw = dict(max_batch=n, max_queue=n, kv_cache_mb=64, max_step_tokens=1024, max_len=48)  # one span bucket
    want = _mixed_workload(Engine(model, slots, cuda_graphs=False, **kw), names, 3, 4, at_once=True)
    engine = Engine(model, slots, cuda_graphs=True, **kw)
    assert n in engine.graphs.batches and (n, engine.graphs.spans[0], True) in engine.graphs.graphs
    before = engine.graphs.replays
    assert _mixed_workload(engine, names, 3, 4, at_once=True) == want
    assert engine.graphs.replays - before >= 2
    real = DecodeGraphs._capture

    def fail_past_128(self, b, *a):
        if b > 128:
            raise RuntimeError("capture failed (test)")
        return real(self, b, *a)

    monkeypatch.setattr(DecodeGraphs, "_capture", fail_past_128)
    engine = Engine(model, slots, cuda_graphs=True, **kw)
    assert engine.graphs.batches[-1] == 128 and all(k[0] <= 128 for k in engine.graphs.graphs)
    assert "run without a CUDA graph" in caplog.text
    assert _mixed_workload(engine, names, 3, 4, at_once=True) == want

def test_engine_takes_lowest_free_kv_slot(tiny_models):
    model = DeltaLlama.from_hf(load_hf(tiny_models["base"]))
    engine = Engine(model, DeltaSlots(model, max_gpu_deltas=1), max_batch=4, kv_cache_mb=16)
    p = SamplingParams(max_tokens=1, temperature=0)
    a = engine.submit(Request(prompt=[5], params=p))
    b = engine.submit(Request(prompt=[6], params=SamplingParams(max_tokens=5, temperature=0)))
    engine.step()
    assert (a.kv_slot, b.kv_slot) == (None, 1)  # a finished after its one token and freed slot 0
    c = engine.submit(Request(prompt=[7], params=p))
    engine.step()
    assert c.finish_reason == "length" and b.kv_slot == 1 and 0 in engine.free_kv


def test_slot_install_writes_in_place(tiny_models, tenants):
    """Captured graphs read the pools' storage: loading and evicting deltas must never reallocate it."""
    model = DeltaLlama.from_hf(load_hf(tiny_models["base"]))
    slots = DeltaSlots(model, max_gpu_deltas=1, max_bits=2, max_extra_vocab=4)

    def ptrs():
        return sorted([t.data_ptr() for p in slots.pools.values() for t in p.values() if isinstance(t, torch.Tensor)]
                      + [t.data_ptr() for t in slots.tables.values()]
                      + [slots.extra_embed.data_ptr(), slots.extra_head.data_ptr(), slots.n_extra.data_ptr()])

    before = ptrs()
    for name in ("shk_row", "gsm_col", "extra_vocab"):  # one slot: each load evicts the previous delta
        slots.register(name, f"<memory:{name}>", delta=tenants[name])
        assert slots.load(name) == 0
        assert ptrs() == before
        assert (0 in slots.col_slots) == (name == "gsm_col")


@pytest.mark.slow  # every graph bucket, emulated on CPU
def test_emulated_graph_decode_matches_eager(tiny_models, tenants):
    """The graph path's padding, row = KV slot layout, span buckets and masks, run eagerly on CPU:
    same tokens as the eager engine (every tenant kind; col-scaled steps fall back to eager)."""
    model = DeltaLlama.from_hf(load_hf(tiny_models["base"]))
    slots = DeltaSlots(model, max_gpu_deltas=3, max_cpu_deltas=8, max_bits=2, max_extra_vocab=4)
    for name, delta in tenants.items():
        slots.register(name, f"<memory:{name}>", delta=delta)
    names = [None, *tenants, "shk_row", None]
    want = _mixed_workload(Engine(model, slots, max_batch=8, kv_cache_mb=16), names)
    engine = Engine(model, slots, max_batch=8, kv_cache_mb=16)
    assert engine.graphs is None  # CPU: off by default
    emulate_graph_layout(engine)
    assert _mixed_workload(engine, names) == want
    assert engine.graphs.replays >= 5
    # Logits of one decode step, graph layout vs eager, on the same cache (tenants in slots 0..2).
    engine = Engine(model, slots, max_batch=8, kv_cache_mb=16)
    emulate_graph_layout(engine)
    got, eager = _graph_vs_eager_logits(engine, [None, "shk_row", "shk_2bit", "extra_vocab"])
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_cuda_graphs_need_cuda(tiny_models):
    model = DeltaLlama.from_hf(load_hf(tiny_models["base"]))
    with pytest.raises(ValueError, match="CUDA device"):
        Engine(model, DeltaSlots(model, max_gpu_deltas=1), max_batch=2, kv_cache_mb=16, cuda_graphs=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_match_eager(tiny_models, tenants, dtype):
    """On a GPU: the mixed-tenant greedy workload with CUDA graphs on and off gives the same tokens
    (float32: identical; bf16: greedy paths may part after a near-tie, but mostly agree), and one
    decode step's logits agree between replay and eager."""
    model = DeltaLlama.from_hf(load_hf(tiny_models["base"]), device="cuda", dtype=dtype)
    slots = DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=8, max_bits=2, max_extra_vocab=4)
    for name, delta in tenants.items():
        slots.register(name, f"<memory:{name}>", delta=delta)
    names = [None, *tenants, "shk_row", None]
    eager = _mixed_workload(Engine(model, slots, max_batch=8, max_queue=16, cuda_graphs=False), names)
    engine = Engine(model, slots, max_batch=8, max_queue=16, cuda_graphs=True)
    st = engine.graphs.stats()
    assert st["graphs"] == 2 * len(st["batch_buckets"]) * len(st["span_buckets"]) and 8 in st["batch_buckets"]
    assert st["batch_buckets"][-1] == engine._graph_tokens() == 512  # steps with a prompt replay too
    graphed = _mixed_workload(engine, names)
    assert engine.graphs.replays >= 5 and engine.prompt_graph_steps >= 2  # (steps with the col tenant run eagerly)
    if dtype == torch.float32:
        assert graphed == eager
    agree = sum(next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), len(e)) for g, e in zip(graphed, eager))
    assert agree >= 0.5 * sum(len(e) for e in eager)
    got, want = _graph_vs_eager_logits(engine, [None, "shk_row", "shk_2bit", "extra_vocab"])
    tol = 1e-4 if dtype == torch.float32 else 0.15
    finite = torch.isfinite(want)  # added-token columns of tenants without them are -inf in both
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], want[finite], rtol=tol, atol=tol)


def _want(x, w, pool, ids):
    """The reference result of one module for rows of mixed row- and col-scaled tenants."""
    from bitdelta.ops import bitdelta_linear_ref

    col = torch.tensor([int(s) in pool["col_slots"] for s in ids.tolist()])
    return torch.where(col[:, None], bitdelta_linear_ref(x, w, None, pool["signs"], pool["col"], "col", ids),
                       bitdelta_linear_ref(x, w, None, pool["signs"], pool["row"], "row", ids))


def _recording_slots(tiny_models, tenants, monkeypatch):
    import bitdelta.serving.dispatch as slots_mod

    model = DeltaLlama.from_hf(load_hf(tiny_models["base"]))
    slots = DeltaSlots(model, max_gpu_deltas=3, max_cpu_deltas=8, max_bits=2, max_extra_vocab=4)
    for name in ("shk_row", "gsm_col", "shk_2bit"):
        slots.register(name, f"<memory:{name}>", delta=tenants[name])
        slots.load(name)
    calls = []
    dec, seg = slots_mod.bitdelta_linear, slots_mod.bitdelta_linear_segmented
    monkeypatch.setattr(slots_mod, "bitdelta_linear", lambda x, *a: calls.append(("decode", x.shape[0])) or dec(x, *a))
    monkeypatch.setattr(slots_mod, "bitdelta_linear_segmented",
                        lambda x, *a, **k: calls.append(("segmented", x.shape[0])) or seg(x, *a, **k))
    name = next(k for k in slots.pools if k.endswith("mlp.down_proj"))
    return model, slots, calls, name


def test_large_decode_step_runs_in_decode_sized_chunks(tiny_models, tenants, monkeypatch):
    """A decode step of more than DECODE_MAX_TOKENS sequences (one token each) calls the decode op in
    chunks of at most that many rows; the result equals the reference on the whole batch."""
    from bitdelta.ops import DECODE_MAX_TOKENS

    model, slots, calls, name = _recording_slots(tiny_models, tenants, monkeypatch)
    n = DECODE_MAX_TOKENS + 3
    cycle = [-1] + [slots.entries[t].slot for t in ("shk_row", "gsm_col", "shk_2bit")]
    batch = BatchMapping.build([(i, 5, [3 + i % 50], cycle[i % 4]) for i in range(n)], model.device)
    w, pool = model.weights[name], slots.pools[name]
    x = torch.randn(n, w.shape[1], generator=torch.Generator().manual_seed(3))
    y = slots.linear(name, x, w, batch)
    assert calls and all(kind == "decode" and rows <= DECODE_MAX_TOKENS for kind, rows in calls)
    assert sum(rows for _, rows in calls) == n
    torch.testing.assert_close(y, _want(x, w, pool, batch.ids))


def test_prompts_take_the_segmented_op_and_decode_rows_the_decode_op(tiny_models, tenants, monkeypatch):
    """A step mixing prompts (long sequences) and decode tokens of row and col tenants: the long
    sequences go to the segmented op, one segment each, the rest to the decode op; the result equals
    the reference. A step of one long prompt is a single segmented call over all rows."""
    from bitdelta.serving.op_calls import SEGMENT_MIN_TOKENS

    model, slots, calls, name = _recording_slots(tiny_models, tenants, monkeypatch)
    row, col, two = (slots.entries[t].slot for t in ("shk_row", "gsm_col", "shk_2bit"))
    long = SEGMENT_MIN_TOKENS
    entries = [(0, 0, list(range(3, 3 + long)), row), (1, 7, [5], col), (2, 0, list(range(4, 4 + long + 5)), col),
               (3, 9, [6], -1), (4, 0, list(range(5, 5 + long + 1)), -1), (5, 2, [7], two),
               (6, 0, list(range(6, 6 + long - 1)), two)]  # the last is one token short of "long"
    batch = BatchMapping.build(entries, model.device)
    w, pool = model.weights[name], slots.pools[name]
    t = batch.tokens.shape[0]
    x = torch.randn(t, w.shape[1], generator=torch.Generator().manual_seed(4))
    y = slots.linear(name, x, w, batch)
    torch.testing.assert_close(y, _want(x, w, pool, batch.ids))
    seg_rows = sorted(rows for kind, rows in calls if kind == "segmented")
    dec_rows = sum(rows for kind, rows in calls if kind == "decode")
    assert seg_rows == sorted([long + long + 1, long + 5])  # row-mode prompts (incl. base) / col-mode prompt
    assert dec_rows == 1 + 1 + 1 + (long - 1)
    calls.clear()
    one = BatchMapping.build([(0, 0, list(range(3, 3 + 2 * long)), row)], model.device)
    x1 = torch.randn(2 * long, w.shape[1], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(slots.linear(name, x1, w, one), _want(x1, w, pool, one.ids))
    assert calls == [("segmented", 2 * long)]
