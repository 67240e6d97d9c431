"""``benchmarks/fp8_gemv.py`` on the CPU: ``--smoke`` runs every step (checks, timings, sweep, table) on
tiny shapes under Triton's interpreter; the table and the 7B-layer sums from a made-up result."""

from __future__ import annotations

import json

import pytest

from benchmarks import fp8_gemv


@pytest.mark.slow  # the benchmark's smoke run, in the interpreter
def test_smoke_run_checks_and_times_every_shape(tmp_path, capsys):
    out = tmp_path / "fp8_gemv.json"
    result = fp8_gemv.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert [(r["n"], r["k"], r["m"]) for r in rows] == [(n, k, m) for n, k in fp8_gemv.SMOKE_SHAPES
                                                       for m in fp8_gemv.SMOKE_ROWS]
    for r in rows:
        assert r["check_bf16_units"] <= 1 and r["gemv_us"] > 0 and r["bf16_us"] > 0
        assert r["scaled_mm_us"] is None  # no FP8 GEMM on a CPU
        assert r["bytes"] == r["n"] * r["k"] + 4 * r["n"] + 2 * r["m"] * (r["k"] + r["n"])
        assert r["sweep"] and all(e["check_bf16_units"] <= 1 and e["us"] > 0 for e in r["sweep"])
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(fp8_gemv.markdown(result).rstrip())  # the table comes last


def test_table_and_layer_sums():
    def row(n, k, m, us):
        return {"n": n, "k": k, "m": m, "gemv_us": us, "scaled_mm_us": 2 * us, "bf16_us": 1.5 * us,
                "roofline_us": 0.8 * us, "pct_roofline": 80.0, "best": None}

    rows = [row(n, k, m, float(n * k) / 1e6) for (n, k) in fp8_gemv.LAYER_7B for m in (1, 8)]
    rows.append(row(8192, 8192, 1, 14.0))  # a 70B matrix: no 7B layer sum for it
    result = {"meta": {"device": "H200", "torch": "2.x", "copy_gbps": 4000.0, "date": "2026-12-02"}, "rows": rows}
    sums = fp8_gemv.layer_sums(result)
    assert [s["m"] for s in sums] == [1, 8]
    want = sum(c * n * k / 1e6 for (n, k), c in fp8_gemv.LAYER_7B.items())
    assert sums[0]["gemv_us"] == pytest.approx(want) and sums[0]["scaled_mm_us"] == pytest.approx(2 * want)
    md = fp8_gemv.markdown(result)
    assert md.count("\n| 4096x4096 |") == 2 and "| 8192x8192 | 1 | 14.0 | 80 | 28.0 | 21.0 | 1.50x | 2.00x |" in md
    assert "One 7B decoder layer" in md
