"""Reference (pure PyTorch) multi-tenant BitDelta linear: the spec of every kernel, and the CPU path.

Contract: given a base linear ``W [N, K]`` (+ optional bias) and ``D`` stacked 1-bit deltas
(``signs [D, bits, N, ceil(K/8)]`` uint8 in the layout of :mod:`bitdelta.pack`, ``scales`` of the
module's mode), every token ``t`` gets ``y[t] = x[t] W^T + b + Δ̂_{ids[t]} x[t]`` (no delta term
when ``ids[t] == -1``). Accumulation is float32; the output has ``x``'s dtype.

    y = bitdelta_linear_ref(x, w, b, signs, scales, "row", ids)          # [T, N]
    y = bitdelta_linear_segmented_ref(x, w, b, signs, scales, "col", starts, seg_ids)
    y64 = bitdelta_linear_dense64(x, w, b, signs, scales, "scalar", ids)  # float64, for tests
"""

from __future__ import annotations

import torch

from bitdelta.pack import unpack_signs
from bitdelta.scale_modes import MATRIX_MODES, scale_shape

MODES = tuple(m.value for m in MATRIX_MODES)


def check_inputs(x, weight, bias, signs, scales, mode) -> None:
    """Validates shapes/dtypes shared by every backend; raises ``ValueError`` with what to fix."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [T, K] and weight [N, K] (got {tuple(x.shape)}, {tuple(weight.shape)})")
    if x.dtype != weight.dtype:
        raise ValueError(f"x and weight must share a dtype (got {x.dtype}, {weight.dtype})")
    n, k = weight.shape
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}] (got {tuple(bias.shape)})")
    if signs.dtype != torch.uint8 or signs.dim() != 4:
        raise ValueError(f"signs must be uint8 [D, bits, N, ceil(K/8)] (got {signs.dtype} {tuple(signs.shape)})")
    d, bits = signs.shape[:2]
    if signs.shape[2:] != (n, (k + 7) // 8):
        raise ValueError(f"signs must be [D, bits, {n}, {(k + 7) // 8}] for a {n}x{k} weight "
                         f"(got {tuple(signs.shape)})")
    want = (d, *scale_shape(mode, n, k, bits))
    if tuple(scales.shape) != want:
        raise ValueError(f"scales for mode {mode!r} must be {list(want)} (got {list(scales.shape)})")


def delta_dense(signs_d: torch.Tensor, scales_d: torch.Tensor, mode: str, k: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One tenant's dense delta ``Σ_p scale_p ⊙ S_p``: signs_d [bits, N, ceil(K/8)] -> [N, K]."""
    s = unpack_signs(signs_d, k, dtype=torch.float32)  # [bits, N, K]
    sc = scales_d.float()
    if mode == "scalar":
        s = s * sc[:, None, None]
    elif mode == "row":
        s = s * sc[:, :, None]
    else:
        s = s * sc[:, None, :]
    return s.sum(0).to(dtype)


def bitdelta_linear_ref(
    x: torch.Tensor,  # [T, K] fp16/bf16/fp32
    weight: torch.Tensor,  # [N, K], x's dtype
    bias: torch.Tensor | None,  # [N] or None
    signs: torch.Tensor,  # [D, bits, N, ceil(K/8)] uint8
    scales: torch.Tensor,  # [D, bits] | [D, bits, N] | [D, bits, K] float32
    mode: str,  # "scalar" | "row" | "col"
    ids: torch.Tensor,  # [T] int, -1 = base only
) -> torch.Tensor:
    """Multi-tenant BitDelta linear, unpack + per-tenant gather + matmul.

    Semantics:
        Δ̂_d = Σ_p scale[d, p] ⊙ S[d, p] with S = ±1 from the packed bits (scalar: one number;
        row: Δ̂[i, :] = r_i S[i, :]; col: Δ̂[:, j] = c_j S[:, j]).
        y[t] = x[t] @ W^T + b + x[t] @ Δ̂_{ids[t]}^T, and y[t] = x[t] @ W^T + b when ids[t] == -1.
        float32 accumulation, output in x.dtype.

    Returns:
        ``[T, N]`` in ``x.dtype``.
    """
    check_inputs(x, weight, bias, signs, scales, mode)
    k = x.shape[1]
    xf = x.float()
    out = xf @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    ids = ids.to(torch.long)
    for d in torch.unique(ids).tolist():  # host sync: the reference is not for CUDA graphs
        if d < 0:
            continue
        rows = ids == d
        out[rows] += xf[rows] @ delta_dense(signs[d], scales[d], mode, k).T
    return out.to(x.dtype)


def segments_to_ids(seg_starts: torch.Tensor, seg_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-token tenant ids ``[T]`` from a segment table (rows outside every segment get -1)."""
    starts = seg_starts.to(torch.long).cpu()
    sids = seg_ids.to(torch.long).cpu()
    ids = torch.full((num_tokens,), -1, dtype=torch.long)
    for s in range(sids.numel()):
        ids[starts[s]:starts[s + 1]] = sids[s]
    return ids.to(seg_ids.device)


def bitdelta_linear_segmented_ref(x, weight, bias, signs, scales, mode, seg_starts, seg_ids):
    """Segmented form: rows ``seg_starts[s]:seg_starts[s+1]`` use tenant ``seg_ids[s]`` (-1 = base).

    Semantics: identical to :func:`bitdelta_linear_ref` with ``ids`` expanded from the segments;
    rows not covered by any segment get the base output.
    """
    ids = segments_to_ids(seg_starts, seg_ids, x.shape[0])
    return bitdelta_linear_ref(x, weight, bias, signs, scales, mode, ids)


def bitdelta_linear_dense64(x, weight, bias, signs, scales, mode, ids) -> torch.Tensor:
    """Float64 per-token computation with its own bit unpacking (test oracle). Returns float64 [T, N]."""
    t, k = x.shape
    j = torch.arange(8, dtype=torch.int64)
    bits = (signs.to(torch.int64)[..., None] >> j) & 1  # [D, bits, N, KB, 8]
    s = (bits * 2 - 1).to(torch.float64).flatten(-2)[..., :k]  # [D, bits, N, K]
    sc = scales.to(torch.float64)
    if mode == "scalar":
        dense = (s * sc[:, :, None, None]).sum(1)
    elif mode == "row":
        dense = (s * sc[:, :, :, None]).sum(1)
    else:
        dense = (s * sc[:, :, None, :]).sum(1)
    x64, w64 = x.to(torch.float64), weight.to(torch.float64)
    out = x64 @ w64.T
    if bias is not None:
        out = out + bias.to(torch.float64)
    for i in range(t):
        d = int(ids[i])
        if d >= 0:
            out[i] += dense[d] @ x64[i]
    return out
