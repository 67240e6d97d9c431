"""Triton kernels of the paged decode attention (``@triton.jit`` only; semantics and launch in paged_attention.py).

Table width and split count are runtime arguments, so neither recompiles the kernel as they change.

* ``paged_decode_kernel``: grid (row, kv head, split). A program loads the query heads of its GQA
  group as the rows of one tile, walks its share of the row's keys ``BLOCK_N`` tokens (whole pages)
  at a time with an online softmax in float32, and writes either the normalised output (one split)
  or its partial (running max, sum of exponentials, unnormalised accumulator).
* ``merge_splits_kernel``: grid (row, query head). Rescales the partials to their common maximum
  and divides the summed accumulators by the summed exponentials.
"""

import triton
import triton.language as tl


@triton.jit
def _scores(q, k, Q_ROWS: tl.constexpr, IEEE_DOT: tl.constexpr):
    """q [Q_ROWS, D_PAD] . k [BLOCK_N, D_PAD] -> float32 [Q_ROWS, BLOCK_N]. IEEE_DOT: float32 operands, no TF32."""
    if Q_ROWS == 1:  # one query head: elementwise, no 16-row padding of a tensor-core dot
        return tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)[None, :]
    elif IEEE_DOT:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(q, tl.trans(k))


@triton.jit
def _weighted_values(p, v, Q_ROWS: tl.constexpr, IEEE_DOT: tl.constexpr):
    """p float32 [Q_ROWS, BLOCK_N] . v [BLOCK_N, D_PAD] -> float32 [Q_ROWS, D_PAD]."""
    if Q_ROWS == 1:
        return tl.sum(tl.sum(p, axis=0)[:, None] * v.to(tl.float32), axis=0)[None, :]
    elif IEEE_DOT:
        return tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        # Half-precision weights into the tensor-core dot, as flash attention does (float32 accumulate).
        return tl.dot(p.to(v.dtype), v)


@triton.jit
def _tanh(x):
    """tanh from exp (odd-symmetric form: no overflow for large |x|)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, scale, window, softcap, max_blocks, num_splits,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_table,
    out_ptr, stride_ob, stride_oh,
    pmax_ptr, psum_ptr, pacc_ptr, stride_pb, stride_ph, stride_ps,
    GROUP: tl.constexpr, Q_ROWS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Keys [lo, hi) of this row; the walk starts at lo's page so that every tile is whole pages.
    seq_len = tl.load(lens_ptr + row)
    hi = tl.minimum(seq_len, max_blocks * BLOCK_SIZE)  # never past the table's width
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    start = lo // BLOCK_SIZE * BLOCK_SIZE
    # This split's share, in whole tiles (every split but the last few gets the same number).
    tiles = tl.cdiv(hi - start, BLOCK_N)
    per_split = tl.cdiv(tiles, num_splits)
    first = start + split * per_split * BLOCK_N
    last = tl.minimum(first + per_split * BLOCK_N, hi)

    heads = tl.arange(0, Q_ROWS)
    head_ok = heads < GROUP
    q_head = kv_head * GROUP + heads
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    q = tl.load(q_ptr + row * stride_qb + q_head[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)

    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full((Q_ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((Q_ROWS,), tl.float32)
    acc = tl.zeros((Q_ROWS, D_PAD), tl.float32)
    table_row = table_ptr + row * stride_table
    for tile in range(first, last, BLOCK_N):
        tok = tile + offs_n
        in_range = tok < last
        visible = in_range & (tok >= lo)
        # One table entry per token (the same few entries per tile, cached); only pages in use are read.
        page = tl.load(table_row + tok // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        slot = tok % BLOCK_SIZE
        k_off = page * stride_kb + slot * stride_kt + kv_head * stride_kh
        v_off = page * stride_vb + slot * stride_vt + kv_head * stride_vh
        kv_mask = visible[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + k_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)

        s = _scores(q, k, Q_ROWS, IEEE_DOT) * scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no visible key: no NaN
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _weighted_values(p, v, Q_ROWS, IEEE_DOT)
        m_i = m_new

    store_mask = head_ok[:, None] & dim_ok[None, :]
    if not SPLIT:
        o = acc / l_i[:, None]
        tl.store(out_ptr + row * stride_ob + q_head[:, None] * stride_oh + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        part = row * stride_pb + q_head * stride_ph + split
        tl.store(pmax_ptr + part, m_i, mask=head_ok)
        tl.store(psum_ptr + part, l_i, mask=head_ok)
        # The accumulator buffer is [B, H, S, D], laid out like the [B, H, S] ones times D.
        tl.store(pacc_ptr + (part * stride_ps)[:, None] + dims[None, :], acc, mask=store_mask)


@triton.jit
def merge_splits_kernel(
    pmax_ptr, psum_ptr, pacc_ptr, out_ptr, num_splits, stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
    D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    base = row * stride_pb + head * stride_ph + splits
    m = tl.load(pmax_ptr + base, mask=split_ok, other=float("-inf"))
    total = tl.max(m, axis=0)  # finite: every row has a visible key, so some split saw one
    w = tl.exp(m - total)  # 0 for splits that saw no key (max -inf)
    denom = tl.sum(tl.load(psum_ptr + base, mask=split_ok, other=0.0) * w, axis=0)
    acc = tl.load(pacc_ptr + base[:, None] * stride_ps + dims[None, :],
                  mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty), mask=dim_ok)
