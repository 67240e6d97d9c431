import os

import pytest


@pytest.fixture(autouse=True)
def _triton_decode_kernel(monkeypatch):
    """The Triton kernel tests (test_triton_kernels.py) compare against the reference at the
    tolerances of exact arithmetic; on an sm_90 GPU the dispatcher would route their decode calls
    to the popc kernel (int8-quantised input for the delta term), which has its own tests
    (test_cuda_popc.py, which set the variable themselves where they test the routing)."""
    if "BITDELTA_DECODE_KERNEL" not in os.environ:
        monkeypatch.setenv("BITDELTA_DECODE_KERNEL", "triton")
