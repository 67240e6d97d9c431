import pytest
import torch

from bitdelta.binarize import binarize, reconstruct
from bitdelta.delta_matmul import delta_linear


@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
@pytest.mark.parametrize("bits", [1, 2])
def test_forward_and_gradients_match_dense_float64(mode, bits):
    g = torch.Generator().manual_seed(bits)
    out_f, in_f = 11, 21
    sign, scale = binarize(torch.randn(out_f, in_f, generator=g), mode, bits)
    x = torch.randn(2, 5, in_f, generator=g, dtype=torch.float64).float().requires_grad_()
    s = scale.clone().requires_grad_()
    y = delta_linear(x, sign, s, mode, in_f)
    grad_out = torch.randn(y.shape, generator=g)
    (y * grad_out).sum().backward()

    x64 = x.detach().double().requires_grad_()
    s64 = scale.double().requires_grad_()
    dense = sum((s64[p][:, None] if mode == "row" else s64[p][None, :] if mode == "col" else s64[p])
                * reconstruct(sign[p:p + 1], torch.ones_like(scale[p:p + 1]), in_f, mode).double() for p in range(bits))
    y64 = x64 @ dense.t()
    (y64 * grad_out.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-5)
