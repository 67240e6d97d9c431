"""Canonical 1-bit sign packing: the on-disk and in-memory bit layout of every bitdelta sign plane.

Contract (design.md): signs are packed 8 per uint8 along the last axis (``in_features``),
little-endian inside each byte: bit ``j`` of byte ``b`` is column ``8*b + j``. Bit 1 means +1,
bit 0 means -1. When the number of columns is not a multiple of 8 the last byte is padded with
zero bits, which :func:`unpack_signs` drops again given the true column count.

    bits = pack_signs(delta > 0)               # [..., ceil(K/8)] uint8
    s = unpack_signs(bits, K, dtype=torch.float32)   # [..., K] of +1/-1
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)


def packed_width(num_columns: int) -> int:
    """Bytes per packed row for ``num_columns`` sign columns."""
    return (num_columns + 7) // 8


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """Packs a boolean "is +1" tensor along its last axis.

    Args:
        positive: ``[..., K]`` bool (True means +1). Any other dtype is read as ``> 0``.

    Returns:
        ``[..., ceil(K/8)]`` uint8, little-endian bit order.
    """
    if positive.dtype != torch.bool:
        positive = positive > 0
    *lead, k = positive.shape
    pad = (-k) % 8
    bits = positive.to(torch.uint8)
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*lead, (k + pad) // 8, 8)
    weights = _BIT_WEIGHTS.to(bits.device)
    # Sum of distinct powers of two never exceeds 255, so uint8 arithmetic is exact.
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


_BIT_WEIGHTS_BY_DEVICE: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    """The 8 bit masks on ``device``, copied there once: a copy per call would sync a GPU every
    forward and backward of every compressed module."""
    w = _BIT_WEIGHTS_BY_DEVICE.get(device)
    if w is None:
        w = _BIT_WEIGHTS_BY_DEVICE[device] = _BIT_WEIGHTS.to(device)
    return w


def unpack_bits(packed: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs` as booleans: ``[..., ceil(K/8)]`` uint8 -> ``[..., K]`` bool."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed signs must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_width(num_columns):
        raise ValueError(
            f"packed last dimension is {packed.shape[-1]} bytes but {num_columns} columns need "
            f"{packed_width(num_columns)}"
        )
    bits = (packed.unsqueeze(-1) & _bit_weights(packed.device)) != 0
    return bits.reshape(*packed.shape[:-1], -1)[..., :num_columns]


def unpack_signs(
    packed: torch.Tensor, num_columns: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unpacks to ``+1/-1`` values of ``dtype``: ``[..., ceil(K/8)]`` uint8 -> ``[..., K]``."""
    bits = unpack_bits(packed, num_columns)
    return bits.to(dtype) * 2 - 1
