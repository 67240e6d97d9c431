import pytest
import torch

from bitdelta.pack import pack_signs, packed_width, unpack_bits, unpack_signs


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (2, 9), (4, 3, 17), (1, 1000), (7, 4097)])
def test_round_trip_is_bit_exact(shape):
    g = torch.Generator().manual_seed(sum(shape))
    positive = torch.rand(shape, generator=g) > 0.5
    packed = pack_signs(positive)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_width(shape[-1]))
    assert torch.equal(unpack_bits(packed, shape[-1]), positive)
    signs = unpack_signs(packed, shape[-1])
    assert torch.equal(signs, positive.float() * 2 - 1)


def test_bit_layout_is_little_endian_along_columns():
    # column 8b + j is bit j of byte b; bit 1 means +1
    positive = torch.zeros(1, 16, dtype=torch.bool)
    positive[0, 0] = True  # byte 0, bit 0 -> 0x01
    positive[0, 7] = True  # byte 0, bit 7 -> 0x80
    positive[0, 10] = True  # byte 1, bit 2 -> 0x04
    assert pack_signs(positive).tolist() == [[0x81, 0x04]]


def test_padding_bits_are_zero_and_dropped():
    positive = torch.ones(2, 11, dtype=torch.bool)
    packed = pack_signs(positive)
    assert packed[:, 1].tolist() == [0b111, 0b111]
    assert unpack_signs(packed, 11).shape == (2, 11)


def test_sign_of_zero_is_minus_one():
    delta = torch.tensor([[0.0, -0.0, 1e-30, -1e-30, 2.0, -2.0, 0.0, 0.0]])
    s = unpack_signs(pack_signs(delta > 0), 8)
    assert s.tolist() == [[-1, -1, 1, -1, 1, -1, -1, -1]]


def test_unpack_rejects_wrong_width():
    with pytest.raises(ValueError, match="columns need"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 30)
