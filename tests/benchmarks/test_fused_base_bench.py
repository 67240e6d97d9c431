"""benchmarks/fused_base.py: its smoke run checks every fused kernel against its reference, times each op
fused and unfused, and runs whole decode steps with the switch on and off (CPU, Triton interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import fused_base as bench

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fused_base.py"


@pytest.mark.slow  # the benchmark's smoke run in a subprocess, in the interpreter
def test_smoke_run_checks_times_and_compares_steps(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "fused_base.json").read_text())  # $OUT is where the JSON goes
    checks = {c["check"].split()[0] for c in result["checks"]}
    assert checks == {"add_rms_norm", "rms_norm", "gated_activation", "rope_kv_write"}
    assert all(c["max_abs_err"] < 1e-5 for c in result["checks"])
    assert {(r["op"], r["tokens"]) for r in result["ops"]} == {(op, t) for op in
                                                               ("add + RMSNorm", "RMSNorm", "SiLU(gate) * up",
                                                                "RoPE + KV write") for t in (1, 3)}
    assert {(r["batch"], r["deltas"]) for r in result["steps"]} == {(b, d) for b in (1, 3) for d in (False, True)}
    for r in result["steps"]:  # float32: the switch changes nothing past rounding
        assert r["unfused_us"] > 0 and r["fused_us"] > 0 and r["max_logit_diff"] < 1e-5 * max(1.0, r["logit_scale"])
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| deltas | 3 |")


def test_table_lines():
    op = {"op": "RMSNorm", "tokens": 8, "unfused_us": 12.0, "fused_us": 4.0, "speedup": 3.0}
    step = {"batch": 8, "deltas": True, "unfused_us": 900.0, "fused_us": 600.0, "speedup": 1.5,
            "unfused_kernels": 300, "fused_kernels": 150}
    lines = bench.table({"ops": [op], "steps": [step]}).splitlines()
    assert lines[2] == "| RMSNorm | 8 | 12.0 | 4.0 | 3.00× |"
    assert lines[-1] == "| deltas | 8 | 900 | 600 | 1.50× | 300 → 150 |"
