"""A prefill step's segment table known on the host, so the segmented op launches without a device sync.

The segmented op (:func:`bitdelta.ops.triton_ops.bitdelta_segmented`) splits its rows by segment
length (long segments to cuBLAS against an expanded ``W + Δ̂``, short ones to the fused GEMM) and
maps each program of the fused GEMM to a (segment, first row) pair. From device tensors alone that
costs two host reads per call (each waits for the GPU to drain) and a dozen small kernels; a
serving step calls the op for every matrix of every layer with the same segments. The caller that
built the segments on the host (the serving engine's step plan) passes a :class:`SegmentTable`
instead: the split is decided on the host, and the fused GEMM's block map is uploaded once per
step and tile height, then reused by every module.

    table = SegmentTable([0, 128, 640], [3, -1])
    y = bitdelta_linear_segmented(x, w, None, signs, scales, "row", starts, ids, table=table)
"""

from __future__ import annotations

import torch


class SegmentTable:
    """Segment starts (``S + 1`` row offsets, non-decreasing, from 0) and tenant ids (``S``, -1 =
    base only) as host lists, with device block maps cached per (tile height, long-segment rule)."""

    def __init__(self, starts: list[int], ids: list[int]):
        if len(starts) != len(ids) + 1 or (starts and starts[0] != 0):
            raise ValueError(f"a segment table needs len(ids) + 1 starts from 0 (got {len(starts)} starts, "
                             f"{len(ids)} ids)")
        if any(b < a for a, b in zip(starts, starts[1:])):
            raise ValueError("segment starts must not decrease")
        self.starts, self.ids = [int(s) for s in starts], [int(i) for i in ids]
        self._blocks: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}

    @property
    def num_rows(self) -> int:
        return self.starts[-1] if self.starts else 0

    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]

    def long_segments(self, expand_min: int) -> list[int]:
        """Indices of the segments with at least ``expand_min`` rows (none when ``expand_min`` is 0)."""
        if expand_min <= 0:
            return []
        return [i for i, n in enumerate(self.lengths()) if n >= expand_min]

    def longest_short(self, expand_min: int) -> int:
        """The most rows of a segment the fused GEMM computes (0 when every segment is long)."""
        skip = set(self.long_segments(expand_min))
        return max((n for i, n in enumerate(self.lengths()) if i not in skip), default=0)

    def blocks(self, bm: int, expand_min: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The fused GEMM's program map: ``blk_seg`` and ``blk_m0`` (int32, one entry per program:
        its segment and first row) and the program count, for segments shorter than ``expand_min``
        (all when 0); computed on the host, copied to ``device`` once per key."""
        key = (bm, expand_min, str(device))
        got = self._blocks.get(key)
        if got is not None:
            return got
        skip = set(self.long_segments(expand_min))
        seg, m0 = [], []
        for i, (a, b) in enumerate(zip(self.starts, self.starts[1:])):
            if i in skip:
                continue
            for row in range(a, b, bm):
                seg.append(i)
                m0.append(row)
        if not seg:  # every segment long (or empty): one idle program keeps the shapes valid
            seg, m0 = [-1], [0]
        host = torch.tensor([seg, m0], dtype=torch.int32)
        dev = torch.device(device)
        on = host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host.to(dev)
        got = self._blocks[key] = (on[0], on[1], len(seg))
        return got
