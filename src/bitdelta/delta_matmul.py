"""Differentiable ``x Δ̂ᵀ`` for one packed delta, with memory-lean backward.

Forward: ``Σ_p  r_p ⊙ (x S_pᵀ)`` (row), ``α_p (x S_pᵀ)`` (scalar), ``(x ⊙ c_p) S_pᵀ`` (col), where
``S_p`` is unpacked from bits on the fly. Backward recomputes ``S_p`` from the bits instead of
saving dense matrices, so training scales costs activation memory only: what makes scale
distillation of a 7B model fit beside its teacher on one GPU. Gradients flow to the scales and to
``x`` (so to earlier layers), through the 1-bit path itself.

    y = delta_linear(x, packed.sign, scale_param, "row", in_features)   # [..., out], x's dtype
"""

from __future__ import annotations

import torch

from .pack import unpack_signs


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # CPU matmuls in half precision are slow and inexact; use float32 there.
    return x.dtype if x.is_cuda else torch.float32


class _DeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, sign, scale, mode, in_features):
        dtype = _compute_dtype(x2d)
        xc = x2d.to(dtype)
        out = None
        zs = []
        for p in range(sign.shape[0]):
            s = unpack_signs(sign[p], in_features, dtype)  # [out, in]
            if mode == "col":
                term = (xc * scale[p].to(dtype)) @ s.t()
            else:
                z = xc @ s.t()
                zs.append(z)
                term = z * scale[p].to(dtype)  # row: [out] broadcasts over tokens; scalar: 0-dim
            out = term if out is None else out + term
        ctx.mode, ctx.in_features = mode, in_features
        ctx.save_for_backward(x2d, sign, scale, *zs)
        return out.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, sign, scale, *zs = ctx.saved_tensors
        mode, k = ctx.mode, ctx.in_features
        dtype = _compute_dtype(x2d)
        g = grad_out.to(dtype)
        xc = x2d.to(dtype)
        grad_x = torch.zeros_like(xc) if ctx.needs_input_grad[0] else None
        grad_scale = torch.zeros_like(scale, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        for p in range(sign.shape[0]):
            s = unpack_signs(sign[p], k, dtype)
            sc = scale[p].to(dtype)
            if mode == "col":
                gs = g @ s  # [T, in]
                if grad_x is not None:
                    grad_x += gs * sc
                if grad_scale is not None:
                    grad_scale[p] = (gs * xc).sum(0).float()
            else:
                if grad_x is not None:
                    grad_x += (g * sc) @ s
                if grad_scale is not None:
                    gz = (g * zs[p]).float()
                    grad_scale[p] = gz.sum(0) if mode == "row" else gz.sum()
        grad_x = grad_x.to(x2d.dtype) if grad_x is not None else None
        return grad_x, None, grad_scale, None, None


def delta_linear(x: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor, mode: str, in_features: int) -> torch.Tensor:
    """``x Δ̂ᵀ``: x ``[..., in]``, sign uint8 ``[bits, out, ceil(in/8)]``, scale per mode -> ``[..., out]``."""
    lead = x.shape[:-1]
    y = _DeltaLinear.apply(x.reshape(-1, x.shape[-1]), sign, scale, mode, in_features)
    return y.reshape(*lead, y.shape[-1])
