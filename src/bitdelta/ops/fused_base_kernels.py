"""Triton kernels of the fused base ops (``@triton.jit`` only; semantics, checks and launch in fused_norm.py).

Each kernel reproduces the rounding of the unfused PyTorch ops it replaces: every intermediate the
eager path materialises in the activation dtype is rounded to that dtype here too (``.to(OUT)``
then back to float32), so in half precision the fused path gives the same values, not merely close ones.

* ``rms_norm_kernel``: grid (token,). Optionally adds the sublayer output to the residual row first
  (storing the sum, rounded, back into the residual), then RMSNorm in float32 with Llama's (cast,
  then scale) or Gemma's (scale by ``offset + w`` in float32, then cast) numerics; the weight row
  stride is 0 for the base's ``[D]`` weight, ``D`` for per-token ``[T, D]`` weights, and with
  ``HAS_W_INDEX`` token t reads row ``w_index[t]`` of a table (each tenant's weights, gathered in place).
* ``gated_act_kernel``: grid (token, column block). ``act(gate) * up`` with SiLU or GELU-tanh.
* ``rope_kv_kernel``: grid (token, query head + kv head). Query heads are rotated into the output;
  key heads are rotated and written to their paged-cache row (and optionally to a dense output),
  value heads copied to theirs. With ``QK_NORM``, each query and key head is first RMS-normalised
  over its own dims with its weight (Qwen3, Gemma-3), rounded as the eager norm's output is.
"""

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, w_index_ptr, y_ptr, stride_x, stride_res, stride_w, stride_y, dim, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_W_INDEX: tl.constexpr, GEMMA: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
        # the residual stream is kept in the activation dtype: round the sum as `residual + x` does
        s = (r + x).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_res + cols, s, mask=ok)
        x = s.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = x * inv_rms
    w_row = row
    if HAS_W_INDEX:
        w_row = tl.load(w_index_ptr + row).to(tl.int64)
    w = tl.load(w_ptr + w_row * stride_w + cols, mask=ok, other=0.0).to(tl.float32)
    if GEMMA:  # (1 + w) in float32, one rounding at the end
        y = normed * (offset + w)
    else:  # Llama: the normalised row is rounded to the activation dtype before the scale
        y = normed.to(y_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gated_act_kernel(
    gate_ptr, up_ptr, y_ptr, stride_gate, stride_up, stride_y, width,
    GELU: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    if GELU:
        # 0.5 g (1 + tanh(z)) == g * sigmoid(2 z); the sigmoid form cannot overflow to nan
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g / (1.0 + tl.exp(-2.0 * z))
    else:
        a = g / (1.0 + tl.exp(-g))
    # the eager path materialises act(gate) in the activation dtype before the product
    a = a.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (a * u).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale(n, w, offset, GEMMA: tl.constexpr, OUT: tl.constexpr):
    """A normalised value times its weight, rounded as TenantNorm rounds (see rms_norm_kernel)."""
    if GEMMA:
        return (n * (offset + w)).to(OUT).to(tl.float32)
    return (n.to(OUT).to(tl.float32) * w).to(OUT).to(tl.float32)


@triton.jit
def _rotate(x_row_ptr, out_ptr, dims, partner, in_dim, rotary, c, s, w_row_ptr, eps, offset,
            D: tl.constexpr, QK_NORM: tl.constexpr, GEMMA: tl.constexpr):
    """One head vector (RMS-normalised with the weights at ``w_row_ptr`` first, with ``QK_NORM``)
    rotated over its rotary dims (the rest passes through), rounded to ``out_ptr``'s dtype as eager
    ``x * cos + roll(x) * sin`` rounds each product and the sum."""
    OUT = out_ptr.dtype.element_ty
    x = tl.load(x_row_ptr + dims, mask=in_dim, other=0.0).to(tl.float32)
    xp = tl.load(x_row_ptr + partner, mask=rotary, other=0.0).to(tl.float32)
    if QK_NORM:  # the partner is a dim of the same head: one inverse RMS for both
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_row_ptr + dims, mask=in_dim, other=0.0).to(tl.float32)
        wp = tl.load(w_row_ptr + partner, mask=rotary, other=0.0).to(tl.float32)
        x = _scale(x * inv_rms, w, offset, GEMMA, OUT)
        xp = _scale(xp * inv_rms, wp, offset, GEMMA, OUT)
    a = (x * c).to(OUT).to(tl.float32)
    b = (xp * s).to(OUT).to(tl.float32)
    return tl.where(rotary, a + b, x).to(OUT)


@triton.jit
def rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, index_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_kc_row, stride_kc_head, stride_vc_row, stride_vc_head,
    stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h,
    heads, qw_ptr, kw_ptr, w_index_ptr, stride_qw, stride_kw, eps, offset,
    D: tl.constexpr, ROT: tl.constexpr, D_PAD: tl.constexpr, K_OUT: tl.constexpr,
    QK_NORM: tl.constexpr, HAS_W_INDEX: tl.constexpr, GEMMA: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, D_PAD)
    in_dim = dims < D
    rotary = dims < ROT
    half = ROT // 2
    # torch.roll(x, ROT / 2) over the rotary dims: dim j reads j + ROT/2 (mod ROT)
    partner = tl.where(dims < half, dims + half, dims - half)
    c = tl.load(cos_ptr + t * stride_cos + dims, mask=rotary, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_sin + dims, mask=rotary, other=0.0).to(tl.float32)
    w_row = t
    if HAS_W_INDEX:
        w_row = tl.load(w_index_ptr + t).to(tl.int64)
    if head < heads:
        y = _rotate(q_ptr + t * stride_qt + head * stride_qh, q_out_ptr, dims, partner, in_dim, rotary, c, s,
                    qw_ptr + w_row * stride_qw, eps, offset, D, QK_NORM, GEMMA)
        tl.store(q_out_ptr + t * stride_qo_t + head * stride_qo_h + dims, y, mask=in_dim)
    else:
        kv_head = head - heads
        row = tl.load(index_ptr + t).to(tl.int64)  # the token's flat cache row (block * size + slot)
        y = _rotate(k_ptr + t * stride_kt + kv_head * stride_kh, q_out_ptr, dims, partner, in_dim, rotary, c, s,
                    kw_ptr + w_row * stride_kw, eps, offset, D, QK_NORM, GEMMA)
        tl.store(kc_ptr + row * stride_kc_row + kv_head * stride_kc_head + dims, y, mask=in_dim)
        if K_OUT:
            tl.store(k_out_ptr + t * stride_ko_t + kv_head * stride_ko_h + dims, y, mask=in_dim)
        v = tl.load(v_ptr + t * stride_vt + kv_head * stride_vh + dims, mask=in_dim, other=0.0)
        tl.store(vc_ptr + row * stride_vc_row + kv_head * stride_vc_head + dims, v, mask=in_dim)
