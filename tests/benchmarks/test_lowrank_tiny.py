"""benchmarks/lowrank_tiny.py: its synthetic hard pair really has a delta of a strong low-rank part
plus noise, its variants compare equal bytes, and the fidelity benchmark runs the low-rank variant."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from benchmarks.fidelity.variants import BUILDS, VARIANTS
from benchmarks.lowrank_tiny import VARIANTS as TINY_VARIANTS
from benchmarks.lowrank_tiny import make_hard_pair, table


def test_the_hard_pair_moves_every_matrix_mostly_along_a_few_directions(tmp_path):
    base_dir, ft_dir = make_hard_pair(tmp_path, rank=8, seed=0)
    base, ft = load_file(f"{base_dir}/model.safetensors"), load_file(f"{ft_dir}/model.safetensors")
    matrices = [k for k in base if base[k].dim() == 2 and "embed" not in k]
    assert len(matrices) == 4 * 7
    for key in matrices:
        s = torch.linalg.svdvals(ft[key] - base[key])
        assert float((s[:8] ** 2).sum() / (s ** 2).sum()) > 0.9, key
    assert all(torch.equal(ft[k], base[k]) for k in base if k not in matrices)


def test_variants_and_table():
    assert TINY_VARIANTS["2 bits"] == {"bits": 2} and TINY_VARIANTS["1 bit + low-rank (budget 1.0)"] == {
        "lowrank_budget": 1.0}
    assert "scalar-lowrank" in VARIANTS and BUILDS["scalar-lowrank"].compress.lowrank_budget == 1.0
    row = {"pair": "hard", "variant": "2 bits", "distill": "no", "bytes": 1234, "ppl": 5.0, "recovery": 0.5,
           "kl": 0.25, "top1": 0.125}
    assert table([row]).splitlines()[-1] == "| hard | 2 bits | no | 1,234 | 5.00 | 50.0% | 0.2500 | 12.5% |"
