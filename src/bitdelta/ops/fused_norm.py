"""Fused base ops of the serving engine's layers: fewer, larger kernels for what runs between the GEMMs.

A decode step of a served base spends most of its kernel launches on small elementwise ops: the
residual add and the RMSNorm after it, RoPE on queries and keys and the paged-cache writes of keys
and values, the gated activation. Each function here is one Triton kernel doing what several eager
ops did, with the same rounding (spec: :mod:`bitdelta.ops.fused_base_reference`):

* :func:`add_rms_norm`: ``residual += x`` (in place, in the activation dtype), then RMSNorm of the sum;
* :func:`rms_norm`: RMSNorm alone (the first layer's input norm, the final norm);
* :func:`gated_activation`: ``act(gate) * up``, SiLU or GELU-tanh, from two tensors or Phi-3's one;
* :func:`rope_kv_write`: RoPE on ``q`` and ``k`` (partial rotary too; per-head q/k RMSNorms first
  when given their weights), rotated keys and the values written to their paged-cache rows; returns
  the rotated ``q`` (and ``k`` when asked).

The launchers check shapes, dtypes and strides from tensor metadata only (nothing is read from the
device, so every call can be captured in a CUDA graph) and raise ``ValueError`` on anything the
kernels do not take. The kernels run on CUDA tensors, or on CPU ones under ``TRITON_INTERPRET=1``.

    h = add_rms_norm(attn_out, residual, weight, eps)            # residual updated in place
    y = gated_activation(gate_up, act="silu")                     # [T, 2I] -> [T, I]
    q = rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, kv_index)
"""

from __future__ import annotations

import torch

from .fused_base_reference import ACTIVATIONS
from .launch import interpreting, next_pow2

__all__ = ["add_rms_norm", "rms_norm", "gated_activation", "rope_kv_write", "kernels_run"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One program holds a whole row in registers: past this, the kernel would spill (no model has it).
MAX_NORM_DIM = 32768
ACT_BLOCK = 1024


def kernels_run(device: torch.device) -> bool:
    """Whether the fused kernels run for tensors on ``device`` (CUDA, or the CPU interpreter)."""
    if device.type != "cuda" and not interpreting():
        return False
    from . import triton_available

    return triton_available()


def _kernels():
    from . import fused_base_kernels

    return fused_base_kernels


def _check_dtype(name: str, t: torch.Tensor, dtype=None) -> None:
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32 (got {t.dtype})")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have the activations' dtype {dtype} (got {t.dtype})")


def _check_rows(name: str, t: torch.Tensor, shape: tuple) -> None:
    """A ``[T, D]`` tensor of ``shape`` whose last dim is contiguous (any row stride)."""
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {list(shape)} (got {list(t.shape)})")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} needs a contiguous last dim (strides {t.stride()})")


def _check_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    if any(t.device != dev for t in ts):
        raise ValueError(f"all tensors must be on one device (got {sorted({str(t.device) for t in ts})})")


# ---------------------------------------------------------------------------------- RMSNorm


def _norm(x, residual, weight, eps, offset, out, weight_rows=None):
    _check_dtype("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D] (got {list(x.shape)})")
    t, d = x.shape
    _check_rows("x", x, (t, d))
    if d > MAX_NORM_DIM:
        raise ValueError(f"the norm's dim {d} is past the kernel's {MAX_NORM_DIM}")
    if residual is not None:
        _check_dtype("residual", residual, x.dtype)
        _check_rows("residual", residual, (t, d))
    _check_dtype("weight", weight, x.dtype)
    if weight_rows is not None:
        if weight.dim() != 2 or weight.shape[1] != d or weight.stride(-1) != 1:
            raise ValueError(f"with weight_rows, weight must be a table [rows, {d}] with a contiguous last dim "
                             f"(got {list(weight.shape)})")
        if weight_rows.shape != (t,) or weight_rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"weight_rows must be [T={t}] int32 or int64 (got {list(weight_rows.shape)} "
                             f"{weight_rows.dtype})")
        stride_w = weight.stride(0)
    elif weight.dim() == 1:
        if weight.shape[0] != d or weight.stride(0) != 1:
            raise ValueError(f"a base norm weight must be a contiguous [{d}] (got {list(weight.shape)})")
        stride_w = 0
    else:
        _check_rows("weight", weight, (t, d))
        stride_w = weight.stride(0)
    y = torch.empty((t, d), dtype=x.dtype, device=x.device) if out is None else out
    _check_rows("out", y, (t, d))
    _check_dtype("out", y, x.dtype)
    _check_device(x, weight, y, *([] if residual is None else [residual]),
                  *([] if weight_rows is None else [weight_rows]))
    if t == 0:
        return y
    block = max(16, next_pow2(d))
    warps = min(16, max(1, block // 512))
    res = x if residual is None else residual
    _kernels().rms_norm_kernel[(t,)](
        x, res, weight, weight if weight_rows is None else weight_rows, y,
        x.stride(0), res.stride(0), stride_w, y.stride(0), d, float(eps), float(offset),
        HAS_RESIDUAL=residual is not None, HAS_W_INDEX=weight_rows is not None, GEMMA=bool(offset),
        BLOCK_D=block, num_warps=warps)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             out: torch.Tensor | None = None, weight_rows: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of ``x [T, D]`` with ``weight`` ``[D]`` or ``[T, D]`` (x's dtype); ``offset`` 1.0 is
    Gemma's ``(1 + w)`` scale in float32, 0.0 Llama's cast-then-scale. Returns ``[T, D]``.

    ``weight_rows [T]``: ``weight`` is a table ``[rows, D]`` and token t uses ``weight[weight_rows[t]]``
    (per-tenant weights without a separate gather; the rows must be in range: they are not read here)."""
    return _norm(x, None, weight, eps, offset, out, weight_rows)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                 out: torch.Tensor | None = None, weight_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``residual += x`` in place (rounded to the dtype), then :func:`rms_norm` of the new residual."""
    if residual is None:
        raise ValueError("add_rms_norm needs a residual (use rms_norm without one)")
    return _norm(x, residual, weight, eps, offset, out, weight_rows)


# ---------------------------------------------------------------------------------- gated activation


def gated_activation(gate: torch.Tensor, up: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` as ``[T, I]``; ``up`` None: ``gate`` is ``[T, 2I]``, gate columns first."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS} (got {act!r})")
    _check_dtype("gate", gate)
    if gate.dim() != 2:
        raise ValueError(f"gate must be [T, I] (or [T, 2I] without up; got {list(gate.shape)})")
    t = gate.shape[0]
    if up is None:
        if gate.shape[1] % 2:
            raise ValueError(f"a fused gate_up must have an even width (got {gate.shape[1]})")
        width = gate.shape[1] // 2
        _check_rows("gate", gate, (t, 2 * width))
        g, u = gate, gate[:, width:]
    else:
        width = gate.shape[1]
        _check_rows("gate", gate, (t, width))
        _check_dtype("up", up, gate.dtype)
        _check_rows("up", up, (t, width))
        _check_device(gate, up)
        g, u = gate, up
    y = torch.empty((t, width), dtype=gate.dtype, device=gate.device)
    if t == 0 or width == 0:
        return y
    grid = (t, -(-width // ACT_BLOCK))
    _kernels().gated_act_kernel[grid](g, u, y, g.stride(0), u.stride(0), y.stride(0), width,
                                      GELU=act == "gelu_tanh", BLOCK=ACT_BLOCK, num_warps=4)
    return y


# ---------------------------------------------------------------------------------- RoPE + KV write


def _check_heads(name: str, t: torch.Tensor, tokens: int, dim: int, dtype) -> None:
    _check_dtype(name, t, dtype)
    if t.dim() != 3 or t.shape[0] != tokens or t.shape[2] != dim:
        raise ValueError(f"{name} must be [T={tokens}, heads, D={dim}] (got {list(t.shape)})")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous head dim (strides {t.stride()})")


def _norm_weight_stride(name: str, w: torch.Tensor, tokens: int, dim: int, dtype, rows) -> int:
    """The row stride of a q/k norm weight: ``[D]`` (0), ``[T, D]``, or with ``rows`` a table ``[R, D]``."""
    _check_dtype(name, w, dtype)
    if w.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dim")
    if rows is not None:
        if w.dim() != 2 or w.shape[1] != dim:
            raise ValueError(f"with weight_rows, {name} must be a table [rows, {dim}] (got {list(w.shape)})")
        return w.stride(0)
    if w.dim() == 1 and w.shape[0] == dim:
        return 0
    if w.dim() == 2 and tuple(w.shape) == (tokens, dim):
        return w.stride(0)
    raise ValueError(f"{name} must be [{dim}] or [{tokens}, {dim}] (got {list(w.shape)})")


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, kv_index: torch.Tensor, return_k: bool = False,
                  q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                  weight_rows: torch.Tensor | None = None, eps: float = 1e-6, offset: float = 0.0):
    """Rotated ``q [T, H, D]`` (a new tensor); rotated ``k`` and ``v`` written to cache rows ``kv_index``.

    ``cos``/``sin`` ``[T, 1, R]`` (or ``[T, R]``), ``R`` even and at most ``D`` (the first ``R`` dims
    rotate); ``k_cache``/``v_cache`` contiguous ``[blocks, block_size, KV, D]`` of q's dtype; ``kv_index``
    ``[T]`` integer flat rows (``block * block_size + slot``). With ``return_k``, returns ``(q, k)``
    (the rotated keys as a new ``[T, KV, D]`` tensor, for attention over the new tokens themselves).

    ``q_weight`` and ``k_weight`` (both or neither): per-head RMSNorms of queries and keys before
    RoPE (Qwen3, Gemma-3), as :func:`rms_norm` takes its weight (``[D]``, ``[T, D]``, or a table read
    at ``weight_rows``), with ``eps`` and ``offset``.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D] (got {list(q.shape)})")
    t, heads, d = q.shape
    _check_heads("q", q, t, d, None)
    _check_heads("k", k, t, d, q.dtype)
    kv = k.shape[1]
    _check_heads("v", v, t, d, q.dtype)
    if v.shape[1] != kv:
        raise ValueError(f"k and v must have the same heads (got {kv} and {v.shape[1]})")
    tables = []
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.dim() == 3 and tab.shape[1] == 1:
            tab = tab[:, 0]
        if tab.dim() != 2 or tab.shape[0] != t:
            raise ValueError(f"{name} must be [T={t}, 1, R] (got {list(tab.shape)})")
        _check_dtype(name, tab, q.dtype)
        if tab.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
        tables.append(tab)
    cos2, sin2 = tables
    rot = cos2.shape[1]
    if sin2.shape != cos2.shape or rot % 2 or not 0 < rot <= d:
        raise ValueError(f"cos and sin must be [T, 1, R] with the same even R <= D={d} "
                         f"(got {list(cos.shape)}, {list(sin.shape)})")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or tuple(cache.shape[2:]) != (kv, d):
            raise ValueError(f"{name} must be [blocks, block_size, KV={kv}, D={d}] (got {list(cache.shape)})")
        _check_dtype(name, cache, q.dtype)
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache differ in shape ({list(k_cache.shape)}, {list(v_cache.shape)})")
    if kv_index.shape != (t,) or kv_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_index must be [T={t}] int32 or int64 (got {list(kv_index.shape)} {kv_index.dtype})")
    if heads % kv:
        raise ValueError(f"the query heads ({heads}) must be a multiple of the kv heads ({kv})")
    _check_device(q, k, v, cos2, sin2, k_cache, v_cache, kv_index)
    qk_norm = q_weight is not None or k_weight is not None
    stride_qw = stride_kw = 0
    if qk_norm:
        if q_weight is None or k_weight is None:
            raise ValueError("q/k norms need both q_weight and k_weight")
        if weight_rows is not None and (weight_rows.shape != (t,) or weight_rows.dtype not in (torch.int32,
                                                                                                 torch.int64)):
            raise ValueError(f"weight_rows must be [T={t}] int32 or int64 (got {list(weight_rows.shape)} "
                             f"{weight_rows.dtype})")
        stride_qw = _norm_weight_stride("q_weight", q_weight, t, d, q.dtype, weight_rows)
        stride_kw = _norm_weight_stride("k_weight", k_weight, t, d, q.dtype, weight_rows)
        _check_device(q, q_weight, k_weight, *([] if weight_rows is None else [weight_rows]))
    elif weight_rows is not None:
        raise ValueError("weight_rows without q/k norm weights")
    q_out = torch.empty((t, heads, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, kv, d), dtype=q.dtype, device=q.device) if return_k else q_out
    if t > 0:
        kc, vc = k_cache.view(-1, kv, d), v_cache.view(-1, kv, d)
        _kernels().rope_kv_kernel[(t, heads + kv)](
            q, k, v, cos2, sin2, kc, vc, kv_index, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos2.stride(0), sin2.stride(0), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), heads,
            q_weight if qk_norm else q, k_weight if qk_norm else q,
            weight_rows if weight_rows is not None else kv_index, stride_qw, stride_kw, float(eps), float(offset),
            D=d, ROT=rot, D_PAD=max(16, next_pow2(d)), K_OUT=return_k, QK_NORM=qk_norm,
            HAS_W_INDEX=weight_rows is not None, GEMMA=bool(offset), num_warps=1 if d <= 128 else 2)
    return (q_out, k_out) if return_k else q_out
