"""The binary tensor-core decode kernel (bitdelta.ops.cuda_popc) against its spec
(bitdelta.ops.bitplane, same quantisation: agreement to float32 rounding) and against the fp32
reference op (within the quantisation bound), on a CUDA GPU."""

import pytest
import torch
from _inputs import make_inputs

from bitdelta.ops import bitplane as bp
from bitdelta.ops import reference as ref

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (T, N, K, ids): K not a multiple of 512 with unaligned sign rows (75 and 13 bytes), aligned rows
# whose K is not a multiple of 512 (2176: 272 bytes), N not a multiple of 16 or of a block; mixed
# tenants with -1, one tenant with more tokens than a pass (TG) takes, all -1, 128 tokens.
CASES = [
    (1, 40, 600, [1]),
    (7, 1000, 2176, [0, -1, 2, 0, 1, 2, -1]),
    (9, 24, 100, [2] * 9),
    (5, 4104, 4096, [-1] * 5),
    (128, 200, 1024, None),
]


def _cuda(*ts):
    return [t.cuda() if t is not None else None for t in ts]


def _popc():
    from bitdelta.ops import cuda_popc

    assert cuda_popc.available(), "the popc kernel does not compile/load on this GPU"
    return cuda_popc


@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_popc_delta_matches_bitplane_spec(mode, bits, dtype):
    cp = _popc()
    for i, (t, n, k, ids) in enumerate(CASES):
        ids = torch.tensor(ids) if ids is not None else None
        x, w, b, signs, sc, ids = make_inputs(t, n, k, 3, bits, mode, dtype, seed=i + bits, ids=ids)
        want = bp.delta_bitplane(x, signs, sc, mode, ids)
        for cfg in (None, {"TARGET": 1 << 20, "U": 2, "TG": 2}):  # default split, and the finest split
            got = cp.decode_delta(*_cuda(x, signs, sc), mode, ids.cuda(), config=cfg).cpu()
            assert torch.isfinite(got).all()
            scale = max(want.abs().max().item(), 1e-30)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * scale)
        # the whole op against the fp32 reference: quantisation bound on the delta term
        y = cp.bitdelta_decode(*_cuda(x, w, b, signs, sc), mode, ids.cuda()).cpu()
        r = ref.bitdelta_linear_ref(x.float(), w.float(), b.float(), signs, sc, mode, ids)
        delta = r - ref.bitdelta_linear_ref(x.float(), w.float(), b.float(), signs, sc, mode, torch.full_like(ids, -1))
        rnd = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
        assert y.dtype == dtype
        assert (y.float() - r).norm() <= 0.02 * delta.norm() + rnd * r.norm()


@pytest.mark.parametrize("overlap", [False, True])
def test_popc_decode_cuda_graph_capture(overlap):
    cp = _popc()
    x, w, b, signs, sc, ids = _cuda(*make_inputs(16, 512, 1024, 8, 1, "row", torch.float16, seed=3))
    y = cp.bitdelta_decode(x, w, b, signs, sc, "row", ids, overlap=overlap)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_g = cp.bitdelta_decode(x, w, b, signs, sc, "row", ids, overlap=overlap)
    ids.copy_(ids.flip(0))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want = bp.bitdelta_linear_bitplane(*[v.cpu() for v in (x, w, b, signs, sc)], "row", ids.cpu())
    torch.testing.assert_close(y_g.cpu().float(), want.float(), rtol=5e-3, atol=5e-3)
    assert not torch.equal(y, y_g)


@pytest.mark.parametrize("choice", ["auto", "popc"])
def test_dispatch_routes_decode_to_popc(monkeypatch, choice):
    cp = _popc()
    monkeypatch.setenv("BITDELTA_DECODE_KERNEL", choice)
    import bitdelta.ops as ops

    x, w, b, signs, sc, ids = make_inputs(6, 96, 1536, 3, 1, "row", torch.float16, seed=8)
    y = ops.bitdelta_linear(*_cuda(x, w, b, signs, sc), "row", ids.cuda())
    popc = choice == "popc" or torch.cuda.get_device_capability() == (9, 0)
    want = (bp.bitdelta_linear_bitplane if popc else ref.bitdelta_linear_ref)(x, w, b, signs, sc, "row", ids)
    torch.testing.assert_close(y.cpu().float(), want.float(), rtol=2e-3, atol=2e-3)
    # the popc kernel's answer differs from the unquantised reference: the route is observable
    if popc:
        assert not torch.allclose(y.cpu().float(), ref.bitdelta_linear_ref(x, w, b, signs, sc, "row", ids).float(),
                                  rtol=1e-4, atol=1e-4)
    assert cp.available()
    monkeypatch.setenv("BITDELTA_DECODE_KERNEL", "triton")
    y_t = ops.bitdelta_linear(*_cuda(x, w, b, signs, sc), "row", ids.cuda())
    torch.testing.assert_close(y_t.cpu().float(), ref.bitdelta_linear_ref(x, w, b, signs, sc, "row", ids).float(),
                               rtol=5e-3, atol=5e-3)


def _group_inputs(t, widths, k, d, bits, mode, dtype, seed, ids=None):
    """x, the stacked weight, (signs, scales) per member and ids for a group of ``widths`` matrices."""
    members, ws = [], []
    x = None
    for j, n in enumerate(widths):
        xj, w, _, signs, sc, idj = make_inputs(t, n, k, d, bits, mode, dtype, seed=seed, ids=ids, bias=False)
        if x is None:
            x, ids = xj, idj
        ws.append(w * (1 + j))  # members differ in their base rows as well as in their signs
        signs = pack_signs_like(signs, seed + 17 * j)
        members.append((signs, sc * (1 + 0.5 * j)))
    return x, torch.cat(ws), members, ids


def pack_signs_like(signs, seed):
    """Fresh random bits of the same packed shape (the members must not share signs)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, signs.shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("mode", ["scalar", "row"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_popc_group_matches_the_members_one_by_one(mode, dtype, monkeypatch):
    """The grouped op (one base GEMM, one prep, a delta launch per member, one add) gives each
    member's columns what its own call gives: odd widths, K not a multiple of 512, -1 tokens."""
    cp = _popc()
    import bitdelta.ops as ops

    monkeypatch.setenv("BITDELTA_DECODE_KERNEL", "popc")  # the ops tests' default is the Triton kernel

    for t, widths, k, ids in ((1, [40, 24, 24], 600, [1]), (7, [1000, 136, 136], 2176, [0, -1, 2, 0, 1, 2, -1]),
                              (33, [520, 520], 1024, None)):
        ids = torch.tensor(ids) if ids is not None else None
        x, w, members, ids = _group_inputs(t, widths, k, 3, 1, mode, dtype, seed=t, ids=ids)
        got = cp.decode_delta_group(_cuda(x)[0], [tuple(_cuda(*m)) for m in members], mode, ids.cuda()).cpu()
        want = torch.cat([bp.delta_bitplane(x, s, sc, mode, ids) for s, sc in members], dim=-1)
        scale = max(want.abs().max().item(), 1e-30)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * scale)
        y = ops.bitdelta_linear_group(*_cuda(x, w), [tuple(_cuda(*m)) for m in members], mode, ids.cuda()).cpu()
        parts = w.split(widths)
        one_by_one = torch.cat([cp.bitdelta_decode(*_cuda(x, p, None, s, sc), mode, ids.cuda()).cpu()
                                for p, (s, sc) in zip(parts, members)], dim=-1)
        assert y.shape == (t, sum(widths)) and y.dtype == dtype
        # same quantised delta on both sides; cuBLAS's base GEMMs of different widths split K differently
        # (fp16 split-K partial sums are rounded to fp16), so a few ulps of the partial sums apart
        rnd = {torch.float16: 5e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(y.float(), one_by_one.float(), rtol=rnd, atol=2 * rnd)
        # the Triton route (the ops tests' default) is the members' calls side by side: exact delta
        monkeypatch.setenv("BITDELTA_DECODE_KERNEL", "triton")
        y_t = ops.bitdelta_linear_group(*_cuda(x, w), [tuple(_cuda(*m)) for m in members], mode, ids.cuda()).cpu()
        monkeypatch.setenv("BITDELTA_DECODE_KERNEL", "popc")
        exact = torch.cat([ref.bitdelta_linear_ref(x.float(), p.float(), None, s, sc, mode, ids)
                           for p, (s, sc) in zip(parts, members)], dim=-1)
        torch.testing.assert_close(y_t.float(), exact, rtol=3 * rnd, atol=3 * rnd)


def test_popc_group_in_a_cuda_graph():
    cp = _popc()
    x, w, members, ids = _group_inputs(16, [512, 128, 128], 1024, 8, 1, "row", torch.bfloat16, seed=5)
    x, w, ids = _cuda(x, w, ids)
    members = [tuple(_cuda(*m)) for m in members]
    cp.bitdelta_decode_group(x, w, None, members, "row", ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_g = cp.bitdelta_decode_group(x, w, None, members, "row", ids)
    ids.copy_(ids.flip(0))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want = torch.cat([bp.bitdelta_linear_bitplane(x.cpu(), p.cpu(), None, s.cpu(), sc.cpu(), "row", ids.cpu())
                      for p, (s, sc) in zip(w.split([512, 128, 128]), members)], dim=-1)
    torch.testing.assert_close(y_g.cpu().float(), want.float(), rtol=3e-2, atol=3e-2)
