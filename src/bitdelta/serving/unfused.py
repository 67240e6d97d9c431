"""Reference-style unfused multi-tenant linear: the baseline mode the serving benchmark compares to.

The original BitDelta code serves several deltas as ``x @ W + coeff * binary_bmm(x, mask)``: one
base GEMM, then a separate binary matmul per delta, a scale, and an add. This module reimplements
that description for the engine's slot pools, so the same engine can run it: one base GEMM over
every token of the step, then for each tenant present its sign planes expanded to a dense ±1
matrix in the activation dtype (a byte -> 8 values lookup), a matmul with that tenant's tokens, the
scale and an add. Each step therefore reads the base once plus, per tenant, its bits and a dense
±1 copy written and read again: the cost the fused kernels of :mod:`bitdelta.ops` avoid.
Semantics equal :func:`bitdelta.ops.bitdelta_linear_ref` (row and col tables of the pools; scalar
scales arrive broadcast into the row table); bias is added by the caller, as for the fused op.

    slots = DeltaSlots(model, max_gpu_deltas=8, linear_fn=unfused_linear)   # engine baseline mode
    y = unfused_multi_tenant(x, w, signs, row, col, col_slots, groups)     # the op itself
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

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


def tenant_groups(batch) -> list[tuple[int, slice | torch.Tensor]]:
    """Per tenant present in the step (delta slot >= 0): its token rows, a slice when contiguous.

    Built from host values once per step and kept in ``batch.cache``.
    """
    got = batch.cache.get("tenant_groups")
    if got is not None:
        return got
    rows: dict[int, list[int]] = {}
    at = 0
    for (_, _, n), slot in zip(batch.seqs, batch.seq_slots):
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
    k = x.shape[1]
    for slot, rows in groups:
        xd = x[rows]
        acc = None
        for p in range(signs.shape[1]):
            s = expand_signs(signs[slot, p], k, x.dtype)
            if slot in col_slots:  # Δ̂[:, j] = c_j S[:, j]: scale the inputs, then the binary matmul
                part = ((xd.float() * col[slot, p]).to(x.dtype) @ s.T).float()
            else:  # row (and scalar): binary matmul, then scale each output row
                part = (xd @ s.T).float() * row[slot, p]
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
