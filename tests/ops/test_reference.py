"""Reference op vs a float64 dense computation; dispatcher, custom-op registration and fake impls."""

import pytest
import torch
from _inputs import make_inputs

import bitdelta.ops as ops
from bitdelta.ops import reference as ref


@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,n,k", [(5, 24, 72), (17, 40, 200), (1, 8, 13)])
def test_reference_matches_dense64(mode, bits, dtype, t, n, k):
    x, w, b, signs, sc, ids = make_inputs(t, n, k, 3, bits, mode, dtype, seed=t + n + k)
    y = ref.bitdelta_linear_ref(x, w, b, signs, sc, mode, ids)
    y64 = ref.bitdelta_linear_dense64(x, w, b, signs, sc, mode, ids)
    assert y.dtype == dtype and y.shape == (t, n)
    err = (y.double() - y64).norm() / y64.norm()
    assert err < {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


def test_reference_base_only_is_exact_base():
    x, w, b, signs, sc, _ = make_inputs(6, 24, 72, 2, 1, "row", torch.float32)
    ids = torch.full((6,), -1, dtype=torch.int32)
    y = ref.bitdelta_linear_ref(x, w, b, signs, sc, "row", ids)
    torch.testing.assert_close(y, x @ w.T + b, rtol=0, atol=1e-6)


def test_reference_delta_term_matches_dense_delta():
    # A tenant with delta and without bias: y - base == Δ̂ x exactly as delta_dense says.
    x, w, b, signs, sc, _ = make_inputs(4, 16, 40, 2, 2, "col", torch.float32, bias=False)
    ids = torch.tensor([1, 1, 0, -1], dtype=torch.int32)
    y = ref.bitdelta_linear_ref(x, w, None, signs, sc, "col", ids)
    dense1 = ref.delta_dense(signs[1], sc[1], "col", 40)
    torch.testing.assert_close(y[0], x[0] @ (w + dense1).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[3], x[3] @ w.T, rtol=1e-5, atol=1e-5)


def test_segmented_reference_equals_ids_form():
    x, w, b, signs, sc, _ = make_inputs(9, 24, 16, 3, 1, "scalar", torch.float32)
    starts = torch.tensor([0, 4, 4, 7, 9], dtype=torch.int32)
    seg_ids = torch.tensor([2, 0, -1, 1], dtype=torch.int32)
    ids = torch.tensor([2] * 4 + [-1] * 3 + [1] * 2, dtype=torch.int32)
    torch.testing.assert_close(
        ref.bitdelta_linear_segmented_ref(x, w, b, signs, sc, "scalar", starts, seg_ids),
        ref.bitdelta_linear_ref(x, w, b, signs, sc, "scalar", ids),
    )


def test_input_validation_messages():
    x, w, b, signs, sc, ids = make_inputs(3, 24, 16, 2, 1, "row", torch.float32)
    with pytest.raises(ValueError, match="mode"):
        ops.bitdelta_linear(x, w, b, signs, sc, "rows", ids)
    with pytest.raises(ValueError, match="scales"):
        ops.bitdelta_linear(x, w, b, signs, sc[:, :, :3], "row", ids)
    with pytest.raises(ValueError, match="ids"):
        ops.bitdelta_linear(x, w, b, signs, sc, "row", ids[:2])
    with pytest.raises(ValueError, match="backend"):
        ops.bitdelta_linear(x, w, b, signs, sc, "row", ids, backend="cuda")


def test_backend_resolution(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.delenv("BITDELTA_BACKEND", raising=False)
    assert ops.resolve_backend("auto", x) is ops.Backend.TORCH  # CPU tensor
    assert ops.resolve_backend(ops.Backend.TORCH, x) is ops.Backend.TORCH
    monkeypatch.setenv("BITDELTA_BACKEND", "torch")
    assert ops.resolve_backend("triton", x) is ops.Backend.TORCH  # env overrides the argument


def test_public_op_cpu_matches_reference_and_is_registered():
    x, w, b, signs, sc, ids = make_inputs(5, 24, 72, 3, 2, "row", torch.float16)
    y = ops.bitdelta_linear(x, w, b, signs, sc, "row", ids, backend="torch")
    torch.testing.assert_close(y, ref.bitdelta_linear_ref(x, w, b, signs, sc, "row", ids))
    assert ops.CUSTOM_OPS and hasattr(torch.ops.bitdelta, "linear")
    assert hasattr(torch.ops.bitdelta, "linear_segmented")


def test_fake_impl_traces_under_torch_compile():
    x, w, b, signs, sc, ids = make_inputs(5, 24, 72, 3, 1, "scalar", torch.float32)
    starts = torch.tensor([0, 2, 5], dtype=torch.int32)
    seg_ids = torch.tensor([1, -1], dtype=torch.int32)

    def f(x):
        y = ops.bitdelta_linear(x, w, b, signs, sc, "scalar", ids, backend="torch")
        return y + ops.bitdelta_linear_segmented(x, w, b, signs, sc, "scalar", starts, seg_ids, backend="torch")

    expected = f(x)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, expected)
