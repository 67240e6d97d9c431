"""The fused base ops' spec in plain PyTorch: exactly what the unfused serving path computes, op by op.

These are the eager ops of :mod:`bitdelta.serving.models.common` (``TenantNorm``, ``apply_rope``,
the MLP's ``act(gate) * up``, the paged-cache ``index_copy_``) written as functions of tensors, so
that each Triton kernel of :mod:`bitdelta.ops.fused_norm` is checked against the computation it
replaces. Shapes: ``x, residual [T, D]``; norm weight ``[D]`` (the base's) or ``[T, D]`` (per token);
``q [T, H, D]``, ``k, v [T, KV, D]``; ``cos, sin [T, 1, R]`` with ``R <= D`` rotary dims (``sin``
signed, as ``rope_tables`` makes it); caches ``[blocks, block_size, KV, D]``; ``kv_index [T]``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim: Llama ``w * rms_norm(x.float()).to(dtype)`` (cast, then scale), or
    with ``offset`` (Gemma) ``(rms_norm(x.float()) * (offset + w.float())).to(dtype)``."""
    xf = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if offset:
        return (xf * (offset + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           offset: float = 0.0) -> torch.Tensor:
    """``residual += x`` in place (rounded to the activation dtype), then the norm of the new residual."""
    residual.copy_(residual + x)
    return rms_norm_reference(residual, weight, eps, offset)


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """``act(gate) * up``; with ``up`` None, ``gate`` is ``[T, 2I]`` (gate first, then up: Phi-3)."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    if act == "silu":
        return F.silu(gate) * up
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"act must be one of {ACTIVATIONS} (got {act!r})")


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the first ``cos.shape[-1]`` dims of ``x [T, heads, D]`` (the rest passes)."""
    r = cos.shape[-1]
    rot = x[..., :r] * cos + torch.roll(x[..., :r], r // 2, dims=-1) * sin
    return rot if r == x.shape[-1] else torch.cat((rot, x[..., r:]), dim=-1)


def rope_kv_write_reference(q, k, v, cos, sin, k_cache, v_cache, kv_index, q_weight=None, k_weight=None,
                            eps: float = 1e-6, offset: float = 0.0):
    """Rotated ``q`` and ``k``; the rotated keys and the values written to their flat cache rows.
    ``q_weight``/``k_weight`` (``[D]`` or per token ``[T, D]``): per-head RMSNorms of q and k first."""
    if q_weight is not None:
        per_head = (lambda w: w[:, None, :]) if q_weight.dim() == 2 else (lambda w: w)
        q = rms_norm_reference(q, per_head(q_weight), eps, offset)
        k = rms_norm_reference(k, per_head(k_weight), eps, offset)
    q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    kv, d = k_cache.shape[-2:]
    k_cache.view(-1, kv, d).index_copy_(0, kv_index, k.to(k_cache.dtype))
    v_cache.view(-1, kv, d).index_copy_(0, kv_index, v.to(v_cache.dtype))
    return q, k
