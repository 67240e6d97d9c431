"""Shared random inputs for the ops tests (never zeros, small odd shapes)."""

from __future__ import annotations

import torch

from bitdelta.pack import pack_signs

# (rtol, atol) per dtype for kernel-vs-reference comparisons (outputs are O(1)).
TOLERANCES = {torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 2e-2), torch.float32: (1e-5, 1e-5)}


def scale_shape(mode: str, d: int, bits: int, n: int, k: int) -> tuple[int, ...]:
    return {"scalar": (d, bits), "row": (d, bits, n), "col": (d, bits, k)}[mode]


def make_inputs(t, n, k, d, bits, mode, dtype, seed=0, ids=None, bias=True):
    """x [T, K], weight [N, K], bias [N], signs [D, bits, N, K/8], scales, ids [T] (-1 allowed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    signs = pack_signs(torch.rand(d, bits, n, k, generator=g) > 0.5)
    # Residual planes shrink like real ones; scales are positive and clearly non-zero.
    sc = (torch.rand(scale_shape(mode, d, bits, n, k), generator=g) + 0.5) * (2.0 / k**0.5)
    if bits > 1:
        sc = sc * torch.tensor([0.5**p for p in range(bits)]).view(1, bits, *([1] * (sc.dim() - 2)))
    if ids is None:
        ids = torch.randint(-1, d, (t,), generator=g)
    ids = torch.as_tensor(ids, dtype=torch.int32)
    return x, w, b, signs, sc.float(), ids
