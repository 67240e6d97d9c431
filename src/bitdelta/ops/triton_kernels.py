"""Triton kernels for the multi-tenant BitDelta linear (``@triton.jit`` only; launch code is in triton_ops.py).

Two kernels, both computing ``y[t] = x[t] W^T + b + Δ̂_{d(t)} x[t]`` with fp32 accumulation:

* ``bitdelta_decode_kernel``: the delta part of small batches (T <= 128; the base product is one
  cuBLAS GEMM beside it). Every distinct tenant's product is its own set of programs (grid: N
  blocks x T token slots x K splits), all adding atomically into an fp32 buffer, so the whole GPU
  works on every tenant at once and each tenant's bits are read once.
* ``expand_delta_kernel``: W_base + Δ̂_d written out dense, so a long single-tenant prefill
  segment costs one cuBLAS GEMM plus one pass over W.
* ``bitdelta_segmented_kernel``: prefill. Token rows are grouped in segments of one tenant; each
  program owns a ``BM x BN`` tile of one segment and rebuilds ``W_base + Δ̂`` tile by tile in
  registers, so one segment costs one GEMM.

Usage: see ``triton_ops.bitdelta_decode`` / ``triton_ops.bitdelta_segmented``.
"""

import triton
import triton.language as tl


@triton.jit
def _unpack_pm1(sb, BN: tl.constexpr, BKD: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """uint8 [BN, BKD//8] packed signs -> [BN, BKD] of +1/-1 in OUT_DTYPE (bit j of byte b = column 8b+j)."""
    j = tl.arange(0, 8)
    b32 = sb.to(tl.int32)[:, :, None]
    if OUT_DTYPE == tl.float16:
        # bit 1 -> 0x3C00 (+1.0), bit 0 -> 0xBC00 (-1.0): one shift and one and/xor per element.
        v = ((b32 << (15 - j)[None, None, :]) & 0x8000) ^ 0xBC00
        s = v.to(tl.int16).to(tl.float16, bitcast=True)
    elif OUT_DTYPE == tl.bfloat16:
        v = ((b32 << (15 - j)[None, None, :]) & 0x8000) ^ 0xBF80
        s = v.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        bit = (b32 >> j[None, None, :]) & 1
        s = tl.where(bit != 0, 1.0, -1.0).to(OUT_DTYPE)
    return tl.reshape(s, (BN, BKD))


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (interpreter + bf16 only: its bf16 dot is wrong) multiplies in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _unpack_bits(sb, BN: tl.constexpr, BKD: tl.constexpr):
    """uint8 [BN, BKD//8] packed signs -> int32 [BN, BKD] of 0/1 (bit j of byte b = column 8b+j)."""
    j = tl.arange(0, 8)
    bit = (sb.to(tl.int32)[:, :, None] >> j[None, None, :]) & 1
    return tl.reshape(bit, (BN, BKD))


@triton.jit
def _mm(a, b, acc, SWAP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a [tokens, K], b [n, K] -> acc + a b^T ([tokens, n]), or acc + b a^T ([n, tokens]) when SWAP.

    SWAP puts the weight/sign tile in the MMA's M slot (operand A, which can stay in registers),
    so a freshly unpacked tile needs no shared-memory round trip and tokens only pad to 16."""
    if SWAP:
        return _dot(b, tl.trans(a), acc, PREC, UPCAST)
    else:
        return _dot(a, tl.trans(b), acc, PREC, UPCAST)


@triton.jit
def _bcast_n(v, SWAP: tl.constexpr):
    """A per-output-row vector [BN] broadcast against the accumulator's layout."""
    if SWAP:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _row_scaled(part, c_ptr, p, stride_cp, offs_n, n_mask, MODE: tl.constexpr):
    """One sign plane's GEMV result ``[BN]`` times its scalar or row scale (col scales were applied
    to x already, so MODE 2 returns ``part`` as it is)."""
    if MODE == 0:
        part = part * tl.load(c_ptr + p)
    elif MODE == 1:
        part = part * tl.load(c_ptr + p * stride_cp + offs_n, mask=n_mask, other=0.0)
    return part


@triton.jit
def _sign_words(s_ptr, p, stride_sp, stride_sn, offs_n, n_mask, k0, KW, BKW: tl.constexpr, WB: tl.constexpr):
    """The [BN, BKW] tile of plane p's sign words (WB bits each, as int32) that starts at column
    k0, and the word indices ``offs_w``; words past the row (KW words) and masked rows read 0."""
    offs_w = k0 // WB + tl.arange(0, BKW)
    sw = tl.load(s_ptr + p * stride_sp + offs_n[:, None] * stride_sn + offs_w[None, :],
                 mask=n_mask[:, None] & (offs_w < KW)[None, :], other=0).to(tl.int32)
    return offs_w, sw


@triton.jit
def _sign_gemv(x_ptr, s_ptr, c_ptr, t, offs_n, n_mask, k_lo, k_hi, K, KW,
               stride_xt, stride_sp, stride_sn, stride_cp,
               MODE: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, WB: tl.constexpr):
    """Δ̂ x[t] for rows offs_n on CUDA cores: [BN] fp32, scales applied.

    Signs are read as words of WB bits (int32 when the row length allows, else bytes); bit j of word
    w is column WB*w + j. The accumulator is a [BN, BKW] tile (one partial sum per row and word
    position) reduced once at the end, and each bit position j adds ``x`` or ``-x`` to the whole
    tile: a test, a select and an add per weight, no ±1 tile and no padding to 16 tokens.
    """
    total = tl.zeros((BN,), dtype=tl.float32)
    x_row = x_ptr + t * stride_xt
    for p in tl.static_range(BITS):
        acc = tl.zeros((BN, BKW), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BKW * WB):
            offs_w, sw = _sign_words(s_ptr, p, stride_sp, stride_sn, offs_n, n_mask, k0, KW, BKW, WB)
            for j in tl.static_range(WB):
                offs_k = offs_w * WB + j
                xj = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                if MODE == 2:
                    xj = xj * tl.load(c_ptr + p * stride_cp + offs_k, mask=offs_k < K, other=0.0)
                if j == 31:
                    bit = sw < 0
                else:
                    bit = (sw & (1 << j)) != 0
                acc += tl.where(bit, xj[None, :], -xj[None, :])
        total += _row_scaled(tl.sum(acc, axis=1), c_ptr, p, stride_cp, offs_n, n_mask, MODE)
    return total


@triton.jit
def _sign_gemv_lut(x_ptr, s_ptr, c_ptr, t, offs_n, n_mask, k_lo, k_hi, K, KW,
                   stride_xt, stride_sp, stride_sn, stride_cp,
                   MODE: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
    """Δ̂ x[t] for rows offs_n through 4-bit lookup tables: [BN] fp32, scales applied (int32 words only).

    For every 4 columns of a K step the 16 possible signed sums of x are built once per program
    (``lut [G, 16]``, shared by all BN rows); each row then adds one table entry per nibble of its
    sign words: a shift, an and, a lookup and an add per 4 weights, where :func:`_sign_gemv` spends
    about four instructions per weight. ``GEMV: 1`` in the decode config; on an H100 it issues 36%
    fewer instructions than :func:`_sign_gemv` but runs no faster (its table lookups stall: issue
    slots 35% busy under ncu), so it is not the default.
    """
    G: tl.constexpr = BKW * 8  # nibbles per K step, 4 columns each
    code = tl.arange(0, 16)
    jj = tl.arange(0, 4)
    sgn = tl.where(((code[:, None] >> jj[None, :]) & 1) != 0, 1.0, -1.0)  # [16, 4]: bit j of code -> ±1
    q = tl.arange(0, 8)
    total = tl.zeros((BN,), dtype=tl.float32)
    x_row = x_ptr + t * stride_xt
    for p in tl.static_range(BITS):
        acc = tl.zeros((G, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BKW * 32):
            _, sw = _sign_words(s_ptr, p, stride_sp, stride_sn, offs_n, n_mask, k0, KW, BKW, 32)
            # Nibble g = 8 w + q of the step covers columns k0 + 4 g + j (j = 0..3), bit j = column j.
            offs_k = k0 + 4 * tl.arange(0, G)[:, None] + jj[None, :]  # [G, 4]
            x4 = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            if MODE == 2:
                x4 = x4 * tl.load(c_ptr + p * stride_cp + offs_k, mask=offs_k < K, other=0.0)
            lut = tl.sum(x4[:, None, :] * sgn[None, :, :], axis=2)  # [G, 16]
            nib = (sw[:, :, None] >> (4 * q)[None, None, :]) & 15  # [BN, BKW, 8]
            acc += tl.gather(lut, tl.trans(tl.reshape(nib, (BN, G))), axis=1)  # [G, BN]
        total += _row_scaled(tl.sum(acc, axis=0), c_ptr, p, stride_cp, offs_n, n_mask, MODE)
    return total


@triton.jit
def _halves(h2):
    """int32 holding two fp16 halves (low = first) -> the two values in fp32."""
    lo = (h2 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (h2 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _hadd2(a, b, INTERP: tl.constexpr):
    """Packed fp16 pair add: int32 tensors each holding two halves (low = first). One ``add.rn.f16x2``
    on the GPU; under the CPU interpreter (no inline PTX) the same rounding, emulated in fp32."""
    if INTERP:
        a_lo, a_hi = _halves(a)
        b_lo, b_hi = _halves(b)
        lo, hi = (a_lo + b_lo).to(tl.float16), (a_hi + b_hi).to(tl.float16)
        lo_bits = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo_bits | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)
    else:
        return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _sign_gemv_h2(x_ptr, s_ptr, c_ptr, t, offs_n, n_mask, k_lo, k_hi, K, KW,
                  stride_xt, stride_sp, stride_sn, stride_cp,
                  MODE: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr,
                  INTERP: tl.constexpr):
    """Δ̂ x[t] for rows offs_n with packed fp16 pairs: [BN] fp32, scales applied (int32 words, scalar
    or row scales; x is rounded to fp16).

    Word w's bits j and j + 16 sign columns 32w + j and 32w + j + 16. Shifting the word left by
    15 - j puts them at bits 15 and 31, the sign bits of a half pair; masked and XORed into the pair
    (-x_a, -x_b) they make (±x_a, ±x_b), added by one ``add.f16x2``: three integer/half2 operations
    per two weights, where :func:`_sign_gemv` spends about four per weight. Pair sums stay in fp16
    for 16 adds, then go to an fp32 accumulator. The default (``GEMV: 2`` in the decode config):
    the delta kernel 1.3x faster than with :func:`_sign_gemv` on an H100 (ncu, 16 tenants x 1 token).
    """
    SIGNS: tl.constexpr = -2147450880  # 0x80008000 as int32: the sign bits of both halves
    total = tl.zeros((BN,), dtype=tl.float32)
    x_row = x_ptr + t * stride_xt
    for p in tl.static_range(BITS):
        acc = tl.zeros((BN, BKW), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BKW * 32):
            offs_w, sw = _sign_words(s_ptr, p, stride_sp, stride_sn, offs_n, n_mask, k0, KW, BKW, 32)
            acc2 = tl.zeros((BN, BKW), dtype=tl.int32)  # +0.0 in both halves
            for j in tl.static_range(16):
                c_lo = offs_w * 32 + j
                x_lo = tl.load(x_row + c_lo, mask=c_lo < K, other=0.0).to(tl.float16)
                x_hi = tl.load(x_row + c_lo + 16, mask=c_lo + 16 < K, other=0.0).to(tl.float16)
                neg = ((x_lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
                       | (x_hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)) ^ SIGNS
                acc2 = _hadd2(acc2, ((sw << (15 - j)) & SIGNS) ^ neg[None, :], INTERP)
            lo, hi = _halves(acc2)
            acc += lo + hi
        total += _row_scaled(tl.sum(acc, axis=1), c_ptr, p, stride_cp, offs_n, n_mask, MODE)
    return total


@triton.jit
def bitdelta_decode_kernel(
    x_ptr, s_ptr, sw_ptr, c_ptr, ids_ptr, y_ptr,
    T, N, K, KB, KW, K_SPLIT,
    stride_xt, stride_yt,
    stride_sd, stride_sp, stride_sn,
    stride_swd, stride_swp, stride_swn,
    stride_cd, stride_cp,
    MODE: tl.constexpr, BITS: tl.constexpr,
    BT: tl.constexpr, TG: tl.constexpr, BN: tl.constexpr, BKD: tl.constexpr,
    BKW: tl.constexpr, WB: tl.constexpr, DOT_MIN: tl.constexpr, GEMV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, INTERP: tl.constexpr,
):
    """Delta part of a small batch (T <= BT): y[t] += Δ̂_{ids[t]} x[t], y fp32 and zeroed by the caller,
    every program adding its partial sums atomically. grid = (cdiv(N, BN), T, cdiv(K, K_SPLIT)).

    Program (n, i, s) covers output rows n*BN:+BN and inputs s*K_SPLIT:+K_SPLIT for the tenant of
    token i, and works only if i is that tenant's first token in the batch (the others exit at
    once): each distinct tenant's bits are read once per (n, s), and all tenants run in parallel.
    A tenant with at least DOT_MIN tokens multiplies an unpacked ±1 tile with its tokens on tensor
    cores (TG tokens at a time); with fewer, each token is a CUDA-core sign GEMV (_sign_gemv).
    """
    pid_n = tl.program_id(0)
    i = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    dt = x_ptr.dtype.element_ty
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    rows = tl.arange(0, BT)
    r_mask = rows < T
    d = tl.load(ids_ptr + i)
    ids_v = tl.load(ids_ptr + rows, mask=r_mask, other=-1)
    n_before = tl.sum(((ids_v == d) & (rows < i)).to(tl.int32), axis=0)
    if (d >= 0) & (n_before == 0):
        member = ids_v == d
        pos = tl.cumsum(member.to(tl.int32), axis=0) - 1
        cnt = tl.sum(member.to(tl.int32), axis=0)
        c_base = c_ptr + d.to(tl.int64) * stride_cd
        if cnt < DOT_MIN:
            sw_base = sw_ptr + d.to(tl.int64) * stride_swd
            for c in range(0, cnt):
                t = tl.sum(tl.where(member & (pos == c), rows, 0), axis=0)
                if GEMV == 2 and WB == 32 and MODE != 2 and dt != tl.float32:
                    part = _sign_gemv_h2(x_ptr, sw_base, c_base, t, offs_n, n_mask, k_lo, k_hi, K, KW,
                                         stride_xt, stride_swp, stride_swn, stride_cp, MODE, BITS, BN, BKW, INTERP)
                elif GEMV == 1 and WB == 32:
                    part = _sign_gemv_lut(x_ptr, sw_base, c_base, t, offs_n, n_mask, k_lo, k_hi, K, KW,
                                          stride_xt, stride_swp, stride_swn, stride_cp, MODE, BITS, BN, BKW)
                else:
                    part = _sign_gemv(x_ptr, sw_base, c_base, t, offs_n, n_mask, k_lo, k_hi, K, KW,
                                      stride_xt, stride_swp, stride_swn, stride_cp, MODE, BITS, BN, BKW, WB)
                tl.atomic_add(y_ptr + t * stride_yt + offs_n, part, mask=n_mask, sem="relaxed")
        else:
            s_base = s_ptr + d.to(tl.int64) * stride_sd
            for c0 in range(0, cnt, TG):
                slots = c0 + tl.arange(0, TG)
                sel = member[None, :] & (pos[None, :] == slots[:, None])  # [TG, BT]
                tok = tl.sum(tl.where(sel, rows[None, :], 0), axis=1)  # [TG]
                t_mask = slots < cnt
                dsum = tl.zeros((BN, TG), dtype=tl.float32)
                for p in tl.static_range(BITS):
                    dacc = tl.zeros_like(dsum)
                    for k0 in range(k_lo, k_hi, BKD):
                        offs_k = k0 + tl.arange(0, BKD)
                        k_mask = offs_k < K
                        offs_b = k0 // 8 + tl.arange(0, BKD // 8)
                        xt = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                                     mask=t_mask[:, None] & k_mask[None, :], other=0.0)
                        if MODE == 2:
                            cs = tl.load(c_base + p * stride_cp + offs_k, mask=k_mask, other=0.0)
                            xt = (xt.to(tl.float32) * cs[None, :]).to(dt)
                        sb = tl.load(s_base + p * stride_sp + offs_n[:, None] * stride_sn + offs_b[None, :],
                                     mask=n_mask[:, None] & (offs_b < KB)[None, :], other=0)
                        dacc = _mm(xt, _unpack_pm1(sb, BN, BKD, dt), dacc, True, PREC, UPCAST)
                    if MODE == 0:
                        dacc = dacc * tl.load(c_base + p)
                    elif MODE == 1:
                        dacc = dacc * tl.load(c_base + p * stride_cp + offs_n, mask=n_mask, other=0.0)[:, None]
                    dsum += dacc
                tl.atomic_add(y_ptr + tok[None, :] * stride_yt + offs_n[:, None], dsum,
                              mask=t_mask[None, :] & n_mask[:, None], sem="relaxed")


@triton.jit
def bitdelta_segmented_kernel(
    x_ptr, w_ptr, b_ptr, s_ptr, c_ptr, blk_seg_ptr, blk_m0_ptr, seg_starts_ptr, seg_ids_ptr, y_ptr,
    N, K, KB,
    stride_xt, stride_wn, stride_yt,
    stride_sd, stride_sp, stride_sn,
    stride_cd, stride_cp,
    HAS_BIAS: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """grid = (max_blocks, cdiv(N, BN)); block b covers rows blk_m0[b]:+BM of segment blk_seg[b] (-1 = none)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(blk_seg_ptr + pid_m)
    if seg >= 0:
        dt = x_ptr.dtype.element_ty
        m0 = tl.load(blk_m0_ptr + pid_m)
        m_end = tl.load(seg_starts_ptr + seg + 1)
        d = tl.load(seg_ids_ptr + seg)
        rows = m0 + tl.arange(0, BM)
        r_mask = rows < m_end
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_mask = offs_n < N
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        if d >= 0:
            s_base = s_ptr + d.to(tl.int64) * stride_sd
            c_base = c_ptr + d.to(tl.int64) * stride_cd
            for k0 in range(0, K, BK):
                offs_k = k0 + tl.arange(0, BK)
                k_mask = offs_k < K
                offs_b = k0 // 8 + tl.arange(0, BK // 8)
                xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + offs_k[None, :],
                             mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                             mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                # W_base + Δ̂ rebuilt in registers (in the input dtype: one rounding per plane;
                # in fp32 under the interpreter, whose bf16 arithmetic is wrong).
                if UPCAST:
                    wt = wt.to(tl.float32)
                for p in tl.static_range(BITS):
                    sb = tl.load(s_base + p * stride_sp + offs_n[:, None] * stride_sn + offs_b[None, :],
                                 mask=n_mask[:, None] & (offs_b < KB)[None, :], other=0)
                    bit = _unpack_bits(sb, BN, BK) != 0
                    if MODE == 0:
                        a = tl.load(c_base + p).to(wt.dtype)
                        wt += tl.where(bit, a, -a)
                    elif MODE == 1:
                        rs = tl.load(c_base + p * stride_cp + offs_n, mask=n_mask, other=0.0).to(wt.dtype)[:, None]
                        wt += tl.where(bit, rs, -rs)
                    else:
                        cs = tl.load(c_base + p * stride_cp + offs_k, mask=k_mask, other=0.0).to(wt.dtype)[None, :]
                        wt += tl.where(bit, cs, -cs)
                acc = _mm(xt, wt, acc, SWAP, PREC, UPCAST)
        else:
            for k0 in range(0, K, BK):
                offs_k = k0 + tl.arange(0, BK)
                k_mask = offs_k < K
                xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + offs_k[None, :],
                             mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                             mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                acc = _mm(xt, wt, acc, SWAP, PREC, UPCAST)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += _bcast_n(bias, SWAP)
        if SWAP:
            tl.store(y_ptr + rows[None, :].to(tl.int64) * stride_yt + offs_n[:, None], acc.to(dt),
                     mask=r_mask[None, :] & n_mask[:, None])
        else:
            tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_yt + offs_n[None, :], acc.to(dt),
                     mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def expand_delta_kernel(
    w_ptr, s_ptr, c_ptr, out_ptr, N, K, KB,
    stride_wn, stride_on, stride_sp, stride_sn, stride_cp,
    MODE: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """out = W + Σ_p Δ̂_p for one tenant (s_ptr/c_ptr already offset to it), summed in fp32, one
    rounding to out's dtype. grid = (cdiv(N, BN), cdiv(K, BK))."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    n_mask = offs_n < N
    k_mask = offs_k < K
    m = n_mask[:, None] & k_mask[None, :]
    w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=m, other=0.0).to(tl.float32)
    offs_b = tl.program_id(1) * (BK // 8) + tl.arange(0, BK // 8)
    for p in tl.static_range(BITS):
        sb = tl.load(s_ptr + p * stride_sp + offs_n[:, None].to(tl.int64) * stride_sn + offs_b[None, :],
                     mask=n_mask[:, None] & (offs_b < KB)[None, :], other=0)
        bit = _unpack_bits(sb, BN, BK) != 0
        if MODE == 0:
            a = tl.load(c_ptr + p)
            w += tl.where(bit, a, -a)
        elif MODE == 1:
            rs = tl.load(c_ptr + p * stride_cp + offs_n, mask=n_mask, other=0.0)[:, None]
            w += tl.where(bit, rs, -rs)
        else:
            cs = tl.load(c_ptr + p * stride_cp + offs_k, mask=k_mask, other=0.0)[None, :]
            w += tl.where(bit, cs, -cs)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=m)
