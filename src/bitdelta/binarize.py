"""The BitDelta method on one matrix: signs, scales, residual bit planes, and reconstruction.

For ``delta`` (out × in), plane p of ``bits`` is ``R_p ≈ scale_p ⊙ sign(R_p)`` with
``R_0 = delta`` and ``R_{p+1} = R_p − scale_p ⊙ sign(R_p)``. sign(x) is +1 where x > 0 and −1
where x ≤ 0. Scales start at the mean absolute value of what they multiply:

- ``scalar``: one value per plane, ``mean |R_p|``
- ``row``: one per output row i, ``mean_j |R_p[i, j]|``
- ``col``: one per input column j, ``mean_i |R_p[i, j]|``

(the scale tensor's shape for each mode: :func:`bitdelta.scale_modes.scale_shape`).

    sign, scale = binarize(w_ft.float() - w_base.float(), mode="row", bits=2)
    approx = reconstruct(sign, scale, w_base.shape[1], "row")   # float32 out × in
"""

from __future__ import annotations

import torch

from .pack import pack_signs, unpack_signs
from .scale_modes import MATRIX_MODES, ScaleMode, matrix_mode

SCALE_MODES = tuple(m.value for m in MATRIX_MODES)  # the modes a matrix can have, as strings


def check_mode(mode) -> ScaleMode:
    """``mode`` as a :class:`ScaleMode` a matrix can have; ``ValueError`` otherwise."""
    return matrix_mode(mode)


def _initial_scale(magnitude: torch.Tensor, mode: ScaleMode) -> torch.Tensor:
    if mode is ScaleMode.SCALAR:
        return magnitude.mean()
    if mode is ScaleMode.ROW:
        return magnitude.mean(dim=1)
    return magnitude.mean(dim=0)


def expand_scale(scale: torch.Tensor, mode) -> torch.Tensor:
    """Shapes one plane's scale to broadcast against an out × in matrix."""
    if mode == ScaleMode.ROW:
        return scale[:, None]
    if mode == ScaleMode.COL:
        return scale[None, :]
    return scale


def binarize(delta: torch.Tensor, mode: str | ScaleMode, bits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Compresses a float matrix ``delta`` [out, in] into ``bits`` sign planes and scales.

    Returns:
        sign: uint8 ``[bits, out, ceil(in/8)]`` (pack.py layout); scale: float32 ``[bits]``,
        ``[bits, out]`` or ``[bits, in]`` for scalar, row and col.
    """
    mode = check_mode(mode)
    if bits < 1:
        raise ValueError(f"bits must be at least 1, got {bits}")
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(delta.shape)}")
    residual = delta.float()
    signs, scales = [], []
    for plane in range(bits):
        positive = residual > 0
        scale = _initial_scale(residual.abs(), mode)
        signs.append(pack_signs(positive))
        scales.append(scale)
        if plane + 1 < bits:
            step = expand_scale(scale, mode) * (positive.float() * 2 - 1)
            residual = residual - step
    return torch.stack(signs), torch.stack(scales).float()


def reconstruct(sign: torch.Tensor, scale: torch.Tensor, in_features: int, mode: str) -> torch.Tensor:
    """Dense float32 Δ̂ = Σ_p scale_p ⊙ S_p from packed planes (the inverse of :func:`binarize`)."""
    total = None
    for p in range(sign.shape[0]):
        term = expand_scale(scale[p].float(), mode) * unpack_signs(sign[p], in_features)
        total = term if total is None else total + term
    return total

