"""The bit-plane algorithm (bitdelta.ops.bitplane), the spec of the binary tensor-core decode
kernel: exact against the reference op applied to its quantised input, and within the stated
quantisation bound of the reference op itself."""

import pytest
import torch
from _inputs import make_inputs

from bitdelta.ops import bitplane as bp
from bitdelta.ops import reference as ref
from bitdelta.pack import unpack_signs

SHAPES = [(24, 600), (40, 13), (17, 1100)]  # (N, K): K not a multiple of 512 (or 8), N odd


def test_quantize_groups_error_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1300, generator=g) * torch.tensor([1.0, 30.0, 1e-3])[:, None]
    x[1, 700] = 900.0  # an outlier only widens its own group's step
    x[2, 512:1024] = 0.0  # an all-zero group
    xi, q = bp.quantize_groups(x)
    assert xi.shape == (3, 3 * bp.GROUP) and q.shape == (3, 3)
    assert int(xi.abs().max()) <= bp.QMAX
    assert (xi[:, 1300:] == 0).all() and q[2, 1] == 0 and (xi[2, 512:1024] == 0).all()
    xh = (xi.reshape(3, 3, bp.GROUP).double() * q.double()[..., None]).reshape(3, -1)[:, :1300]
    step = q.repeat_interleave(bp.GROUP, dim=1)[:, :1300].double()
    assert ((xh - x.double()).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all()
    # the outlier's group is coarse, the other groups of that row keep their own fine step
    assert q[1, 1] > 5 * q[1, 0] and q[1, 1] > 5 * q[1, 2]


def test_bit_planes_rebuild_the_integers():
    xi = torch.arange(-127, 128, dtype=torch.int32)
    planes = bp.bit_planes(xi)
    assert planes.shape == (8, 255) and set(planes.unique().tolist()) <= {0, 1}
    back = (planes.double() * bp.plane_weights()[:, None]).sum(0)
    assert torch.equal(back.to(torch.int32), xi)


def _delta_of(xhat, signs, scales, mode, ids, n):
    """Reference delta term on given per-plane inputs x̂ [T, bits, K] (float64)."""
    t, bits, k = xhat.shape
    out = torch.zeros(t, n, dtype=torch.float64)
    for i in range(t):
        d = int(ids[i])
        if d < 0:
            continue
        s = unpack_signs(signs[d], k, dtype=torch.float64)  # [bits, N, K]
        for p in range(bits):
            part = s[p] @ xhat[i, p]
            if mode == "scalar":
                part = part * scales[d, p].double()
            elif mode == "row":
                part = part * scales[d, p].double()
            out[i] += part
    return out


@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bitplane_delta_is_the_reference_on_quantised_input(mode, bits, dtype):
    n, k = SHAPES[(bits + len(mode)) % 3]
    ids = torch.tensor([0, -1, 2, 0, 1, 2, -1])
    x, w, b, signs, sc, ids = make_inputs(7, n, k, 3, bits, mode, dtype, seed=bits + k, ids=ids)
    got = bp.delta_bitplane(x, signs, sc, mode, ids).double()
    xhat = bp.dequantized_input(x, signs, sc, mode, ids)
    want = _delta_of(xhat, signs, sc, mode, ids, n)
    assert (got[ids < 0] == 0).all()
    # integer popcounts are exact; only the float combination rounds (float32 output)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    # against the unquantised reference: within the elementwise bound sum_p |s_p| sum_k |x - x̂|
    exact = ref.bitdelta_linear_ref(x.float(), torch.zeros(n, k), None, signs, sc, mode, ids).double()
    xin = x.double()[:, None, :] * (sc.double()[ids.clamp_min(0)] if mode == "col" else 1.0)
    err_in = (xin - xhat).abs()  # [T, bits, K]
    s_abs = {"scalar": lambda d, p: sc[d, p].double().abs().expand(n), "row": lambda d, p: sc[d, p].double().abs(),
             "col": lambda d, p: torch.ones(n, dtype=torch.float64)}[mode]
    for i in range(7):
        d = int(ids[i])
        if d < 0:
            continue
        bound = sum(s_abs(d, p) * err_in[i, p].sum() for p in range(bits))
        assert ((got[i] - exact[i]).abs() <= bound * (1 + 1e-5) + 1e-6).all()
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.02, rel  # Gaussian x: about max|x_g| / (127 √12) / rms(x) of the delta term


@pytest.mark.parametrize("mode", ["row", "col"])
def test_bitplane_linear_matches_reference_op(mode):
    # The tolerance of the whole op: the delta term's quantisation error (under 2% of the delta
    # term for Gaussian x) plus the output dtype's rounding. These synthetic deltas are as large
    # as the base term; in real fine-tunes the delta term is a few percent of the output.
    x, w, b, signs, sc, ids = make_inputs(9, 40, 1100, 4, 2, mode, torch.float16, seed=5)
    y = bp.bitdelta_linear_bitplane(x, w, b, signs, sc, mode, ids)
    assert y.dtype == torch.float16 and y.shape == (9, 40)
    r = ref.bitdelta_linear_ref(x.float(), w.float(), b.float(), signs, sc, mode, ids)
    delta = r - ref.bitdelta_linear_ref(x.float(), w.float(), b.float(), signs, sc, mode, torch.full_like(ids, -1))
    err = (y.float() - r).norm()
    assert err <= 0.02 * delta.norm() + 1e-3 * r.norm(), (err, delta.norm())


def test_popc_kernel_unavailable_without_cuda(monkeypatch):
    from bitdelta.ops import cuda_popc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_popc.available() is False


def test_dispatch_rejects_unknown_decode_kernel(monkeypatch):
    import bitdelta.ops as ops

    monkeypatch.setenv("BITDELTA_DECODE_KERNEL", "fast")
    assert ops._use_popc(torch.zeros(1, 8), "auto") is False  # CPU tensors never take it
    with pytest.raises(ValueError, match="BITDELTA_DECODE_KERNEL"):
        ops._use_popc(_CudaLike(), "auto")


class _CudaLike:
    """Stands in for a CUDA fp16 decode batch (the dispatcher reads only these attributes)."""

    is_cuda = True
    shape = (4, 8)

    def __init__(self, dtype=torch.float16):
        self.dtype = dtype
        self.device = torch.device("cuda", 0)


@pytest.mark.parametrize("builds,cap,choice,backend,dtype,want", [
    (True, (9, 0), "auto", "auto", torch.float16, True),
    (True, (9, 0), "auto", "auto", torch.bfloat16, True),
    (True, (9, 0), "auto", "auto", torch.float32, False),  # fp32 stays exact (Triton)
    (True, (8, 0), "auto", "auto", torch.float16, False),  # measured on sm_90 only
    (True, (8, 0), "popc", "auto", torch.float16, True),
    (True, (9, 0), "triton", "auto", torch.float16, False),
    (True, (9, 0), "auto", "triton", torch.float16, False),
    (True, (9, 0), "auto", "torch", torch.float16, False),
    (False, (9, 0), "auto", "auto", torch.float16, False),
])
def test_dispatch_rule_for_the_popc_kernel(monkeypatch, builds, cap, choice, backend, dtype, want):
    import bitdelta.ops as ops
    from bitdelta.ops import cuda_popc

    monkeypatch.setattr(ops, "_POPC_OK", {})
    monkeypatch.setattr(cuda_popc, "available", lambda device=None: builds)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setenv("BITDELTA_DECODE_KERNEL", choice)
    monkeypatch.delenv("BITDELTA_BACKEND", raising=False)
    assert ops._use_popc(_CudaLike(dtype), backend) is want


def test_dispatch_popc_requested_but_unavailable_says_what_to_do(monkeypatch):
    import bitdelta.ops as ops
    from bitdelta.ops import cuda_popc

    monkeypatch.setattr(ops, "_POPC_OK", {})
    monkeypatch.setattr(cuda_popc, "available", lambda device=None: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("BITDELTA_DECODE_KERNEL", "popc")
    with pytest.raises(RuntimeError, match="unset it"):
        ops._use_popc(_CudaLike(), "auto")
