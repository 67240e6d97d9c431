"""Triton kernels vs the reference. On CPU they run under TRITON_INTERPRET=1 (set before the kernels
are decorated); on a CUDA machine the same tests run compiled, plus the cuda-marked ones. The matrix
of modes, bits, dtypes and launch variants is marked slow (minutes in the interpreter); the public-API
and all-base-only checks stay in the quick set."""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from _inputs import TOLERANCES, make_inputs  # noqa: E402

import bitdelta.ops as ops  # noqa: E402
from bitdelta.ops import reference as ref  # noqa: E402
from bitdelta.ops import triton_kernels, triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and type(triton_kernels.bitdelta_decode_kernel).__name__ != "InterpretedFunction":
    # Imported (and jitted) before the env var was set: re-decorate under the interpreter.
    importlib.reload(triton_kernels)
    importlib.reload(triton_ops)

# Small launch configs so the CPU interpreter stays fast and masking/multi-block paths are hit.
SMALL_DECODE = {"BN": 16, "BKD": 64, "BKW": 2, "TG": 16, "DOT_MIN": 4, "SPLIT_K": 1,
                "num_warps": 4, "num_stages": 1}
# Variants: CUDA-core GEMV for tenants of < 4 tokens (else tensor cores); tensor cores for every
# tenant with a 2-way K split; CUDA cores for every tenant with the auto split. (The experimental
# GEMVs have their own test: under the interpreter they are slow on many-token tenants.)
DECODE_VARIANTS = [SMALL_DECODE, {**SMALL_DECODE, "DOT_MIN": 0, "SPLIT_K": 2},
                   {**SMALL_DECODE, "DOT_MIN": 65, "SPLIT_K": 0}]
SMALL_SEG = {"BM": 16, "BN": 16, "BK": 32, "SWAP": False, "num_warps": 4, "num_stages": 1}
SHAPES = [(24, 16), (40, 96), (24, 200)]  # (N, K): N not a multiple of BN, K not of BK/BKD; 96: int32 sign words


def _dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _to(dev, *ts):
    return [t.to(dev) if t is not None else None for t in ts]


def _check(y, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu().float(), expected.cpu().float(), rtol=rtol, atol=atol)


ID_PATTERNS = ("mixed", "all_base", "one_tenant")


def _id_patterns(t, d):
    g = torch.Generator().manual_seed(t)
    mixed = torch.randint(-1, d, (t,), generator=g)
    mixed[0] = -1
    return {"mixed": mixed, "all_base": torch.full((t,), -1), "one_tenant": torch.full((t,), d - 1)}


# (tokens, tenant-id pattern); shape SHAPES[i] and launch variant (i + j) for the i-th token count and
# j-th pattern. One token of one tenant is the "mixed" case already.
DECODE_CASES = [(t, name) for t in (1, 3, 17) for name in ID_PATTERNS if not (t == 1 and name == "one_tenant")]


@pytest.mark.slow
@pytest.mark.parametrize("t,ids_name", DECODE_CASES, ids=[f"T{t}-{name}" for t, name in DECODE_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
def test_decode_kernel_matches_reference(mode, bits, dtype, t, ids_name):
    i, j = (1, 3, 17).index(t), ID_PATTERNS.index(ids_name)
    n, k = SHAPES[i]
    cfg = DECODE_VARIANTS[(i + j) % len(DECODE_VARIANTS)]
    ids = _id_patterns(t, 3)[ids_name]
    x, w, b, signs, sc, ids = make_inputs(t, n, k, 3, bits, mode, dtype, seed=i, ids=ids)
    expected = ref.bitdelta_linear_ref(x, w, b, signs, sc, mode, ids)
    y = triton_ops.bitdelta_decode(*_to(DEVICE, x, w, b, signs, sc), mode, ids.to(DEVICE), config=cfg)
    _check(y, expected, dtype)


# Lookup tables on fp16; packed fp16 pairs on bf16 inputs (rounded to fp16 inside; col scales take the
# default GEMV there). One dtype each keeps the interpreter's time down.
# (tenant ids, (N, K), SPLIT_K): 3 and 5 sign words
GEMV_CASES = [([2], (24, 96), 1), ([0, -1, 2, 0, 1], (40, 160), 0)]


@pytest.mark.slow
@pytest.mark.parametrize("ids,shape,split", GEMV_CASES, ids=["T1-split1", "T5-split-auto"])
@pytest.mark.parametrize("gemv,dtype", [(1, torch.float16), (2, torch.bfloat16)], ids=["lut-fp16", "pairs-bf16"])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
def test_decode_experimental_gemvs_match_reference(mode, bits, gemv, dtype, ids, shape, split):
    lut = {**SMALL_DECODE, "DOT_MIN": 65, "GEMV": gemv}  # every tenant through that GEMV
    (n, k), t, ids = shape, len(ids), torch.tensor(ids)
    x, w, b, signs, sc, ids = make_inputs(t, n, k, 3, bits, mode, dtype, seed=t, ids=ids)
    expected = ref.bitdelta_linear_ref(x, w, b, signs, sc, mode, ids)
    y = triton_ops.bitdelta_decode(*_to(DEVICE, x, w, b, signs, sc), mode, ids.to(DEVICE),
                                   config={**lut, "SPLIT_K": split})
    _check(y, expected, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_decode_kernel_no_bias_default_config(dtype):
    # The production config (BKD larger than K) on a token count that needs the 128-row tile.
    x, w, b, signs, sc, ids = make_inputs(100, 40, 72, 5, 1, "row", dtype, seed=7, bias=False)
    y = triton_ops.bitdelta_decode(*_to(DEVICE, x, w, None, signs, sc), "row", ids.to(DEVICE))
    _check(y, ref.bitdelta_linear_ref(x, w, None, signs, sc, "row", ids), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
def test_segmented_kernel_matches_reference(mode, bits, dtype):
    n, k = SHAPES[(bits + len(mode)) % 3]
    # Segments: longer than BM, an empty one, a base-only one, and a one-row one.
    starts = torch.tensor([0, 20, 20, 23, 24, 37], dtype=torch.int32)
    seg_ids = torch.tensor([1, 0, -1, 2, 0], dtype=torch.int32)
    x, w, b, signs, sc, _ = make_inputs(37, n, k, 3, bits, mode, dtype, seed=bits)
    expected = ref.bitdelta_linear_segmented_ref(x, w, b, signs, sc, mode, starts, seg_ids)
    # EXPAND_MIN 3 (bits 1): the 20- and 13-row tenant segments run as a GEMM against W + Δ̂
    # expanded, the 3-row base-only one against W; the 1-row one stays in the fused kernel.
    # EXPAND_MIN 0 (bits 2): everything in the fused kernel.
    cfg = {**SMALL_SEG, "SWAP": bits == 2, "EXPAND_MIN": 3 if bits == 1 else 0}
    y = triton_ops.bitdelta_segmented(*_to(DEVICE, x, w, b, signs, sc), mode, starts.to(DEVICE),
                                      seg_ids.to(DEVICE), config=cfg)
    _check(y, expected, dtype)


def test_segmented_all_base_only():
    x, w, b, signs, sc, _ = make_inputs(19, 24, 16, 2, 1, "scalar", torch.float16)
    starts = torch.tensor([0, 19], dtype=torch.int32)
    seg_ids = torch.tensor([-1], dtype=torch.int32)
    y = triton_ops.bitdelta_segmented(*_to(DEVICE, x, w, b, signs, sc), "scalar", starts.to(DEVICE),
                                      seg_ids.to(DEVICE), config=SMALL_SEG)
    _check(y, (x.float() @ w.float().T + b.float()).half(), torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["row", "col"])
def test_large_batch_sorts_into_segments(mode):
    # T > DECODE_MAX_TOKENS in arbitrary tenant order goes through the device-side sort + segmented GEMM.
    assert triton_ops.DECODE_MAX_TOKENS < 130
    x, w, b, signs, sc, ids = make_inputs(130, 24, 72, 4, 2, mode, torch.float16, seed=3)
    expected = ref.bitdelta_linear_ref(x, w, b, signs, sc, mode, ids)
    y = triton_ops.bitdelta_linear(*_to(DEVICE, x, w, b, signs, sc), mode, ids.to(DEVICE), config=SMALL_SEG)
    _check(y, expected, torch.float16)


def test_public_api_triton_backend():
    x, w, b, signs, sc, ids = make_inputs(3, 24, 72, 3, 1, "col", torch.float16, seed=11)
    expected = ref.bitdelta_linear_ref(x, w, b, signs, sc, "col", ids)
    y = ops.bitdelta_linear(*_to(DEVICE, x, w, b, signs, sc), "col", ids.to(DEVICE), backend="triton")
    _check(y, expected, torch.float16)
    starts = torch.tensor([0, 1, 3], dtype=torch.int32)
    seg_ids = torch.tensor([2, -1], dtype=torch.int32)
    expected = ref.bitdelta_linear_segmented_ref(x, w, b, signs, sc, "col", starts, seg_ids)
    y = ops.bitdelta_linear_segmented(*_to(DEVICE, x, w, b, signs, sc), "col", starts.to(DEVICE),
                                      seg_ids.to(DEVICE), backend="triton")
    _check(y, expected, torch.float16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 16, 64])
def test_decode_cuda_graph_capture(t):
    x, w, b, signs, sc, ids = _to("cuda", *make_inputs(t, 512, 1024, 8, 1, "row", torch.float16, seed=t))
    y = ops.bitdelta_linear(x, w, b, signs, sc, "row", ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_g = ops.bitdelta_linear(x, w, b, signs, sc, "row", ids)
    ids.copy_(ids.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    _check(y_g, ref.bitdelta_linear_ref(x, w, b, signs, sc, "row", ids), torch.float16)
    assert not torch.equal(y, y_g) or t == 1


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
def test_expand_delta_matches_reference(mode, bits):
    n, k = 37, 200  # N and K not multiples of the 32 x 256 tile
    x, w, b, signs, sc, _ = make_inputs(1, n, k, 3, bits, mode, torch.float32, seed=bits)
    want = w + ref.delta_dense(signs[2], sc[2], mode, k, dtype=torch.float32)
    got = triton_ops.expand_delta(*_to(DEVICE, w, signs[2], sc[2]), mode)
    _check(got, want, torch.float32)


@pytest.mark.parametrize("expand_min", [0, 3, 512])
def test_segmented_with_host_table_matches_reference(expand_min, monkeypatch):
    """With the segments given as host lists the op reads nothing back from the device (no
    ``tolist``) and gives the reference's result, for every split between the fused GEMM and the
    expanded path; with no config and short segments it runs the short-segment tiles."""
    starts_l, ids_l = [0, 20, 20, 23, 24, 37], [1, 0, -1, 2, 0]
    starts, seg_ids = torch.tensor(starts_l, dtype=torch.int32), torch.tensor(ids_l, dtype=torch.int32)
    x, w, b, signs, sc, _ = make_inputs(37, 40, 96, 3, 1, "row", torch.float32, seed=5)
    expected = ref.bitdelta_linear_segmented_ref(x, w, b, signs, sc, "row", starts, seg_ids)
    args = (*_to(DEVICE, x, w, b, signs, sc), "row", starts.to(DEVICE), seg_ids.to(DEVICE))

    def no_host_read(self):
        raise AssertionError("the segmented op read a device tensor back with a host table given")

    monkeypatch.setattr(torch.Tensor, "tolist", no_host_read)
    table = ops.SegmentTable(starts_l, ids_l)
    cfg = None if expand_min == 512 else {**SMALL_SEG, "EXPAND_MIN": expand_min}
    y = triton_ops.bitdelta_segmented(*args, config=cfg, table=table)
    _check(y, expected, torch.float32)
    if cfg is None:  # every segment is short: the short tiles' block map was built
        assert (triton_ops.DEFAULT_CONFIGS["segmented_short"]["BM"], 512, str(y.device)) in table._blocks
    y = ops.bitdelta_linear_segmented(*args, backend="triton", table=table)
    _check(y, expected, torch.float32)


def test_segmented_refuses_a_table_of_other_segments():
    x, w, b, signs, sc, _ = make_inputs(10, 24, 16, 2, 1, "scalar", torch.float32)
    starts, seg_ids = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="covers 9 rows"):
        triton_ops.bitdelta_segmented(*_to(DEVICE, x, w, b, signs, sc), "scalar", starts.to(DEVICE),
                                      seg_ids.to(DEVICE), table=ops.SegmentTable([0, 4, 9], [0, 1]))
