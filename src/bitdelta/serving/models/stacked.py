"""Projections that read the same input, run as one matrix: a layer's q, k and v, and its gate and up.

Why: in a decode step each matrix product is a GEMV whose speed grows with the matrix (one launch
over 12288 rows keeps an H200 busier than three over 4096), and on the delta path each matrix
also quantises the input, launches its own kernels and adds its delta term separately. Stacked,
q, k and v cost one base GEMM, one input quantisation, a delta launch per matrix and one add
(:func:`bitdelta.ops.bitdelta_linear_group`), where three separate calls cost three of each.

How: when the model is built, the members' base matrices are copied into one ``[N_1 + N_2 + ...,
K]`` tensor, one group at a time, and each member's weight becomes a view of its rows (the checkpoint
dict passed in gets the views too, so the separate copies are freed as the build goes: no second
copy of the weights stays). Module names, checkpoint names and delta pools stay per member, so delta
artifacts, slots and validation see the same ``q_proj``/``k_proj``/``v_proj`` as before. A step
without deltas runs one GEMM over the stack; a step with deltas goes through the dispatch's
``linear_group`` (the grouped op on decode steps; per-member calls, side by side, otherwise).

Which: members that are plain :class:`~bitdelta.serving.models.common.TenantLinear` s of one dtype,
device and input size, without a bias (a bias may carry per-tenant deltas, which the per-member
path adds). Quantized bases (INT8/FP8 weights) keep their members apart. Env
``BITDELTA_STACKED_PROJECTIONS=0`` keeps every projection apart (for comparisons).

    qkv = stack_projections([attn.q_proj, attn.k_proj, attn.v_proj], tensors)  # None: not stackable
    y = qkv(x, step)                              # [T, Nq + Nk + Nv], then split as a fused qkv_proj
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

STACKED_ENV = "BITDELTA_STACKED_PROJECTIONS"


def stacking_on() -> bool:
    """Whether models built now stack their projections: env ``BITDELTA_STACKED_PROJECTIONS`` ``1``
    (the default) or ``0``."""
    choice = os.environ.get(STACKED_ENV, "1").strip().lower() or "1"
    if choice not in ("0", "1"):
        raise ValueError(f"{STACKED_ENV} must be 1 or 0 (got {choice!r})")
    return choice == "1"


class StackedProjections:
    """Members (``TenantLinear`` s) whose weights are consecutive rows of one stacked matrix.

    Not an ``nn.Module``: the members stay the modules of the tree (their names are the
    checkpoint's); this object only holds the stacked tensor they view and calls it."""

    def __init__(self, members: list, weight: torch.Tensor):
        self.members = members
        self.names = [m.name for m in members]
        self.weight = weight  # [N_1 + N_2 + ..., K]; member i's weight is a view of its rows

    def __call__(self, x: torch.Tensor, step) -> torch.Tensor:
        """``[T, N_1 + N_2 + ...]``: the members' outputs side by side."""
        if not step.per_tenant:
            return F.linear(x, self.weight)
        group = getattr(step.deltas, "linear_group", None)
        if group is None:  # a dispatch without the grouped op: the members one by one
            return torch.cat([m(x, step) for m in self.members], dim=-1)
        return group(self.names, x, self.weight, step.batch)


def stackable(members: list) -> bool:
    """Whether ``members`` can share one stacked matrix (see the module docstring: which)."""
    from .common import TenantLinear

    if len(members) < 2 or not all(type(m) is TenantLinear and m.bias is None for m in members):
        return False
    w0 = members[0].weight
    return all(m.weight.dtype == w0.dtype and m.weight.device == w0.device and m.weight.dim() == 2
               and m.weight.shape[1] == w0.shape[1] for m in members)


@torch.no_grad()
def stack_projections(members: list, tensors: dict | None = None) -> StackedProjections | None:
    """Stacks ``members``' weights into one matrix and makes each weight a view of its rows;
    ``tensors`` (checkpoint name -> tensor), when given, gets the views in place of the originals so
    that those are freed. Returns None (members untouched) when they cannot be stacked or stacking
    is switched off."""
    if not stacking_on() or not stackable(members):
        return None
    from .common import _frozen

    stacked = torch.cat([m.weight.data for m in members])
    at = 0
    for m in members:
        n = m.weight.shape[0]
        view = stacked[at:at + n]
        m.weight = _frozen(view)
        if tensors is not None and f"{m.name}.weight" in tensors:
            tensors[f"{m.name}.weight"] = view
        at += n
    return StackedProjections(members, stacked)
