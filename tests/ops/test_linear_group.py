"""bitdelta.ops.bitdelta_linear_group on the CPU: matrices that read the same input, called as one,
give each matrix's own result in its columns (the reference, member by member), whatever the mode;
malformed groups are refused with what to fix. (The grouped binary tensor-core path: test_cuda_popc.)"""

import pytest
import torch
from _inputs import make_inputs

from bitdelta.ops import bitdelta_linear_group
from bitdelta.ops import reference as ref


def _group(t, widths, k, mode, dtype=torch.float32, seed=0):
    x = ids = None
    ws, members = [], []
    for j, n in enumerate(widths):
        xj, w, _, signs, sc, idj = make_inputs(t, n, k, 3, 2, mode, dtype, seed=seed + 7 * j, bias=False)
        x = xj if x is None else x
        ids = idj if ids is None else ids
        ws.append(w)
        members.append((signs, sc))
    return x, torch.cat(ws), members, ids


@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
def test_group_is_the_members_side_by_side(mode):
    widths = [13, 5, 5]
    x, w, members, ids = _group(6, widths, 37, mode)
    got = bitdelta_linear_group(x, w, members, mode, ids, backend="torch")
    assert got.shape == (6, sum(widths))
    at = 0
    for part, (signs, sc) in zip(w.split(widths), members):
        want = ref.bitdelta_linear_ref(x, part, None, signs, sc, mode, ids)
        torch.testing.assert_close(got[:, at:at + part.shape[0]], want, rtol=1e-6, atol=1e-6)
        at += part.shape[0]
    # a member's delta lands in its own columns only: changing one member's signs moves only those
    flipped = [(members[0][0], members[0][1]), (255 - members[1][0], members[1][1]), members[2]]
    moved = bitdelta_linear_group(x, w, flipped, mode, ids, backend="torch") != got
    assert not moved[:, :13].any() and not moved[:, 18:].any() and moved[ids >= 0][:, 13:18].any()


def test_malformed_groups_are_refused():
    x, w, members, ids = _group(4, [8, 4], 24, "row")
    with pytest.raises(ValueError, match=r"output sizes \[8, 4\] must add up to the stacked weight's rows \(11\)"):
        bitdelta_linear_group(x, w[:11], members, "row", ids, backend="torch")
    with pytest.raises(ValueError, match="must add up"):
        bitdelta_linear_group(x, w, [], "row", ids, backend="torch")
    with pytest.raises(ValueError, match="scales for mode 'row'"):
        bitdelta_linear_group(x, w, [members[0], (members[1][0], members[1][1][:, :, :3])], "row", ids,
                              backend="torch")
    with pytest.raises(ValueError, match="ids must be"):
        bitdelta_linear_group(x, w, members, "row", ids[:2], backend="torch")
