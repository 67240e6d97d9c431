"""Decode attention over a paged KV cache: one new query token per sequence against its cached keys.

The cache of one layer is a pool of fixed-size pages, ``k_cache`` / ``v_cache`` ``[num_blocks,
block_size, KV, D]``; row ``b``'s token ``j`` lives in page ``block_tables[b, j // block_size]`` at
slot ``j % block_size``. Table entries past a row's ``ceil(seq_len / block_size)`` pages are never
read (they may hold anything). Semantics, for query head ``h`` of row ``b`` (``n = seq_lens[b]``):

    kv head    g = h // (H // KV)                            (grouped-query attention)
    scores     s_j = scale * q[b, h] . K[b, j, g]             for visible keys j < n
    visible    j >= n - window when a window is given        (sliding-window layers)
    softcap    s_j = softcap * tanh(s_j / softcap)           when given (Gemma-2)
    output     sum_j softmax(s)_j V[b, j, g], in q's dtype, float32 arithmetic

:func:`paged_decode_attention_reference` is that spec in plain PyTorch; :func:`paged_decode_attention_triton`
is the kernel; :func:`paged_decode_attention` picks the kernel where it runs (CUDA, or
``TRITON_INTERPRET=1``) and the reference elsewhere.

The kernel (its ``@triton.jit`` code is in :mod:`bitdelta.ops.paged_attention_kernels`) takes head dims
64, 80, 96, 128 and 256 (any D >= 16: padded to a power of two and masked) and any block size that
divides its key tile (16 and 32 are tested). It is built to read the cache once at memory
bandwidth: one program per (row, kv head) serves every query head of its GQA group, so each K/V
page is loaded once for the group; the keys of a program are walked a tile of pages at a time,
each page's id read from the table.
Few rows with long contexts would leave most of the GPU idle, so the context is also split
("flash-decoding"): ``num_splits`` programs per (row, kv head) each cover a contiguous range of
pages and write a partial (max, sum, accumulator); a second small kernel merges them. The split
count is chosen on the host from B, KV and an upper bound of the sequence length, never from the
device's ``seq_lens``: nothing syncs with the host, the grid depends only on the shapes (and
``max_seq_len``), and the loop bounds are read from ``seq_lens`` inside the kernel, so a call can be
captured in a CUDA graph and replayed with new lengths and tables.

    out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, window=4096, softcap=50.0)
"""

from __future__ import annotations

import torch

from .launch import cdiv, interpreting, next_pow2

__all__ = ["paged_decode_attention", "paged_decode_attention_reference", "paged_decode_attention_triton",
           "choose_num_splits"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A split should read at least this many tokens (one key tile at head dims up to 128): below it, the
# partial results' write and merge cost more than the parallelism gains. A lone decode row of a
# serving step (span bucket 256, 32 KV heads: 32 programs unsplit) then gets 4 splits.
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 32
# Programs wanted on the whole GPU (per SM: enough to hide the latency of the paged loads).
PROGRAMS_PER_SM = 4
_SM_COUNT: dict[int, int] = {}


# ---------------------------------------------------------------------------------- input checks


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, window, softcap) -> None:
    """Shapes, dtypes and options (no tensor values: that would sync with the device)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D] (got {tuple(q.shape)})")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32 (got {q.dtype})")
    b, h, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, KV, D] "
                         f"(got {tuple(k_cache.shape)} and {tuple(v_cache.shape)})")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"the caches must have q's dtype {q.dtype} (got {k_cache.dtype}, {v_cache.dtype})")
    _, _, kv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"q's head dim {d} differs from the cache's {dk}")
    if kv < 1 or h % kv:
        raise ValueError(f"the query heads ({h}) must be a multiple of the kv heads ({kv})")
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be [B={b}, max_blocks] (got {tuple(block_tables.shape)})")
    if seq_lens.shape != (b,):
        raise ValueError(f"seq_lens must be [B={b}] (got {tuple(seq_lens.shape)})")
    if block_tables.dtype.is_floating_point or seq_lens.dtype.is_floating_point:
        raise ValueError("block_tables and seq_lens must be integer tensors (int32)")
    if not (q.device == k_cache.device == v_cache.device == block_tables.device == seq_lens.device):
        raise ValueError("q, the caches, block_tables and seq_lens must be on one device")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be None or >= 1 (got {window})")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be None or > 0 (got {softcap})")


def _check_values(block_tables, seq_lens, block_size: int, num_blocks: int) -> None:
    """Lengths and the table entries in use, where reading them costs no device sync (CPU tensors)."""
    if seq_lens.is_cuda or seq_lens.numel() == 0:
        return
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 1 or hi > block_tables.shape[1] * block_size:
        raise ValueError(f"seq_lens must lie in [1, max_blocks * block_size = {block_tables.shape[1] * block_size}] "
                         f"(got {lo}..{hi})")
    used = torch.arange(block_tables.shape[1]) < _cdiv_t(seq_lens.long(), block_size)[:, None]
    ids = block_tables.long()[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"a block table entry in use lies outside [0, {num_blocks}) "
                         f"(got {int(ids.min())}..{int(ids.max())})")


def _cdiv_t(x: torch.Tensor, d: int) -> torch.Tensor:
    return (x + d - 1) // d


# ---------------------------------------------------------------------------------- the spec


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, *, scale=None, window=None,
                                     softcap=None, max_seq_len=None, num_splits=None) -> torch.Tensor:
    """The spec (module docstring) in plain PyTorch, float32 math; returns ``[B, H, D]`` in q's dtype.

    Every row's pages are gathered up to the table's width, with the entries past a row's last page
    replaced by page 0 before the gather (so garbage is never used as an index) and their keys masked;
    nothing syncs with the device except the value checks on CPU tensors.
    ``max_seq_len`` and ``num_splits`` are the kernel's launch hints, accepted and ignored here.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, window, softcap)
    num_blocks, block_size, kv, d = k_cache.shape
    _check_values(block_tables, seq_lens, block_size, num_blocks)
    b, h, _ = q.shape
    group = h // kv
    scale = d ** -0.5 if scale is None else float(scale)
    max_blocks = block_tables.shape[1]
    lens = seq_lens.long()
    pages = torch.arange(max_blocks, device=q.device)
    table = torch.where(pages[None, :] < _cdiv_t(lens, block_size)[:, None], block_tables.long(), 0)
    keys = k_cache[table].float().reshape(b, max_blocks * block_size, kv, d)  # [B, L, KV, D]
    values = v_cache[table].float().reshape(b, max_blocks * block_size, kv, d)
    keys = keys.repeat_interleave(group, dim=2)  # [B, L, H, D]: query head h reads kv head h // group
    values = values.repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), keys) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    j = torch.arange(max_blocks * block_size, device=q.device)[None, :]
    visible = j < lens[:, None]
    if window is not None:
        visible &= j >= lens[:, None] - int(window)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Slots no key occupies may hold anything (stale or never written): keep them out of the sum.
    values = values.masked_fill(~visible[:, :, None, None], 0.0)
    return torch.einsum("bhl,blhd->bhd", probs, values).to(q.dtype)


# ---------------------------------------------------------------------------------- the kernel's launch


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any fixed figure (an H100/H200's SM count)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_num_splits(batch: int, kv_heads: int, max_seq_len: int, sm_count: int = 132) -> int:
    """Programs per (row, kv head): 1 when B x KV programs already fill the GPU, else enough splits to
    reach about ``PROGRAMS_PER_SM`` programs per SM, each still reading ``MIN_TOKENS_PER_SPLIT`` tokens."""
    programs = batch * kv_heads
    want = PROGRAMS_PER_SM * sm_count
    if programs * 2 >= want:
        return 1
    by_length = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(cdiv(want, programs), by_length, MAX_SPLITS))


def _launch_config(d: int, block_size: int, dtype: torch.dtype, q_rows: int = 16) -> dict:
    """Keys per loop step (whole pages: 16 KiB of K at D = 128 in half precision) and warps. Compiled
    for sm_90 these use about 100 registers a thread and spill none at D = 64-256, fp16/bf16/fp32;
    GQA groups of more than 16 heads at D = 128 (or 8 at D = 256) take 8 warps for their larger
    accumulator (4 warps would need 150-200 registers a thread)."""
    per_step = 64 if d <= 128 else 32
    if dtype == torch.float32:
        per_step //= 2
    block_n = max(block_size, per_step // block_size * block_size)
    warps = 8 if q_rows * next_pow2(d) > 16 * 256 else 4
    return {"BLOCK_N": block_n, "num_warps": warps, "num_stages": 2}


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, *, scale=None, window=None,
                                  softcap=None, max_seq_len=None, num_splits=None, config=None) -> torch.Tensor:
    """The Triton kernel (module docstring); same arguments and result as the reference.

    ``max_seq_len`` bounds every ``seq_lens`` entry and sets the split count (pass a fixed one when
    capturing a CUDA graph that will replay longer contexts); without it the table's width
    (``max_blocks * block_size``) is the bound. ``num_splits`` forces a split count, ``config`` the
    launch (a dict of ``BLOCK_N``, a multiple of the block size, ``num_warps``, ``num_stages``). Requires the
    last dim of q and the caches to be contiguous; the kernel never reads a table entry past a row's
    last page, nor past the table's width (lengths beyond it are cut there: pass valid lengths).
    """
    from bitdelta.ops import paged_attention_kernels as kern

    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, window, softcap)
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head) dim")
    num_blocks, block_size, kv, d = k_cache.shape
    b, h, _ = q.shape
    out = torch.empty_like(q)
    if b == 0:
        return out
    group = h // kv
    table_tokens = block_tables.shape[1] * block_size
    bound = table_tokens if max_seq_len is None else min(int(max_seq_len), table_tokens)
    if num_splits is None:
        num_splits = choose_num_splits(b, kv, bound, _sm_count(q.device))
    num_splits = max(1, int(num_splits))
    # Query heads of a group as the rows of a dot with the key tile; tensor-core dots need 16 rows.
    # A group of one (no GQA) multiplies elementwise instead of padding 1 row to 16.
    q_rows = 1 if group == 1 else max(16, next_pow2(group))
    cfg = {**_launch_config(d, block_size, q.dtype, q_rows), **(config or {})}
    if cfg["BLOCK_N"] % block_size or cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1):
        raise ValueError(f"BLOCK_N must be a power of two and a multiple of the block size {block_size} "
                         f"(got {cfg['BLOCK_N']})")
    common = dict(
        GROUP=group, Q_ROWS=q_rows, D=d, D_PAD=max(16, next_pow2(d)), BLOCK_SIZE=block_size,
        BLOCK_N=cfg["BLOCK_N"], SPLIT=num_splits > 1,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        # float32 dots without TF32 for float32 inputs, and for bf16 ones in the interpreter (its bf16 dot
        # is wrong in triton 3.9); half-precision inputs go to the tensor cores as they are.
        IEEE_DOT=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting()),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    scale = d ** -0.5 if scale is None else float(scale)
    args = (q, k_cache, v_cache, block_tables, seq_lens, scale, int(window or 0), float(softcap or 1.0),
            block_tables.shape[1], num_splits,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0))
    if num_splits == 1:
        kern.paged_decode_kernel[(b, kv, 1)](
            *args, out, out.stride(0), out.stride(1), out, out, out, 0, 0, 0, **common)
        return out
    part_max = torch.empty((b, h, num_splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((b, h, num_splits, d), dtype=torch.float32, device=q.device)
    kern.paged_decode_kernel[(b, kv, num_splits)](
        *args, out, out.stride(0), out.stride(1), part_max, part_sum, part_acc,
        part_max.stride(0), part_max.stride(1), part_acc.stride(2), **common)
    kern.merge_splits_kernel[(b, h)](
        part_max, part_sum, part_acc, out, num_splits, part_max.stride(0), part_max.stride(1), part_acc.stride(2),
        out.stride(0), out.stride(1), D=d, D_PAD=common["D_PAD"], SPLITS_PAD=next_pow2(num_splits), num_warps=4)
    return out


def triton_runs(device: torch.device) -> bool:
    """Whether the Triton kernel runs for tensors on ``device`` (CUDA, or the CPU interpreter)."""
    if device.type != "cuda" and not interpreting():
        return False
    from bitdelta.ops import triton_available

    return triton_available()


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, scale=None, window=None, softcap=None,
                           max_seq_len=None, num_splits=None) -> torch.Tensor:
    """Decode attention over the paged cache: the Triton kernel where it runs, else the reference."""
    fn = paged_decode_attention_triton if triton_runs(q.device) else paged_decode_attention_reference
    return fn(q, k_cache, v_cache, block_tables, seq_lens, scale=scale, window=window, softcap=softcap,
              max_seq_len=max_seq_len, num_splits=num_splits)
