"""What every kernel launcher in :mod:`bitdelta.ops` asks: whether Triton runs in its interpreter
(``TRITON_INTERPRET=1``, the CPU tests' way of running the kernels) and the grid and tile arithmetic,
as plain ints: ``triton.cdiv`` / ``triton.next_power_of_2`` go through constexpr unwrapping on the
host, several calls per module per decode step.

    if x.is_cuda or interpreting(): ...
    grid = (cdiv(n, block),); pad = next_pow2(d)
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (read at call time: a test may set it first)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
