"""The unfused (reference-style) baseline mode equals the reference op and the fused engine path."""

from __future__ import annotations

import warnings

import pytest
import torch

import bitdelta
from bitdelta.ops import bitdelta_linear_ref
from bitdelta.pack import pack_signs, unpack_signs
from bitdelta.serving.engine import Engine, Request, SamplingParams
from bitdelta.serving.model import BatchMapping, DeltaLlama
from bitdelta.serving.slots import DeltaSlots
from bitdelta.serving.unfused import expand_signs, tenant_groups, unfused_linear, unfused_multi_tenant


def _inputs(t, n, k, d, bits, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    signs = pack_signs(torch.rand(d, bits, n, k, generator=g) > 0.5)
    row = (torch.rand(d, bits, n, generator=g) + 0.5) * 2 / k**0.5
    col = (torch.rand(d, bits, k, generator=g) + 0.5) * 2 / k**0.5
    ids = torch.randint(-1, d, (t,), generator=g, dtype=torch.int32)
    return x, w, signs, row, col, ids


def _groups(ids):
    return [(d, torch.nonzero(ids == d).flatten()) for d in sorted(set(ids.tolist())) if d >= 0]


@pytest.mark.parametrize("k", [8, 13, 72])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expand_signs_equals_unpack(k, dtype):
    packed = pack_signs(torch.rand(2, 5, k, generator=torch.Generator().manual_seed(k)) > 0.5)
    for p in packed:
        assert torch.equal(expand_signs(p, k, dtype), unpack_signs(p, k, dtype=dtype))


@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("t,n,k", [(9, 24, 72), (1, 16, 13), (20, 40, 200)])
def test_unfused_matches_reference(mode, bits, t, n, k):
    x, w, signs, row, col, ids = _inputs(t, n, k, 4, bits, seed=t + n + k + bits)
    if mode == "scalar":  # the pools hold scalar scales broadcast into the row table
        scalar = row[:, :, 0]
        row = scalar[:, :, None].expand_as(row).contiguous()
        want = bitdelta_linear_ref(x, w, None, signs, scalar, "scalar", ids)
    else:
        want = bitdelta_linear_ref(x, w, None, signs, row if mode == "row" else col, mode, ids)
    col_slots = set(range(4)) if mode == "col" else set()
    got = unfused_multi_tenant(x, w, signs, row, col, col_slots, _groups(ids))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unfused_mixed_row_and_col_tenants():
    x, w, signs, row, col, ids = _inputs(16, 24, 40, 4, 1, seed=3)
    col_slots = {1, 3}
    got = unfused_multi_tenant(x, w, signs, row, col, col_slots, _groups(ids))
    want_row = bitdelta_linear_ref(x, w, None, signs, row, "row", ids)
    want_col = bitdelta_linear_ref(x, w, None, signs, col, "col", ids)
    is_col = torch.tensor([int(d) in col_slots for d in ids])
    torch.testing.assert_close(got, torch.where(is_col[:, None], want_col, want_row), rtol=1e-5, atol=1e-5)


def test_tenant_groups_from_batch():
    batch = BatchMapping.build([(0, 0, [5, 6, 7], 2), (1, 4, [8], -1), (2, 3, [9], 2), (3, 0, [1, 2], 0)], "cpu")
    groups = dict((s, r) for s, r in tenant_groups(batch))
    assert groups[0] == slice(5, 7)
    assert groups[2].tolist() == [0, 1, 2, 4]
    assert set(groups) == {0, 2}
    assert tenant_groups(batch) is tenant_groups(batch)  # built once per step
    last = batch.take_last()
    assert dict(tenant_groups(last))[0] == slice(3, 4)


@pytest.fixture(scope="module")
def deltas(tiny_models):
    base = tiny_models["base"]
    return {"shk_row": bitdelta.compress(base, tiny_models["shakespeare"], scale="row", progress=False),
            "gsm_col": bitdelta.compress(base, tiny_models["gsm8k"], scale="col", progress=False)}


def _run(tiny_models, deltas, linear_fn):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32).eval()
    model = DeltaLlama.from_hf(hf)
    slots = DeltaSlots(model, max_gpu_deltas=2, linear_fn=linear_fn)
    for name, d in deltas.items():
        slots.register(name, f"<memory:{name}>", delta=d)
    engine = Engine(model, slots, max_batch=4, kv_cache_mb=16)
    g = torch.Generator().manual_seed(0)
    reqs = []
    for i, tenant in enumerate(["shk_row", None, "gsm_col", "shk_row"]):
        prompt = torch.randint(3, model.vocab_size, (3 + 2 * i,), generator=g).tolist()
        params = SamplingParams(max_tokens=6, temperature=0)
        reqs.append(engine.submit(Request(prompt=prompt, tenant=tenant, params=params)))
        if i == 1:
            engine.step()  # later requests join a running batch: prefill and decode rows mix
    while any(r.finish_reason is None for r in reqs):
        engine.step()
    return [r.output for r in reqs]


def test_engine_unfused_mode_matches_fused(tiny_models, deltas):
    assert _run(tiny_models, deltas, unfused_linear) == _run(tiny_models, deltas, None)
