"""Multi-tenant BitDelta linear ops: one base weight, many 1-bit deltas, each token picks its delta.

Contract (semantics in :mod:`bitdelta.ops.reference`): ``y[t] = x[t] W^T + b + Δ̂_{ids[t]} x[t]``
with ``ids[t] == -1`` meaning base only; fp32 accumulation, output in ``x``'s dtype. Backends:
``torch`` (the reference, also the CPU path) and ``triton`` (CUDA kernels); ``auto`` picks Triton
on CUDA tensors when Triton imports, and ``BITDELTA_BACKEND=torch|triton|auto`` overrides the
argument. Both ops are registered as torch custom ops (``torch.ops.bitdelta.linear`` and
``torch.ops.bitdelta.linear_segmented``) with fake implementations, so ``torch.compile`` traces
them; eager calls on plain tensors skip the custom-op dispatch (see :func:`_direct`). The Triton
decode path does no host sync and can be captured in a CUDA graph.

Decode batches (at most ``DECODE_MAX_TOKENS`` tokens, fp16/bf16) on an sm_90 GPU take the binary
tensor-core kernel of :mod:`bitdelta.ops.cuda_popc` under ``backend="auto"`` (2-3x faster than the
Triton decode kernel on an H200 at 16-64 tenants, docs/benchmarks.md); its delta term multiplies
the input quantised to int8 per 512-column group (error bound in :mod:`bitdelta.ops.bitplane`).
``BITDELTA_DECODE_KERNEL=triton`` keeps the Triton kernel, ``=popc`` asks for the popc kernel on
any GPU it runs on (sm_80+) and for fp32 inputs too, ``=auto`` (the default) is the rule above.

    y = bitdelta_linear(x, w, b, signs, scales, "row", ids)                    # decode / any batch
    y = bitdelta_linear_segmented(x, w, b, signs, scales, "row", starts, seg_ids)  # prefill
    qkv = bitdelta_linear_group(x, w_qkv, [(sq, cq), (sk, ck), (sv, cv)], "row", ids)  # q, k, v as one
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Optional

import torch

from bitdelta.ops.launch import interpreting
from bitdelta.ops.reference import (
    bitdelta_linear_dense64,
    bitdelta_linear_ref,
    bitdelta_linear_segmented_ref,
    check_inputs,
)
from bitdelta.ops.segment_table import SegmentTable

__all__ = [
    "Backend",
    "DECODE_MAX_TOKENS",
    "SegmentTable",
    "bitdelta_linear",
    "bitdelta_linear_group",
    "bitdelta_linear_segmented",
    "bitdelta_linear_ref",
    "bitdelta_linear_segmented_ref",
    "bitdelta_linear_dense64",
    "triton_available",
]


# Batches of at most this many tokens take the Triton decode kernel (no sort, no host sync, CUDA
# graph safe); larger ones are sorted by tenant and run as a segmented GEMM. Callers that know a
# larger batch is one token per sequence (a serving decode step) split it into chunks of this size.
DECODE_MAX_TOKENS = 128


class Backend(str, Enum):
    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"


_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """True when the Triton kernels import (the triton package is installed)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            from bitdelta.ops import triton_ops  # noqa: F401

            _TRITON_OK = True
        except Exception:  # ImportError, or a broken triton install
            _TRITON_OK = False
    return _TRITON_OK


def resolve_backend(backend: str | Backend, x: torch.Tensor) -> Backend:
    """The backend a call runs on: env ``BITDELTA_BACKEND`` > argument; ``auto`` -> Triton on CUDA."""
    choice = os.environ.get("BITDELTA_BACKEND") or backend
    try:
        b = Backend(choice.value if isinstance(choice, Backend) else str(choice).lower())
    except ValueError:
        raise ValueError(f"backend must be one of auto|triton|torch (got {choice!r})") from None
    if b is Backend.AUTO:
        return Backend.TRITON if (x.is_cuda and triton_available()) else Backend.TORCH
    if b is Backend.TRITON:
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; install bitdelta[triton] or use 'torch'")
        if not x.is_cuda and not interpreting():
            raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'torch' on CPU")
    return b


_POPC_OK: dict[int, tuple[bool, bool]] = {}


def _use_popc(x: torch.Tensor, backend) -> bool:
    """Whether a call runs the binary tensor-core decode kernel (module docstring: the rule)."""
    if not x.is_cuda or x.shape[0] > DECODE_MAX_TOKENS:
        return False
    choice = os.environ.get("BITDELTA_DECODE_KERNEL", "auto").lower()
    if choice not in ("auto", "popc", "triton"):
        raise ValueError(f"BITDELTA_DECODE_KERNEL must be auto, popc or triton (got {choice!r})")
    if choice == "triton":
        return False
    asked = os.environ.get("BITDELTA_BACKEND") or backend
    asked = str(asked.value if isinstance(asked, Backend) else asked).lower()
    if asked == "torch" or (choice == "auto" and (asked != "auto" or x.dtype == torch.float32)):
        return False
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    ok = _POPC_OK.get(dev)
    if ok is None:  # once per device: (builds and loads, is sm_90)
        from bitdelta.ops import cuda_popc

        ok = _POPC_OK[dev] = (cuda_popc.available(torch.device("cuda", dev)),
                              torch.cuda.get_device_capability(dev) == (9, 0))
    if choice == "popc":
        if not ok[0]:
            raise RuntimeError("BITDELTA_DECODE_KERNEL=popc but the popc kernel does not build or load on this GPU "
                               "(it needs sm_80+ and the NVRTC library of a CUDA build of torch); unset it")
        return True
    return ok[0] and ok[1]


def _linear_impl(x, weight, bias, signs, scales, mode, ids, backend):
    if _use_popc(x, backend):
        from bitdelta.ops import cuda_popc

        return cuda_popc.bitdelta_decode(x, weight, bias, signs, scales, mode, ids)
    if resolve_backend(backend, x) is Backend.TORCH:
        return bitdelta_linear_ref(x, weight, bias, signs, scales, mode, ids)
    from bitdelta.ops import triton_ops

    return triton_ops.bitdelta_linear(x, weight, bias, signs, scales, mode, ids)


def _segmented_impl(x, weight, bias, signs, scales, mode, seg_starts, seg_ids, backend, table=None):
    if resolve_backend(backend, x) is Backend.TORCH:
        return bitdelta_linear_segmented_ref(x, weight, bias, signs, scales, mode, seg_starts, seg_ids)
    from bitdelta.ops import triton_ops

    return triton_ops.bitdelta_segmented(x, weight, bias, signs, scales, mode, seg_starts, seg_ids, table=table)


try:

    @torch.library.custom_op("bitdelta::linear", mutates_args=())
    def _linear_op(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], signs: torch.Tensor,
        scales: torch.Tensor, mode: str, ids: torch.Tensor, backend: str,
    ) -> torch.Tensor:
        return _linear_impl(x, weight, bias, signs, scales, mode, ids, backend)

    @_linear_op.register_fake
    def _linear_fake(x, weight, bias, signs, scales, mode, ids, backend):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.custom_op("bitdelta::linear_segmented", mutates_args=())
    def _segmented_op(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], signs: torch.Tensor,
        scales: torch.Tensor, mode: str, seg_starts: torch.Tensor, seg_ids: torch.Tensor, backend: str,
    ) -> torch.Tensor:
        return _segmented_impl(x, weight, bias, signs, scales, mode, seg_starts, seg_ids, backend)

    @_segmented_op.register_fake
    def _segmented_fake(x, weight, bias, signs, scales, mode, seg_starts, seg_ids, backend):
        return x.new_empty((x.shape[0], weight.shape[0]))

    CUSTOM_OPS = True
except Exception:  # older torch or a clash: plain functions still work, torch.compile graph-breaks
    _linear_op, _segmented_op = _linear_impl, _segmented_impl
    CUSTOM_OPS = False


def _direct(x: torch.Tensor) -> bool:
    """Whether to call the implementation directly instead of through the registered custom op.

    The custom op exists so that ``torch.compile`` and fake-tensor tracing see one opaque node; in
    eager mode its dispatch (autograd wrapper, dynamo-disable frame, redispatch) costs on the order of
    100 us of host time per call, more than a decode step's kernels take on the GPU, paid for every
    module of every layer. Plain tensors outside compilation take the direct path; anything else
    (compiling, fake/functional tensor subclasses) keeps the op.
    """
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()


def bitdelta_linear(
    x: torch.Tensor,  # [T, K] fp16/bf16/fp32
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N] or None
    signs: torch.Tensor,  # [D, bits, N, ceil(K/8)] uint8
    scales: torch.Tensor,  # [D, bits] | [D, bits, N] | [D, bits, K] float32
    mode: str,  # "scalar" | "row" | "col" (or the ScaleMode)
    ids: torch.Tensor,  # [T] int32, -1 = base only
    backend: str | Backend = "auto",
) -> torch.Tensor:
    """Multi-tenant BitDelta linear; returns ``[T, N]`` in ``x.dtype`` (see reference.py Semantics)."""
    check_inputs(x, weight, bias, signs, scales, mode)  # shapes only: no host sync
    if ids.shape != (x.shape[0],):
        raise ValueError(f"ids must be [{x.shape[0]}] (one tenant index per token; got {tuple(ids.shape)})")
    b = backend.value if isinstance(backend, Backend) else str(backend)
    op = _linear_impl if _direct(x) else _linear_op
    return op(x, weight, bias, signs, scales, str(mode), ids, b)  # str(): a ScaleMode as the op's plain string


def bitdelta_linear_group(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N_1 + N_2 + ..., K]: the matrices' base rows, one after the other
    members: list[tuple[torch.Tensor, torch.Tensor]],  # (signs [D, bits, N_i, ceil(K/8)], scales) per matrix
    mode: str,
    ids: torch.Tensor,  # [T] int32, -1 = base only
    backend: str | Backend = "auto",
) -> torch.Tensor:
    """Several multi-tenant linears over the same input as one call (a layer's q, k and v; its gate
    and up): ``[T, N_1 + N_2 + ...]``, by definition the per-matrix :func:`bitdelta_linear` results
    side by side. On the binary tensor-core path that is one base GEMM over the stacked rows, one
    quantisation of the input, a delta launch per matrix and one add, where separate calls repeat
    the GEMM, the quantisation and the add per matrix; elsewhere (Triton, the torch reference,
    column scales, compiling) it is the per-matrix calls, concatenated. No host sync either way."""
    widths = [signs.shape[2] for signs, _ in members]
    if not members or sum(widths) != weight.shape[0]:
        raise ValueError(f"the members' output sizes {widths} must add up to the stacked weight's rows "
                         f"({weight.shape[0]})")
    parts = weight.split(widths)
    for w, (signs, scales) in zip(parts, members):
        check_inputs(x, w, None, signs, scales, mode)
    if ids.shape != (x.shape[0],):
        raise ValueError(f"ids must be [{x.shape[0]}] (one tenant index per token; got {tuple(ids.shape)})")
    if str(mode) != "col" and _direct(x) and _use_popc(x, backend):
        from bitdelta.ops import cuda_popc

        return cuda_popc.bitdelta_decode_group(x, weight, None, members, str(mode), ids)
    return torch.cat([bitdelta_linear(x, w, None, signs, scales, mode, ids, backend)
                      for w, (signs, scales) in zip(parts, members)], dim=-1)


def bitdelta_linear_segmented(
    x: torch.Tensor,  # [T, K], rows grouped by tenant
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N] or None
    signs: torch.Tensor,  # [D, bits, N, ceil(K/8)] uint8
    scales: torch.Tensor,  # scales of the mode, float32
    mode: str,
    seg_starts: torch.Tensor,  # [S+1] int32, seg_starts[0] == 0, seg_starts[S] == T
    seg_ids: torch.Tensor,  # [S] int32 tenant per segment, -1 = base only
    backend: str | Backend = "auto",
    table: SegmentTable | None = None,  # the same segments as host lists: no device sync per call
) -> torch.Tensor:
    """Segmented (prefill) form: rows seg_starts[s]:seg_starts[s+1] use tenant seg_ids[s].

    ``table`` (:class:`~bitdelta.ops.segment_table.SegmentTable`) is for callers that built the
    segments on the host: the call then never waits for the GPU (under ``torch.compile`` it is
    not passed on: the registered op takes tensors only)."""
    check_inputs(x, weight, bias, signs, scales, mode)
    if seg_ids.dim() != 1 or seg_starts.shape != (seg_ids.numel() + 1,):
        raise ValueError(f"seg_starts must have one more entry than seg_ids (got {tuple(seg_starts.shape)}, "
                         f"{tuple(seg_ids.shape)})")
    b = backend.value if isinstance(backend, Backend) else str(backend)
    if _direct(x):
        return _segmented_impl(x, weight, bias, signs, scales, str(mode), seg_starts, seg_ids, b, table)
    return _segmented_op(x, weight, bias, signs, scales, str(mode), seg_starts, seg_ids, b)
