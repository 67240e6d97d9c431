"""``benchmarks/quant_serve.py`` end to end on the CPU (tiny shapes, the real engine and registration):
both parts measured for every N, the FP8 base counted at its quantized size, and the memory
arithmetic behind "the largest N that fits" equal to what the delta pool really allocates."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import quant_serve
from benchmarks._common import SMOKE, BenchDevice, RunLog


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant-serve") / "result.json"
    returned = quant_serve.main(["--smoke", "--out", str(out)])
    return returned, json.loads(out.read_text())


@pytest.mark.slow  # the benchmark's smoke run
def test_smoke_run_measures_both_parts_for_every_n(smoke, capsys):
    returned, result = smoke
    assert result["runs"] and len(result["runs"]) == len(returned["runs"])
    runs = {(r["part"], r["base"], r["n"]): r for r in result["runs"]}
    want = [("7b", "bf16", 1), ("7b", "bf16", 2), ("7b", "fp8", 1), ("7b", "fp8", 2), ("70b", "fp8", 1),
            ("70b", "fp8", 2), ("70b", "fp8", 4)]  # 70b: N = 1, 2, then the largest that fits (4 on a CPU)
    assert sorted(runs) == sorted(want)
    bases = {(b["part"], b["base"]): b for b in result["bases"]}
    for key, r in runs.items():
        assert r["tokens"] == r["n"] * result["meta"]["new_tokens"] and r["tok_s"] > 0, key
        assert r["ttft_ms_p50"] > 0 and r["tpot_ms_p50"] > 0 and r["kv_cache_bytes"] > 0, key
        assert 0 < r["roofline"]["pct"] < 100, key
        assert r["delta_bytes"] == r["n"] * bases[key[:2]]["slot_bytes"], key
    assert runs["70b", "fp8", 4]["is_largest_fit"]
    # the FP8 base is counted at its stored size: a byte per weight (+ scales) against float32's four
    assert bases["7b", "fp8"]["base_bytes"] < 0.5 * bases["7b", "bf16"]["base_bytes"]
    assert bases["7b", "fp8"]["ways"] == {"dequantize": 2 * 7} and bases["7b", "bf16"]["ways"] == {}


@pytest.mark.slow  # the benchmark's smoke run
def test_markdown_table_has_a_row_per_run(smoke):
    _, result = smoke
    md = quant_serve.markdown(result)
    rows = [line for line in md.splitlines() if line.startswith(("| 7b", "| 70b"))]
    assert len(rows) == len(result["runs"])
    assert "| 70b | fp8 | 4 (max fit) |" in md and "largest N that fits = 4" in md


def test_slot_arithmetic_matches_the_allocated_pool_and_tenants_get_their_own_bits():
    run = quant_serve.BenchRun(quant_serve.build_parser().parse_args(["--smoke"]), BenchDevice("cpu"), RunLog(),
                               float("inf"), {})
    model = quant_serve.build_quantized_base(dict(SMOKE), "fp8", torch.float32, "cpu")
    slots, names = quant_serve.install_tenants(run, model, 3)
    try:
        allocated = sum(v.numel() * v.element_size() for p in slots.pools.values() for v in p.values()
                        if isinstance(v, torch.Tensor))
        allocated += sum(t.numel() * t.element_size() for t in slots.tables.values())
        per_slot = quant_serve.slot_bytes(model)
        tables_base_row = sum(p.numel() * p.element_size() for p in model.params1d.values())  # row 0: the base's
        assert allocated == 3 * per_slot + tables_base_row
        assert [slots.get(n).slot for n in names] == [0, 1, 2]
        signs = slots.pools["model.layers.0.mlp.up_proj"]["signs"]
        assert not torch.equal(signs[0], signs[1]) and not torch.equal(signs[1], signs[2])
    finally:
        quant_serve.release(run, slots)
