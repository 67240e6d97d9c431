"""Scale modes: how many scales a compressed matrix has, and the one table of their tensor shapes.

A matrix ``out × in`` compressed to ``bits`` sign planes has, per plane, one scale (``scalar``, the
paper), one per output row (``row``) or one per input column (``col``). ``auto`` is not a mode a
matrix has: it asks distillation to pick scalar, row or col per matrix (``pipeline.py``).

    scale_shape("row", out_features=4096, in_features=11008, bits=2)   # (2, 4096)
    ScaleMode("col") == "col"                                          # a str: JSON and old callers keep working
"""

from __future__ import annotations

from enum import Enum


class ScaleMode(str, Enum):
    """A scale granularity. Members compare and hash equal to their strings (``ScaleMode.ROW == "row"``)."""

    SCALAR = "scalar"
    ROW = "row"
    COL = "col"
    AUTO = "auto"

    # Plain strings when printed or formatted, as the strings they replace were.
    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @property
    def code(self) -> int:
        """The integer the kernels take as ``MODE`` (scalar 0, row 1, col 2)."""
        if self is ScaleMode.AUTO:
            raise ValueError("'auto' is chosen per matrix by distillation; a kernel sees scalar, row or col")
        return _KERNEL_CODES[self]


# The modes a compressed matrix can have (``auto`` resolves to one of them per matrix).
MATRIX_MODES = (ScaleMode.SCALAR, ScaleMode.ROW, ScaleMode.COL)
_KERNEL_CODES = {ScaleMode.SCALAR: 0, ScaleMode.ROW: 1, ScaleMode.COL: 2}


def matrix_mode(mode) -> ScaleMode:
    """``mode`` as a :class:`ScaleMode` a matrix can have; ``ValueError`` naming the choices otherwise."""
    try:
        value = ScaleMode(mode)
    except ValueError:
        value = None
    if value not in MATRIX_MODES:
        raise ValueError(f"scale mode must be one of {[m.value for m in MATRIX_MODES]}, got {mode!r}")
    return value


def scale_shape(mode, out_features: int, in_features: int, bits: int) -> tuple[int, ...]:
    """Shape of one matrix's scale tensor: ``(bits,)``, ``(bits, out)`` or ``(bits, in)``."""
    mode = matrix_mode(mode)
    if mode is ScaleMode.ROW:
        return (bits, out_features)
    if mode is ScaleMode.COL:
        return (bits, in_features)
    return (bits,)
