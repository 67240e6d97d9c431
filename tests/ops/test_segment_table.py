"""The host segment table of the segmented op: its split into long and short segments and the
fused GEMM's program map, against the device-side map it replaces."""

import pytest
import torch

from bitdelta.ops.segment_table import SegmentTable


def test_block_map_covers_each_short_segment_in_tiles():
    table = SegmentTable([0, 5, 5, 12, 13, 40], [2, 0, -1, 1, 0])
    seg, m0, n = table.blocks(4, 0, "cpu")
    # 5 rows -> 2 tiles, the empty segment none, 7 rows -> 2, 1 row -> 1, 27 rows -> 7
    assert n == 12
    assert seg.tolist() == [0, 0, 2, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert m0.tolist() == [0, 4, 5, 9, 12, 13, 17, 21, 25, 29, 33, 37]
    assert table.blocks(4, 0, "cpu")[0] is seg  # cached per key


def test_long_segments_get_no_programs():
    table = SegmentTable([0, 5, 5, 12, 13, 40], [2, 0, -1, 1, 0])
    assert table.long_segments(7) == [2, 4]
    assert table.long_segments(0) == []
    assert table.longest_short(7) == 5
    seg, m0, n = table.blocks(4, 7, "cpu")
    assert (seg.tolist(), m0.tolist(), n) == ([0, 0, 3], [0, 4, 12], 3)
    # every segment long: one idle program
    assert SegmentTable([0, 8], [1]).blocks(4, 8, "cpu")[0].tolist() == [-1]


def test_matches_the_device_side_block_map():
    """Every (segment, first row) the device-side map gives a program, the host map gives one too."""
    from bitdelta.ops import triton_available

    if not triton_available():
        pytest.skip("the device-side map lives in the Triton module")
    from bitdelta.ops.triton_ops import _block_table

    starts = [0, 3, 3, 40, 41, 100]
    seg, m0, _ = _block_table(torch.tensor(starts, dtype=torch.int32), 100, 16)
    dev = {(s, m) for s, m in zip(seg.tolist(), m0.tolist()) if s >= 0}
    hseg, hm0, _ = SegmentTable(starts, [0, 1, 2, 3, 4]).blocks(16, 0, "cpu")
    assert set(zip(hseg.tolist(), hm0.tolist())) == dev


@pytest.mark.parametrize("starts, ids", [([0, 4], [1, 2]), ([1, 4], [0]), ([0, 5, 3], [0, 1])])
def test_malformed_tables_are_refused(starts, ids):
    with pytest.raises(ValueError):
        SegmentTable(starts, ids)
