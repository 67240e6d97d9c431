"""Per-token (row-wise) e4m3 quantization of a step's activations, for the FP8 GEMMs of a quantized base.

``x [M, K]`` becomes ``x_fp8 [M_pad, K]`` and ``scale [M_pad, 1]`` (float32) with ``x ≈ x_fp8 · scale``
row by row, ``scale = amax(|row|) / 448`` (a tiny scale for an all-zero row); rows ``M..M_pad`` are
zeros, the padding cuBLASLt's FP8 GEMMs want (dimensions in multiples of 16). On a GPU with Triton
one kernel does it (a row per program: its absolute maximum, then the scaled, saturated e4m3
values); elsewhere the same arithmetic runs as PyTorch operations (:func:`quantize_rows_torch`, also
the reference: the kernel's division may round differently in the last bit, so a value can land one
e4m3 step away). Neither syncs with the host, so both can be captured in a CUDA graph.

The projections that read the same input (queries, keys and values; the MLP's gate and up) share one
quantization: the last input quantized is remembered (by identity and version) until the next.

    x8, scale = quantize_rows(x, m_pad=16)      # float8_e4m3fn [16, K], float32 [16, 1]
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

FP8_MAX = 448.0  # e4m3fn's largest finite value
MIN_SCALE = 1e-12  # an all-zero row: zeros, not a division by zero
_BLOCK_K = 1024
_LAST: list = [None]  # (input, its version, M_pad, x_fp8, scale) of the last quantization


def quantize_rows_torch(x: torch.Tensor, m_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantization in PyTorch operations (any device; the reference of the kernel)."""
    if m_pad > x.shape[0]:
        x = F.pad(x, (0, 0, 0, m_pad - x.shape[0]))
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_(min=MIN_SCALE)
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


_KERNEL = None


def _kernel():
    """The Triton kernel, compiled on first use (None where Triton does not import)."""
    global _KERNEL
    if _KERNEL is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _KERNEL = False
            return None

        @triton.jit
        def rows_to_fp8(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q, BLOCK_K: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            live = row < M  # rows past M are padding: they read nothing and write zeros
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                v = tl.load(x_ptr + row * stride_x + offs, mask=(offs < K) & live, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
            tl.store(s_ptr + row, scale)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                v = tl.load(x_ptr + row * stride_x + offs, mask=(offs < K) & live, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(v / scale, -448.0), 448.0)
                tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=offs < K)

        _KERNEL = rows_to_fp8
    return _KERNEL or None


def quantize_rows_kernel(x: torch.Tensor, m_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantization by the Triton kernel (CUDA tensors; raises where Triton is missing)."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the FP8 row-quantization kernel needs Triton")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m_pad, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m_pad, 1), dtype=torch.float32, device=x.device)
    kernel[(m_pad,)](x, q, scale, m, k, x.stride(0), q.stride(0), BLOCK_K=_BLOCK_K, num_warps=4)
    return q, scale


def quantize_rows(x: torch.Tensor, m_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` as e4m3 rows padded to ``m_pad`` and their float32 scales (module docstring)."""
    last = _LAST[0]
    if last is not None and last[0] is x and last[1] == x._version and last[2] == m_pad:
        return last[3], last[4]
    if x.is_cuda and _kernel() is not None:
        x8, scale = quantize_rows_kernel(x, m_pad)
    else:
        x8, scale = quantize_rows_torch(x, m_pad)
    _LAST[0] = (x, x._version, m_pad, x8, scale)
    return x8, scale


def forget() -> None:
    """Drops the remembered quantization (and the tensors it holds)."""
    _LAST[0] = None
