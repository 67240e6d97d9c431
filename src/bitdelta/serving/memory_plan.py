"""How much KV cache the engine's device memory holds, in blocks of the paged cache.

On CUDA, when ``--kv-cache-mb`` is not given, the cache takes what is free once the base and the
delta pool are allocated, less a headroom the cache must not take: the activations of a step
(``max_step_tokens`` rows through every layer, the logits of up to ``max_batch`` rows in float32),
the private pool of the captured CUDA graphs, cuBLAS and Triton workspaces and the allocator's
fragmentation. These grow with the GPU and the model, hence a share of the device
(:data:`HEADROOM_FRACTION` of its total memory); a fixed :data:`HEADROOM_FIXED_BYTES` on top covers
the CUDA context's and kernels' own needs, which do not shrink with a small GPU. The user's
``--max-model-len`` is kept; the budget becomes blocks of the paged cache
(:mod:`bitdelta.serving.kv_cache`), shared by every running sequence as it grows, so ``max_batch``
is a cap on concurrent sequences, not a reservation of ``max_batch x max_len`` positions. The pool
must hold at least one sequence of the whole context. On CPU the cache is :data:`CPU_KV_CACHE_BYTES`
unless given. Pure arithmetic: tested with made-up memory figures, no GPU needed.

    budget = kv_budget_from_free(free_bytes, total_bytes)            # CUDA, no --kv-cache-mb
    num_blocks = kv_blocks_that_fit(budget, per_block_bytes, blocks_per_sequence=256, max_len=4096)
"""

from __future__ import annotations

from ..errors import ConfigError

HEADROOM_FRACTION = 0.10
HEADROOM_FIXED_BYTES = 512 * 2**20
CPU_KV_CACHE_BYTES = 1024 * 2**20


def kv_budget_from_free(free_bytes: int, total_bytes: int, gpu_memory_fraction: float = 1 - HEADROOM_FRACTION,
                        fixed_headroom: int = HEADROOM_FIXED_BYTES) -> int:
    """Bytes the KV cache may take out of ``free_bytes`` (free device memory after the base and the
    delta pool): all of it less ``(1 - gpu_memory_fraction)`` of the device's ``total_bytes`` and
    ``fixed_headroom``; never negative."""
    headroom = (1 - gpu_memory_fraction) * total_bytes + fixed_headroom
    return max(0, int(free_bytes - headroom))


def kv_blocks_that_fit(budget_bytes: int, per_block_bytes: int, blocks_per_sequence: int, max_len: int,
                       sized_from_free: bool = False) -> int:
    """Allocatable blocks of a paged KV cache of ``budget_bytes`` (the cache's one scratch block comes
    on top: a block out of thousands, within the headroom). Raises :class:`~bitdelta.errors.ConfigError`
    naming the flags to change when the pool cannot hold one sequence of ``max_len`` tokens
    (``blocks_per_sequence`` blocks): a lone sequence must always be able to run to the end of its
    context."""
    blocks = budget_bytes // per_block_bytes
    if blocks >= blocks_per_sequence:
        return int(blocks)
    need, have = blocks_per_sequence * per_block_bytes / 2**20, budget_bytes / 2**20
    if sized_from_free:
        raise ConfigError(f"the free GPU memory left after the base and the delta pool ({have:.0f} MiB past the "
                          f"headroom) holds no sequence of {max_len} tokens ({need:.1f} MiB); lower "
                          "--max-model-len or --max-gpu-deltas, quantize the base (--base-quant int8), or set "
                          "--kv-cache-mb")
    raise ConfigError(f"the KV cache budget ({have:.0f} MiB) holds no sequence of {max_len} tokens ({need:.1f} MiB); "
                      "raise --kv-cache-mb or lower --max-model-len")
