"""Bit-plane arithmetic for the delta product: the exact algorithm of the binary tensor-core decode
kernel (:mod:`bitdelta.ops.cuda_popc`), in plain PyTorch, as its CPU spec and test oracle.

The sign plane ``S`` (±1) is stored as bits ``B`` (1 = +1), so ``S = 2B − 1`` and
``S·x = 2·(B·x) − Σx``. For the delta term only, each token's input ``x`` (times the column
scales in ``col`` mode) is quantised to int8 in groups of :data:`GROUP` columns, one scale per
group (``q = max|x_group| / 127``, round half to even), and the integers are split into their 8
two's-complement bit planes ``P_b``. Then ``B·x_int = Σ_b w_b · popc(B AND P_b)`` with
``w_b = 2^b`` (``w_7 = −128``): on the GPU one ``mma ... b1.b1 ... and.popc`` instruction does
the AND and popcount of 16 sign rows × 256 columns against the 8 planes of one token, so the
delta product costs no arithmetic per weight on the CUDA cores. Per token ``t`` and output row ``n``:

    Δ̂x[t, n] = Σ_p s_p[n] · Σ_g q_g · (2 · Σ_b w_b · popc_g(B_p[n] AND P_{g,b}) − Σ_{k∈g} x_int[k])

with ``s_p`` the row or scalar scale of plane ``p`` (1 in ``col`` mode, where the column scales
were folded into ``x`` before quantisation). This equals the reference op applied to the
dequantised input ``x̂ = q · x_int``, so the only added error is that of ``x̂``:
``|Δ̂x − Δ̂x̂| ≤ Σ_p |s_p[n]| · Σ_k |x_k − x̂_k|`` with ``|x_k − x̂_k| ≤ q_g / 2 = max|x_g| / 254``
(elementwise, exact); for inputs without structure the error of the delta term is about
``max|x_g| / (127·√12) / rms(x)`` of it (0.5–1% for Gaussian x), and the delta term is itself a
few percent of the layer output. :func:`quantize_groups` is the quantiser both sides use.

    y = bitdelta_linear_bitplane(x, w, b, signs, scales, "row", ids)   # the whole op, x.dtype
    d = delta_bitplane(x, signs, scales, "col", ids)                   # the delta term, fp32 [T, N]
    xq = dequantized_input(x, signs, scales, "col", ids)               # x̂ per delta plane
"""

from __future__ import annotations

import torch

from bitdelta.ops.reference import check_inputs

GROUP = 512  # columns per quantisation group: two 256-column binary MMAs
XBITS = 8  # int8 planes; the top plane weighs -128 (two's complement)
QMAX = 127


def plane_weights(dtype=torch.float64) -> torch.Tensor:
    """``w_b`` for the 8 bit planes of an int8: 1, 2, ..., 64, -128."""
    w = torch.tensor([float(1 << b) for b in range(XBITS)], dtype=dtype)
    w[-1] = -w[-1]
    return w


def quantize_groups(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of ``x [..., K]`` (float32) in groups of ``group`` columns.

    Returns ``x_int [..., G*group]`` int32 in [-127, 127] (zero-padded past K) and ``q [..., G]``
    float32, ``q = max|x_g| / 127``. The float32 operations (``inv = 127 / max``, ``rint(x * inv)``)
    are the ones the CUDA kernel does, so both sides round identically.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"quantize_groups takes float32 x (got {x.dtype}); upcast first")
    *lead, k = x.shape
    g = -(-k // group)
    xp = torch.nn.functional.pad(x, (0, g * group - k)).reshape(*lead, g, group)
    amax = xp.abs().amax(-1)  # [..., G]
    inv = torch.where(amax > 0, torch.tensor(float(QMAX)) / amax, torch.zeros_like(amax))
    x_int = torch.round(xp * inv[..., None]).to(torch.int32)  # round half to even, as __float2int_rn
    q = amax / QMAX
    return x_int.reshape(*lead, g * group), q


def bit_planes(x_int: torch.Tensor) -> torch.Tensor:
    """The 8 two's-complement bit planes of int8 values: ``[..., K]`` -> ``[..., 8, K]`` of 0/1 (int64)."""
    u = x_int.to(torch.int64) & 0xFF
    b = torch.arange(XBITS, dtype=torch.int64)
    return (u[..., None, :] >> b[:, None]) & 1


def _sign_bits(signs_p: torch.Tensor, k_pad: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] packed signs -> int64 [N, k_pad] of 0/1 (pad bits and past-K columns 0)."""
    j = torch.arange(8, dtype=torch.int64)
    bits = ((signs_p.to(torch.int64)[..., None] >> j) & 1).flatten(-2)
    return torch.nn.functional.pad(bits, (0, k_pad - bits.shape[-1]))


def _folded_input(x32: torch.Tensor, scales_d: torch.Tensor, mode: str, p: int) -> torch.Tensor:
    """The input the delta plane ``p`` multiplies: ``x`` itself, or ``x ⊙ c_p`` in ``col`` mode."""
    return x32 * scales_d[p].float() if mode == "col" else x32


def dequantized_input(x, signs, scales, mode, ids) -> torch.Tensor:
    """``x̂ [T, bits, K]`` float64: what each delta plane effectively multiplies (``q · x_int``; in
    ``col`` mode already including the column scale). Rows of ``ids == -1`` are zero."""
    t, k = x.shape
    bits = signs.shape[1]
    out = torch.zeros(t, bits, k, dtype=torch.float64)
    x32 = x.float().cpu()
    for i in range(t):
        d = int(ids[i])
        if d < 0:
            continue
        for p in range(bits):
            xi, q = quantize_groups(_folded_input(x32[i], scales[d].cpu(), mode, p))
            xh = xi.double().reshape(q.numel(), GROUP) * q.double()[:, None]
            out[i, p] = xh.flatten()[:k]
    return out


def delta_bitplane(x, signs, scales, mode, ids) -> torch.Tensor:
    """The delta term ``Δ̂_{ids[t]} x[t]`` by the bit-plane algorithm: float32 ``[T, N]``, on CPU.

    Integer parts (AND, popcount per group and plane) are exact; the group sums are combined in
    float64, as a float32 kernel does up to rounding.
    """
    t, k = x.shape
    n = signs.shape[2]
    bits = signs.shape[1]
    g = -(-k // GROUP)
    kp = g * GROUP
    w = plane_weights()
    x32 = x.float().cpu()
    signs, scales = signs.cpu(), scales.cpu().float()
    out = torch.zeros(t, n, dtype=torch.float64)
    ids_l = [int(v) for v in ids.tolist()]
    for d in sorted(set(ids_l)):
        if d < 0:
            continue
        rows = [i for i, v in enumerate(ids_l) if v == d]
        for p in range(bits):
            bmat = _sign_bits(signs[d, p], kp).reshape(n, g, GROUP).double()  # [N, G, 512]
            xin = _folded_input(x32[rows], scales[d], mode, p)  # [R, K]
            xi, q = quantize_groups(xin)  # [R, Kp], [R, G]
            planes = bit_planes(xi).reshape(len(rows), XBITS, g, GROUP).double()  # [R, 8, G, 512]
            pop = torch.einsum("ngk,rbgk->rnbg", bmat, planes)  # popc(B AND P_b) per group, exact
            bx = (pop * w[None, None, :, None]).sum(2)  # [R, N, G]: B · x_int per group
            sx = xi.reshape(len(rows), g, GROUP).sum(-1).double()  # [R, G]
            sx_term = 2 * bx - sx[:, None, :]  # S · x_int per group
            part = (sx_term * q.double()[:, None, :]).sum(-1)  # [R, N]
            if mode == "scalar":
                part = part * scales[d, p].double()
            elif mode == "row":
                part = part * scales[d, p].double()[None, :]
            out[rows] += part
    return out.float()


def bitdelta_linear_bitplane(x, weight, bias, signs, scales, mode, ids) -> torch.Tensor:
    """The whole op with the delta term by :func:`delta_bitplane`: ``[T, N]`` in ``x.dtype``.

    Semantics of :func:`bitdelta.ops.reference.bitdelta_linear_ref`, except that the delta term
    multiplies the group-quantised input (module docstring: error bound).
    """
    check_inputs(x, weight, bias, signs, scales, mode)
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    out = out + delta_bitplane(x, signs, scales, mode, ids).to(out.device)
    return out.to(x.dtype)
