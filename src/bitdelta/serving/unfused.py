"""Reference-style unfused multi-tenant linear: the baseline mode the serving benchmark compares to.

The original BitDelta code serves several deltas as ``x @ W + coeff * binary_bmm(x, mask)``: one
base GEMM, then a separate binary matmul per delta, a scale, and an add. This module reimplements
that description for the engine's slot pools, so the same engine can run it: one base GEMM over
every token of the step, then for each tenant present, one binary matmul of its tokens with its
packed sign plane (on CUDA a Triton kernel that reads the packed bits, as the original's
``binary_bmm`` does; elsewhere the plane expanded to a dense ±1 matrix), the scale and an add, each
its own kernel. Each step therefore reads the base and every tenant's bits once, but pays one
launch chain and one partial pass over the output per tenant, with no overlap across tenants: the
cost the fused multi-tenant kernels of :mod:`bitdelta.ops` avoid.
Semantics equal :func:`bitdelta.ops.bitdelta_linear_ref` (row and col tables of the pools; scalar
scales arrive broadcast into the row table); bias is added by the caller, as for the fused op.

    slots = DeltaSlots(model, max_gpu_deltas=8, linear_fn=unfused_linear)   # engine baseline mode
    y = unfused_multi_tenant(x, w, signs, row, col, col_slots, groups)     # the op itself
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from bitdelta.ops import DECODE_MAX_TOKENS, triton_available

_LUTS: dict[tuple, torch.Tensor] = {}


def _lut(device, dtype) -> torch.Tensor:
    """``[256, 8]`` table: byte value -> its 8 signs (bit j = column j, 1 = +1), as in bitdelta.pack."""
    key = (str(device), dtype)
    if key not in _LUTS:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)[None, :]) & 1
        _LUTS[key] = (bits * 2 - 1).to(device=device, dtype=dtype)
    return _LUTS[key]


def expand_signs(packed: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """One sign plane ``[N, ceil(K/8)]`` uint8 -> dense ``[N, K]`` of ±1 in ``dtype``."""
    n = packed.shape[0]
    return F.embedding(packed.to(torch.int32), _lut(packed.device, dtype)).reshape(n, -1)[:, :k]


def binary_matmul(x: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
    """``x [t, K] @ S^T`` for one packed sign plane ``[N, ceil(K/8)]``, unscaled, as float32 ``[t, N]``.

    On CUDA (Triton installed, t within the decode kernel's limit) the bits are read packed by
    :func:`bitdelta.ops.triton_ops.decode_delta` with a unit scale; otherwise the plane is
    expanded to a dense ±1 matrix first.
    """
    if x.is_cuda and x.shape[0] <= DECODE_MAX_TOKENS and triton_available():
        from bitdelta.ops import triton_ops

        ones = _unit_scale(x.device)
        ids = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        return triton_ops.decode_delta(x, plane[None, None], ones, "scalar", ids)
    return (x @ expand_signs(plane, x.shape[1], x.dtype).T).float()


_UNIT: dict[str, torch.Tensor] = {}


def _unit_scale(device) -> torch.Tensor:
    key = str(device)
    if key not in _UNIT:
        _UNIT[key] = torch.ones((1, 1), dtype=torch.float32, device=device)
    return _UNIT[key]


def tenant_groups(batch) -> list[tuple[int, slice | torch.Tensor]]:
    """Per tenant present in the step (delta slot >= 0): its token rows, a slice when contiguous.

    Built from host values once per step and kept in ``batch.cache``.
    """
    got = batch.cache.get("tenant_groups")
    if got is not None:
        return got
    rows: dict[int, list[int]] = {}
    at = 0
    for (_, _, n), slot in zip(batch.seqs, batch.seq_delta_slots):
        if slot >= 0:
            rows.setdefault(slot, []).extend(range(at, at + n))
        at += n
    groups = []
    for slot, r in rows.items():
        if r == list(range(r[0], r[0] + len(r))):
            groups.append((slot, slice(r[0], r[0] + len(r))))
        else:
            groups.append((slot, torch.tensor(r, dtype=torch.long, device=batch.tokens.device)))
    batch.cache["tenant_groups"] = groups
    return groups


def unfused_multi_tenant(
    x: torch.Tensor,  # [T, K]
    w: torch.Tensor,  # [N, K]
    signs: torch.Tensor,  # [D, bits, N, ceil(K/8)] uint8
    row: torch.Tensor,  # [D, bits, N] float32 row scales (scalar scales broadcast here)
    col: torch.Tensor,  # [D, bits, K] float32 column scales
    col_slots,  # set of slots whose scales are in ``col``
    groups: list[tuple[int, slice | torch.Tensor]],  # (slot, token rows) per tenant present
) -> torch.Tensor:
    """Base GEMM + per tenant (binary matmul, scale, add); returns ``[T, N]`` in ``x.dtype``."""
    y = F.linear(x, w)
    for slot, rows in groups:
        xd = x[rows]
        acc = None
        for p in range(signs.shape[1]):
            if slot in col_slots:  # Δ̂[:, j] = c_j S[:, j]: scale the inputs, then the binary matmul
                part = binary_matmul((xd.float() * col[slot, p]).to(x.dtype), signs[slot, p])
            else:  # row (and scalar): binary matmul, then scale each output row
                part = binary_matmul(xd, signs[slot, p]) * row[slot, p]
            acc = part if acc is None else acc + part
        if isinstance(rows, slice):
            y[rows] += acc.to(y.dtype)
        else:
            y.index_add_(0, rows, acc.to(y.dtype))
    return y


def unfused_linear(name: str, x: torch.Tensor, w: torch.Tensor, pool: dict, batch) -> torch.Tensor:
    """``DeltaSlots(linear_fn=...)`` hook: the unfused path over one module's slot pool."""
    return unfused_multi_tenant(x, w, pool["signs"], pool["row"], pool["col"], pool["col_slots"],
                                tenant_groups(batch))
