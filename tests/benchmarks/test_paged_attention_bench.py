"""benchmarks/paged_attention.py: its smoke run checks the kernel against the reference and times every
shape on the CPU under the Triton interpreter; its roofline counts the bytes the kernel must read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import paged_attention as bench

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paged_attention.py"


@pytest.mark.slow  # the benchmark's smoke run in a subprocess, in the interpreter
def test_smoke_run_checks_and_times_every_shape(tmp_path):
    out = tmp_path / "paged.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["checks"] and all(c["max_abs_err"] < 1e-5 for c in result["checks"])
    assert result["meta"]["copy_gbps"] > 0
    shapes = {(r["model"], r["batch"], r["context"]) for r in result["rows"]}
    assert shapes == {(m, b, 100) for m in bench.SMOKE_MODELS for b in (1, 3)}
    assert any(r["copies"] > 1 for r in result["rows"])  # the timed calls rotate through input copies
    for r in result["rows"]:
        assert r["kernel_us"] > 0 and r["reference_us"] > 0 and r["roofline_us"] > 0 and r["max_abs_err"] < 1e-5
    table = proc.stdout.rstrip().splitlines()
    assert table[-len(result["rows"]) - 2].startswith("| model | B | context | splits | kernel µs")
    assert table[-1].startswith("| smoke-window | 3 | 100 | 1 |")


def test_bytes_read_counts_each_visible_key_once():
    model = dict(heads=8, kv_heads=2, dim=64, window=None, softcap=None)
    per_key = 2 * 2 * 64 * 2  # K and V, kv heads, dim, bf16 bytes
    rows = 2 * 8 * 64 * 2  # query and output per row
    assert bench.bytes_read(model, [16, 17], torch.bfloat16) == 33 * per_key + 2 * rows + (1 + 2) * 4
    windowed = dict(model, window=10)
    # 40 keys, the window starts at key 30, inside the page of keys 16..31: those 24 keys are read
    assert bench.bytes_read(windowed, [40], torch.bfloat16) == 24 * per_key + rows + 3 * 4


def test_table_lines():
    row = {"model": "m", "batch": 8, "context": 4096, "splits": 2, "kernel_us": 10.0, "unsplit_us": 15.0,
           "roofline_us": 8.0, "pct_roofline": 80.0}
    lines = bench.table([row, dict(row, reference_us=50.0)]).splitlines()
    assert lines[2] == "| m | 8 | 4096 | 2 | 10.0 | 15.0 | 8.0 | 80.0% | - | - |"
    assert lines[3] == "| m | 8 | 4096 | 2 | 10.0 | 15.0 | 8.0 | 80.0% | 50.0 | 5.0× |"
