"""Reading many safetensors tensors at once: straight into (pinned) host buffers, over a few threads.

A server loading a delta reads every tensor of the artifact, then copies them to the GPU. The
copy is asynchronous only from page-locked ("pinned") host memory, so reading into ordinary memory
and copying into pinned buffers afterwards costs a second pass over the bytes (and the page faults
of the first). Here the destination is pinned from the start: tensors are grouped into blocks of
at most :data:`BLOCK_BYTES` (in file order, so one block is one mostly contiguous stretch of the
file), each block is one allocation, and each tensor is a view into its block. Threads take whole
blocks: while one thread waits for its allocation (page-locking memory is slow) or for the disk,
the others read, so allocation overlaps the reads and a fast disk sees several requests at once.

Blocks of one size class are what PyTorch's pinned-memory cache hands back: once a delta's host
copy is evicted its blocks serve the next delta's load without a new allocation. Without ``pin``
each tensor gets its own ordinary allocation (as :func:`~bitdelta.safetensors_io.read_tensor`), so
a tensor kept alone never keeps a block of its neighbours alive.

Sizes, offsets and dtypes are the header's, already validated by
:func:`~bitdelta.safetensors_io.read_header`; a file shorter than its header says fails with the
same :class:`~bitdelta.errors.FormatError` as a single read.

    tensors = read_tensors([ckpt.entries[k] for k in keys], threads=4, pin=True)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from .safetensors_io import TensorEntry, as_tensor, read_into

BLOCK_BYTES = 64 << 20  # one pinned allocation; a power of two, so freed blocks are reused as they are
ALIGN = 64  # every tensor starts 64-byte aligned in its block (any dtype's view is valid, cache lines whole)


def plan_blocks(sizes: list[int], block_bytes: int) -> list[list[tuple[int, int]]]:
    """Groups tensor ``sizes`` (bytes, in reading order) into blocks: per block, ``(index, offset)``
    of each tensor it holds. A tensor larger than ``block_bytes`` gets a block of its own;
    ``block_bytes == 0`` gives every tensor its own block."""
    blocks: list[list[tuple[int, int]]] = []
    used = block_bytes  # no open block yet
    for i, n in enumerate(sizes):
        start = -(-used // ALIGN) * ALIGN
        if not blocks or start + n > block_bytes:
            blocks.append([])
            start = 0
        blocks[-1].append((i, start))
        used = start + n
    return blocks


def read_tensors(entries: list[TensorEntry], threads: int = 1, pin: bool = False,
                 block_bytes: int | None = None) -> list[torch.Tensor]:
    """Every entry's tensor (CPU; page-locked when ``pin``), in the order given, read by up to
    ``threads`` threads. ``block_bytes``: the block size (default :data:`BLOCK_BYTES` when pinned,
    else 0: a block per tensor). Raises :class:`~bitdelta.errors.FormatError` for a file cut short."""
    sizes = [e.end - e.start for e in entries]
    if block_bytes is None:
        block_bytes = BLOCK_BYTES if pin else 0
    blocks = plan_blocks(sizes, block_bytes)
    out: list[torch.Tensor | None] = [None] * len(entries)

    def read_block(block: list[tuple[int, int]]) -> None:
        last, off = block[-1]
        buf = torch.empty(off + sizes[last], dtype=torch.uint8, pin_memory=pin)
        for i, start in block:
            flat = buf[start:start + sizes[i]]
            read_into(entries[i], flat)
            out[i] = as_tensor(entries[i], flat)

    workers = max(1, min(threads, len(blocks)))
    if workers == 1:
        for block in blocks:
            read_block(block)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="bitdelta-read") as pool:
            for f in [pool.submit(read_block, b) for b in blocks]:
                f.result()  # the first failure is raised (the others finish first: no read is left running)
    return out
