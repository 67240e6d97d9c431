"""benchmarks/ncu_decode.py (the kernel launch profiled under Nsight Compute) runs and checks
itself against the reference for every GEMV variant, on CPU under the Triton interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ncu_decode.py"


@pytest.mark.slow  # the profiling script in a subprocess, three times
@pytest.mark.parametrize("gemv", [0, 1, 2])
def test_ncu_decode_script_matches_reference(gemv):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--batch", "3", "--k", "96", "--n", "40",
                           "--gemv", str(gemv)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"GEMV={gemv} B=3 96->40: rel err vs reference" in proc.stdout
