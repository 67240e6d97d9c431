import pytest
import torch

from bitdelta.binarize import binarize, reconstruct


def _delta(out=13, inp=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows and columns of different magnitude so row/col scales matter
    return torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * torch.rand(1, inp, generator=g)


def test_scalar_scale_is_mean_abs_and_signs_match():
    d = _delta()
    sign, scale = binarize(d, "scalar")
    assert sign.shape == (1, 13, 3) and scale.shape == (1,)
    assert torch.allclose(scale[0], d.abs().mean())
    approx = reconstruct(sign, scale, 21, "scalar")
    assert torch.equal(torch.sign(approx), torch.where(d > 0, 1.0, -1.0))


def test_row_and_col_scales_initialise_to_axis_means():
    d = _delta()
    _, row = binarize(d, "row")
    _, col = binarize(d, "col")
    assert torch.allclose(row[0], d.abs().mean(dim=1))
    assert torch.allclose(col[0], d.abs().mean(dim=0))
    for mode, s in (("row", row), ("col", col)):
        sign, _ = binarize(d, mode)
        approx = reconstruct(sign, s, 21, mode)
        ref = (s[0][:, None] if mode == "row" else s[0][None, :]) * torch.where(d > 0, 1.0, -1.0)
        assert torch.allclose(approx, ref)


@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
def test_more_bits_reduce_error_and_follow_residual_recursion(mode):
    d = _delta(seed=3)
    errors = []
    for bits in (1, 2, 3):
        sign, scale = binarize(d, mode, bits)
        assert sign.shape[0] == bits == scale.shape[0]
        errors.append((reconstruct(sign, scale, 21, mode) - d).norm().item())
    assert errors[0] > errors[1] > errors[2]
    # plane 2 is the 1-bit compression of the residual after plane 1
    sign2, scale2 = binarize(d, mode, 2)
    first = reconstruct(sign2[:1], scale2[:1], 21, mode)
    s_res, c_res = binarize(d - first, mode, 1)
    assert torch.equal(s_res[0], sign2[1]) and torch.allclose(c_res[0], scale2[1])


def test_zero_delta_reconstructs_to_zero():
    sign, scale = binarize(torch.zeros(4, 16), "row", 2)
    assert torch.equal(reconstruct(sign, scale, 16, "row"), torch.zeros(4, 16))


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale mode"):
        binarize(torch.ones(2, 8), "diag")
    with pytest.raises(ValueError, match="bits"):
        binarize(torch.ones(2, 8), "row", 0)
