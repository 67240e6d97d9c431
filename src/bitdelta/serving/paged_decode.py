"""Decode attention over the paged KV cache, in plain PyTorch: the reference every decode kernel matches.

One query token per row attends over that row's keys, found through its block table (see
:mod:`bitdelta.serving.kv_cache`): the row's blocks are gathered into a dense ``[B, L, KV, D]``
context, positions at or past the row's ``seq_len`` (and, with a sliding window, before its window)
are masked, and the model's attention (``_attend``: SDPA, or explicit scores when soft-capped) runs
on that. ``max_len`` fixes ``L`` from the host (a CUDA graph's span bucket), so nothing is read
back from the device; without it ``L`` is the longest row, which costs one device-to-host read.

    out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, window=4096, max_len=512)

:func:`decode_attention` is what the model calls: on CUDA the Triton kernel of
:mod:`bitdelta.ops.paged_attention` (reads each row's blocks in place, no gathered copy), checked against
this path once per configuration before it is used; elsewhere, or if the kernel fails or disagrees, this
path. ``BITDELTA_PAGED_ATTENTION=torch`` keeps this path on CUDA too.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

logger = logging.getLogger(__name__)
# Relative error above which the kernel's trial counts as a disagreement (the two differ by rounding only).
TRIAL_REL_ERROR = 2e-2
# (device, dtype, H, KV, D, block_size, window, softcap) -> the kernel, once its trial passed; None: PyTorch
_KERNELS: dict[tuple, Callable | None] = {}


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None,
                           window: int | None = None, softcap: float | None = None,
                           max_len: int | None = None) -> torch.Tensor:
    """Single-token attention of ``q [B, H, D]`` over one layer's paged cache ``k_cache, v_cache
    [num_blocks, block_size, KV, D]``.

    ``block_tables [B, max_blocks]`` int32: row ``i``'s blocks in position order (entries past its
    blocks are ignored); ``seq_lens [B]`` int32: keys row ``i`` sees, its own token included. Key
    ``j`` is visible iff ``j < seq_len`` and, with ``window``, ``j >= seq_len - window``; ``softcap``:
    scores become ``softcap * tanh(scores / softcap)``; ``scale`` defaults to ``D ** -0.5``; head
    ``h`` reads KV head ``h // (H // KV)``. ``max_len``: a host-known bound on ``seq_lens``. Returns
    ``[B, H, D]`` in ``q``'s dtype, accumulated in float32.
    """
    from .models.common import _attend  # the model's attention core (imported late: models import this module)

    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_decode_attention takes q [B, H, D] and caches [blocks, block_size, KV, D] of one "
                         f"shape (got q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)})")
    b, h, d = q.shape
    _, block_size, kv_heads, dk = k_cache.shape
    if dk != d or h % kv_heads:
        raise ValueError(f"{h} query heads of size {d} cannot read {kv_heads} KV heads of size {dk}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"block_tables must be [B, max_blocks] and seq_lens [B] for B={b} (got "
                         f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)})")
    if max_len is None:
        max_len = int(seq_lens.max()) if b else 1
    nblocks = min(-(-max_len // block_size), block_tables.shape[1])
    span = nblocks * block_size
    # Entries past a row's blocks may hold anything: clamped into the pool, read, then masked.
    tables = block_tables[:, :nblocks].long().clamp(0, k_cache.shape[0] - 1)
    keys = k_cache[tables].view(b, span, kv_heads, d)
    vals = v_cache[tables].view(b, span, kv_heads, d)
    lens = seq_lens.long()[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    ok = j < lens
    if window is not None:
        ok = ok & (j >= lens - window)
    scale = scale if scale is not None else d ** -0.5
    o = _attend(q.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2), ok[:, None, None, :], scale, softcap)
    return o.squeeze(2)


def _wants_kernel(q: torch.Tensor) -> bool:
    return q.is_cuda and os.environ.get("BITDELTA_PAGED_ATTENTION", "auto") != "torch"


def _kernel_after_trial(q, k_cache, v_cache, block_tables, seq_lens, scale, window, softcap, max_len):
    """The Triton kernel if it runs on these inputs and agrees with the PyTorch path, else None (asked once per
    configuration, on the first real call, which the engine makes eagerly before any graph capture)."""
    from bitdelta.ops import triton_available

    if not triton_available():
        return None
    from bitdelta.ops.paged_attention import paged_decode_attention_triton as kernel

    try:
        got = kernel(q, k_cache, v_cache, block_tables, seq_lens, scale=scale, window=window, softcap=softcap,
                     max_seq_len=max_len)
    except Exception as e:  # noqa: BLE001 - any failure (a compile error included) means: use the PyTorch path
        logger.warning("the paged decode-attention kernel does not run here (%s); attention uses PyTorch", e)
        return None
    want = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=scale, window=window,
                                  softcap=softcap, max_len=max_len)
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30))
    if not err < TRIAL_REL_ERROR:
        logger.warning("the paged decode-attention kernel is %.2g away from the PyTorch path; attention uses "
                       "PyTorch", err)
        return None
    return kernel


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, *, scale: float | None = None, window: int | None = None,
                     softcap: float | None = None, max_len: int | None = None) -> torch.Tensor:
    """:func:`paged_decode_attention`'s result, by the Triton kernel on CUDA where its trial passed."""
    if _wants_kernel(q):
        key = (str(q.device), q.dtype, q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], window, softcap)
        if key not in _KERNELS:
            _KERNELS[key] = _kernel_after_trial(q, k_cache, v_cache, block_tables, seq_lens, scale, window, softcap,
                                                max_len)
        kernel = _KERNELS[key]
        if kernel is not None:
            return kernel(q, k_cache, v_cache, block_tables, seq_lens, scale=scale, window=window, softcap=softcap,
                          max_seq_len=max_len)
    return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=scale, window=window,
                                  softcap=softcap, max_len=max_len)
