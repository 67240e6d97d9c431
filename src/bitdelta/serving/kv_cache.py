"""The paged key/value cache: fixed-size blocks of token positions, handed to sequences as they grow.

Each layer's keys (and values) are one pool ``[num_blocks + 1, block_size, kv_heads, head_dim]``; a
running sequence owns a *block table*, the list of block ids that hold its positions in order
(position ``p`` lives in block ``table[p // block_size]`` at offset ``p % block_size``). So the cache
spends memory on the tokens sequences have, not on ``max_batch x max_len`` reserved positions, as
vLLM's PagedAttention does. The extra last block is scratch: never handed out, it is where padding
rows of a captured decode graph write and what unused block-table entries point at.

Sequences are named by a *sequence slot* ``0 .. max_batch - 1`` (the engine's ``kv_slot``: a graph
row, a penalty-table row); blocks are taken from a free list (:class:`BlockAllocator`) on demand.

    kv = KVCache(num_layers, max_batch, max_len, kv_heads, head_dim, dtype, device, num_blocks=1024)
    kv.ensure(slot, length)          # blocks for positions [0, length) of that slot; False: pool empty
    kv.flat_index(slot, positions)   # where each position sits in the [blocks * block_size] view
    kv.release(slot)                 # its blocks back to the free list
"""

from __future__ import annotations

import heapq

import torch

DEFAULT_BLOCK_SIZE = 16


class BlockAllocator:
    """A free list of block ids ``0 .. num_blocks - 1``; the lowest free ids are handed out first
    (which keeps the used part of the pool compact, and runs reproducible)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a KV block pool needs at least one block (got {num_blocks})")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a min-heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` block ids, or None (and nothing taken) when fewer than ``n`` are free."""
        if n > len(self._free):
            return None
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block {b} is not in this pool (0 .. {self.num_blocks - 1})")
            heapq.heappush(self._free, b)

    def reset(self) -> None:
        self._free = list(range(self.num_blocks))


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` positions."""
    return -(-tokens // block_size)


class KVCache:
    """Paged key/value cache: per layer ``k, v`` of ``[num_blocks + 1, block_size, kv_heads, head_dim]``
    (the last block scratch), a block allocator, and a block table per sequence slot.

    ``num_blocks`` defaults to what ``max_batch`` sequences of ``max_len`` tokens need (the size of
    the slotted cache this one replaced); the engine sizes it from its byte budget instead
    (:meth:`blocks_in_budget`).
    """

    def __init__(self, num_layers, max_batch, max_len, kv_heads, head_dim, dtype, device, *,
                 num_blocks: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size < 1:
            raise ValueError(f"the KV block size must be at least 1 (got {block_size})")
        self.block_size, self.max_batch, self.max_len = block_size, max_batch, max_len
        self.max_blocks = blocks_for(max_len, block_size)  # block-table width: one sequence of max_len
        if num_blocks is None:
            num_blocks = max_batch * self.max_blocks
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)
        self.scratch = num_blocks  # the padding block, past every allocatable id
        shape = (num_layers, num_blocks + 1, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tables: list[list[int]] = [[] for _ in range(max_batch)]
        # The same tables as one host tensor, rows padded with the scratch block and kept in step with
        # the lists, so that a step's block tables are a slice, not a Python loop over every entry.
        self.host_tables = torch.full((max_batch, self.max_blocks), self.scratch, dtype=torch.int32)

    # ------------------------------------------------------------------ sizing

    @staticmethod
    def bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype) -> int:
        """Bytes of one block's keys and values over every layer."""
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def bytes_per_sequence(num_layers, max_len, kv_heads, head_dim, dtype, block_size: int = DEFAULT_BLOCK_SIZE
                           ) -> int:
        """Bytes the blocks of one ``max_len``-token sequence take over every layer (a budget of ``n``
        times this holds ``n`` whole sequences)."""
        blocks = blocks_for(max_len, block_size)
        return blocks * KVCache.bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype)

    @staticmethod
    def blocks_in_budget(budget_bytes: int, num_layers, block_size, kv_heads, head_dim, dtype) -> int:
        """Allocatable blocks a budget of ``budget_bytes`` buys (the one scratch block comes on top)."""
        return budget_bytes // KVCache.bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def tokens(self) -> int:
        """Positions the pool holds (all sequences together)."""
        return self.num_blocks * self.block_size

    @property
    def blocks_free(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    # ------------------------------------------------------------------ per sequence

    def missing(self, slot: int, length: int) -> int:
        """Blocks ``slot`` still needs to hold positions ``[0, length)``."""
        return max(0, self.blocks_needed(length) - len(self.tables[slot]))

    def ensure(self, slot: int, length: int) -> bool:
        """Gives ``slot`` the blocks positions ``[0, length)`` need; False (nothing taken) when the
        pool has too few free blocks. Raises ``ValueError`` past ``max_len``."""
        if length > self.max_len:
            raise ValueError(f"position {length - 1} is past the cache's context of {self.max_len} tokens")
        need = self.missing(slot, length)
        if need == 0:
            return True
        got = self.allocator.allocate(need)
        if got is None:
            return False
        held = len(self.tables[slot])
        self.tables[slot].extend(got)
        self.host_tables[slot, held:held + need] = torch.tensor(got, dtype=torch.int32)
        return True

    def release(self, slot: int) -> None:
        """Returns ``slot``'s blocks to the free list."""
        self.allocator.free(self.tables[slot])
        self.tables[slot] = []
        self.host_tables[slot].fill_(self.scratch)

    def reset(self) -> None:
        """Every block free, every table empty, the cache zeroed in place (captured graphs keep pointing at it)."""
        self.allocator.reset()
        self.tables = [[] for _ in range(self.max_batch)]
        self.host_tables.fill_(self.scratch)
        self.k.zero_()
        self.v.zero_()

    def flat_index(self, slot: int, positions) -> list[int]:
        """Each position's row in the ``[(num_blocks + 1) * block_size, kv_heads, head_dim]`` view."""
        table, bs = self.tables[slot], self.block_size
        out = []
        for p in positions:
            b = p // bs
            if b >= len(table):
                raise ValueError(f"sequence slot {slot} holds {len(table)} KV blocks; position {p} needs block {b}")
            out.append(table[b] * bs + p % bs)
        return out

    def table_row(self, slot: int, width: int) -> list[int]:
        """``slot``'s block table padded to ``width`` with the scratch block (read, then masked)."""
        table = self.tables[slot][:width]
        return table + [self.scratch] * (width - len(table))

    @property
    def pad_index(self) -> int:
        """The flat row padding tokens write (the scratch block's first position)."""
        return self.scratch * self.block_size
