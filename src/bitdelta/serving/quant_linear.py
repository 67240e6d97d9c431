"""Quantized base matrices in the served model: INT8 or FP8 weights, each token's delta added as on a dense base.

A base quantized as ``compress --base-quant`` quantizes it (:mod:`bitdelta.quant`: per output
channel, symmetric, round to nearest) is served on its quantized weights, the very ``q`` and scale
the delta was compressed against. :class:`QuantTenantLinear` computes the base product in one of
four ways, chosen once per matrix when it is built, by a trial call on its device that must agree
with the dequantized product (a kernel that is missing, fails to compile, refuses the shapes, or
computes something else falls back to the next way):

* ``fp8-gemv``: FP8 weights with per-channel scales on a GPU, for batches of at most 16 rows (decode
  steps): the weight-only Triton kernel :func:`bitdelta.ops.fp8_gemv.fp8_weight_only_triton` reads
  each e4m3 weight once, converts it in registers, multiplies the activations as they are and scales
  each output row at the end. ``_scaled_mm`` at these sizes is no faster than a bf16 GEMM and first
  quantizes the activations; this kernel reads half a bf16 weight's bytes and nothing else. Larger
  batches take the GEMM way below (or the dequantized weight). ``BITDELTA_FP8_GEMV=off`` turns it off;
* ``fp8-gemm``: FP8 weights on a GPU with FP8 tensor cores (compute capability 8.9 or more) through
  ``torch._scaled_mm``: the step's activations are quantized to e4m3 per token (row-wise scale
  ``amax / 448``, :mod:`bitdelta.serving.fp8_rows`) and both scales are applied in the GEMM's
  epilogue. cuBLASLt wants the first operand row-major, the second column-major and every dimension
  a multiple of 16: rows are padded up to a multiple of 16 (a fixed size per captured batch size)
  and sliced off; the weight goes in as ``q.t()``, column-major as stored. (Swapping the operands,
  ``(W x_fp8ᵀ)ᵀ``, ran no faster at decode sizes on an H200 with torch 2.11.);
* ``int8-weight-only``: INT8 weights through ``torch._weight_int8pack_mm`` (the 8-bit weight is read,
  converted and scaled inside the kernel), on the CPU at any batch size and on a GPU for decode-sized
  batches (a prompt's large product runs faster on a dequantized weight);
* ``dequantize``: anything else (FP8 weights on the CPU or an older GPU, block-scaled checkpoints):
  the weight is dequantized in the step, exactly as :func:`bitdelta.quant.dequantize` does.

The delta term is unchanged: a decode step on a GPU adds the decode kernel's delta-only product
(the popc or Triton kernel :func:`bitdelta.ops.bitdelta_linear` would run) to the quantized base
product, the two running at once on two streams for small batches as the fused op runs them;
every other step with a tenant (prompts, column-scaled tenants, the CPU, a custom dispatch) makes
the usual dispatch call with the weight dequantized for that call. No step syncs
with the host or has a shape that depends on values, so decode steps can be captured in CUDA graphs.

    qw = QuantizedWeight.quantize(w, "fp8")                 # or from a checkpoint's stored q and scale
    layer = QuantTenantLinear("model.layers.0.mlp.up_proj", qw, None, torch.bfloat16)
    y = layer(x, step)                                    # base product + each token's delta
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import BitDeltaError
from ..ops.fp8_gemv import MAX_ROWS as GEMV_MAX_ROWS
from ..ops.fp8_gemv import fp8_weight_only_triton
from ..quant import dequantize, quantize
from .fp8_rows import quantize_rows

logger = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores
GEMM_ALIGN = 16  # cuBLASLt FP8: every dimension a multiple of 16
INT8_GPU_MAX_ROWS = 128  # above this a GPU runs the dequantized weight through cuBLAS instead
# A trial product may differ from the dequantized one by the activations' e4m3 rounding (about 2^-4
# of a value, averaging out over the sum): a kernel that is off by more computes something else.
TRIAL_REL_ERROR = 0.1
# The weight-only GEMV multiplies the activations as they are: only the output's rounding (2^-8 relative
# in bf16) and the dequantized reference weight's own rounding separate them; anything more is a bug.
GEMV_TRIAL_REL_ERROR = 0.01
_TRIALS: dict[tuple, tuple[str, str]] = {}  # (device, scheme, dtype, shape, ...) -> the ways that passed
# Decode batches up to this many rows run the delta kernels beside the base product, on a second
# stream (the fused decode op's own rule, bitdelta.ops.cuda_popc: small batches leave the GPU idle).
OVERLAP_MAX_ROWS = 16
_SIDE: dict[int, torch.cuda.Stream] = {}

WAYS = ("fp8-gemv", "fp8-gemm", "int8-weight-only", "dequantize")
GEMV_SWITCH = "BITDELTA_FP8_GEMV"  # auto (the default: where its trial passes) or off


@dataclass
class QuantizedWeight:
    """One base matrix as its quantized base stores it: ``dequantize(q, scale, dtype)`` is the weight a
    delta of that base was compressed against."""

    q: torch.Tensor  # [out, in] int8 or float8_e4m3fn
    scale: torch.Tensor  # [out, 1] per channel; or a checkpoint's block scales
    scheme: str  # "int8" or "fp8"
    dtype: torch.dtype  # what the stored weight dequantizes to (the checkpoint's dtype)
    block: tuple[int, int] | None = None
    zero_point: torch.Tensor | None = None

    @classmethod
    def quantize(cls, weight: torch.Tensor, scheme: str) -> QuantizedWeight:
        """``weight`` quantized as ``compress --base-quant`` quantizes it (the same function, so the
        same bits): pass the tensor as the checkpoint stores it, in its own dtype."""
        q, scale = quantize(weight, scheme)
        return cls(q, scale, scheme, weight.dtype)

    @classmethod
    def from_stored(cls, stored) -> QuantizedWeight:
        """From a :class:`bitdelta.quant.StoredQuantized` (a quantized checkpoint's weight, as stored).
        A per-tensor scale becomes a per-channel one (the same products); an all-zero zero point is dropped."""
        q, scale, zp = stored.q, stored.scale, stored.zero_point
        if zp is not None and not bool((zp == 0).all()):
            return cls(q, scale, stored.scheme, stored.dtype, stored.block, zp)
        rows = q.shape[0]
        if scale.numel() == 1:
            scale = scale.reshape(1, 1).expand(rows, 1).contiguous()
        elif scale.numel() == rows and (scale.dim() == 1 or scale.shape[-1] == 1):
            scale = scale.reshape(rows, 1)
        block = None if scale.shape == (rows, 1) else stored.block
        return cls(q, scale, stored.scheme, stored.dtype, block)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def per_channel(self) -> bool:
        """One scale per output row and no zero point: the form the FP8 and INT8 kernels take."""
        return self.zero_point is None and tuple(self.scale.shape) == (self.q.shape[0], 1)

    def numel(self) -> int:
        return self.q.numel()

    def nbytes(self) -> int:
        extra = 0 if self.zero_point is None else self.zero_point.numel() * self.zero_point.element_size()
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size() + extra

    def to(self, device) -> QuantizedWeight:
        def move(t):
            return None if t is None else t.to(device)

        return QuantizedWeight(move(self.q), move(self.scale), self.scheme, self.dtype, self.block,
                               move(self.zero_point))

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (default: the stored dtype): ``dequantize`` in the stored
        dtype, then cast. When the two dtypes agree, ``q.to(dtype) * scale`` is the same number (the 8-bit
        value converts exactly, and both forms round the float32 product once) without a float32 copy
        of the matrix."""
        dtype = dtype or self.dtype
        if self.per_channel and dtype == self.dtype and self.scale.dtype == dtype:
            return self.q.to(dtype) * self.scale
        return dequantize(self.q, self.scale, self.dtype, zero_point=self.zero_point, block=self.block).to(dtype)


# ---------------------------------------------------------------------------------- the base product


def fp8_gemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ (q · scale)ᵀ`` by ``torch._scaled_mm`` with row-wise scales: ``q [N, K]`` float8_e4m3fn
    (row-major, as stored), ``scale [N]`` float32. Output ``[M, N]`` in ``x``'s dtype."""
    m, n = x.shape[0], q.shape[0]
    m_pad = -(-m // GEMM_ALIGN) * GEMM_ALIGN  # a fixed amount for a given batch size: nothing depends on values
    x8, sx = quantize_rows(x, m_pad)
    y = torch._scaled_mm(x8, q.t(), scale_a=sx, scale_b=scale.view(1, n), out_dtype=x.dtype)
    return y[:m] if m_pad != m else y


def int8_weight_only(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q · scale)ᵀ`` by ``torch._weight_int8pack_mm`` (``scale`` ``[N]`` in ``x``'s dtype)."""
    return torch._weight_int8pack_mm(x.contiguous(), q, scale)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE:
        _SIDE[index] = torch.cuda.Stream(device)
    return _SIDE[index]


def _gpu_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _gemv_runs_on(device: torch.device) -> bool:
    """Where the FP8 GEMV kernel is worth trying: a GPU (the CPU runs Triton only in its interpreter)."""
    return device.type == "cuda"


def _gemv_wanted() -> bool:
    choice = os.environ.get(GEMV_SWITCH, "auto").lower()
    if choice not in ("auto", "off"):
        raise ValueError(f"{GEMV_SWITCH} must be auto or off (got {choice!r})")
    return choice == "auto"


def _try_way(way: str, qw: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether ``way`` runs on ``qw``'s device for ``qw``'s shapes and agrees with the dequantized
    product on a random input (a trial, outside any CUDA graph capture)."""
    device = qw.device
    g = torch.Generator(device=device).manual_seed(0)
    ref_w = qw.dequantized(torch.float32)
    # the GEMV: one row and two (its CUDA-core kernels) and the most rows (its tensor-core kernel), so
    # that every kernel a decode step can launch is compiled here, outside any CUDA graph capture;
    # the GEMM: one row (padded) and a padded batch
    trial_rows = (1, 2, GEMV_MAX_ROWS) if way == "fp8-gemv" else (1, GEMM_ALIGN + 1)
    limit = GEMV_TRIAL_REL_ERROR if way == "fp8-gemv" else TRIAL_REL_ERROR
    for rows in trial_rows:
        x = torch.randn((rows, qw.shape[1]), generator=g, device=device).to(dtype)
        try:
            if way == "fp8-gemv":
                y = fp8_weight_only_triton(x, qw.q, qw.scale.float().reshape(-1))
            elif way == "fp8-gemm":
                y = fp8_gemm(x, qw.q, qw.scale.float().reshape(-1))
            else:
                y = int8_weight_only(x, qw.q, qw.scale.reshape(-1).to(dtype))
        except (RuntimeError, NotImplementedError, TypeError, AttributeError) as e:  # missing, or refuses these shapes
            log = logger.warning if way == "fp8-gemv" else logger.debug  # the GEMV is expected to run on any GPU
            log("%s is not available for a %s %s matrix on %s: %s", way, qw.scheme, tuple(qw.shape), device, e)
            return False
        except Exception as e:  # a Triton kernel that fails to compile (or Triton missing): never used
            logger.warning("%s failed for a %s %s matrix on %s (%s: %s); using the next way", way, qw.scheme,
                           tuple(qw.shape), device, type(e).__name__, e)
            return False
        ref = x.float() @ ref_w.t()
        err = float((y.float() - ref).norm() / ref.norm().clamp(min=1e-30))
        if not err < limit:
            logger.warning("%s gave a product %.2f%% away from the dequantized one for a %s matrix on %s; using "
                           "the next way", way, 100 * err, tuple(qw.shape), device)
            return False
    return True


def choose_ways(qw: QuantizedWeight, dtype: torch.dtype) -> tuple[str, str]:
    """How to compute the base product of ``qw`` in ``dtype`` on its device (module docstring): the way
    for batches of at most :data:`GEMV_MAX_ROWS` rows and the way for larger ones (the same one unless
    the first is ``fp8-gemv``)."""
    device = qw.device
    gemv_wanted = _gemv_wanted()
    key = (str(device), qw.scheme, dtype, tuple(qw.shape), qw.per_channel, gemv_wanted)
    got = _TRIALS.get(key)
    if got is not None:
        return got
    fp8_gemm_fits = (qw.per_channel and qw.scheme == "fp8" and device.type == "cuda" and hasattr(torch, "_scaled_mm")
                     and _gpu_capability(device) >= FP8_MIN_CAPABILITY
                     and qw.shape[0] % GEMM_ALIGN == 0 and qw.shape[1] % GEMM_ALIGN == 0)
    int8_fits = qw.per_channel and qw.scheme == "int8" and hasattr(torch, "_weight_int8pack_mm")
    gemv_fits = qw.per_channel and qw.scheme == "fp8" and gemv_wanted and _gemv_runs_on(device)
    way = "dequantize"
    if fp8_gemm_fits and _try_way("fp8-gemm", qw, dtype):
        way = "fp8-gemm"
    elif int8_fits and _try_way("int8-weight-only", qw, dtype):
        way = "int8-weight-only"
    small = "fp8-gemv" if gemv_fits and _try_way("fp8-gemv", qw, dtype) else way
    _TRIALS[key] = small, way
    return small, way


def choose_way(qw: QuantizedWeight, dtype: torch.dtype) -> str:
    """The way a decode-sized batch (at most :data:`GEMV_MAX_ROWS` rows) of ``qw`` runs (:func:`choose_ways`)."""
    return choose_ways(qw, dtype)[0]


# ---------------------------------------------------------------------------------- the delta term


def decode_delta(deltas, name: str, x: torch.Tensor, batch) -> torch.Tensor | None:
    """The delta-only product ``Δ̂_{ids[t]} x[t]`` (float32 ``[T, N]``) of a decode step on a GPU, by the
    kernel the fused op would run; None where the fused op would do something else (prompts,
    column-scaled tenants, the torch backend, a custom dispatch): the caller then makes the usual call.
    ``deltas``: the step's deltas (the engine's :class:`~bitdelta.serving.residency.DeltaSlots`, whose
    ``dispatch`` runs the ops, or a dispatch itself)."""
    from ..ops import DECODE_MAX_TOKENS, Backend, _use_popc, resolve_backend
    from .dispatch import Dispatch
    from .op_calls import has_long_sequences

    dispatch = getattr(deltas, "dispatch", deltas)
    if type(dispatch) is not Dispatch or not x.is_cuda or has_long_sequences(batch):
        return None
    pool = dispatch.pool.pools[name]
    if pool["col_slots"] and pool["col_slots"].intersection(batch.seq_delta_slots):
        return None
    # the fused op's choice: the popc kernel where it runs, else Triton's; the torch backend has no delta-only form
    if _use_popc(x[:DECODE_MAX_TOKENS], dispatch.backend):
        from ..ops.cuda_popc import decode_delta as kernel
    elif resolve_backend(dispatch.backend, x) is Backend.TRITON:
        from ..ops.triton_ops import decode_delta as kernel
    else:
        return None
    signs, scales, ids = pool["signs"], pool["row"], batch.delta_slots
    parts = [kernel(x[a:a + DECODE_MAX_TOKENS], signs, scales, "row", ids[a:a + DECODE_MAX_TOKENS])
             for a in range(0, x.shape[0], DECODE_MAX_TOKENS)]  # the decode kernels take at most this many rows
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------------- the module


class QuantTenantLinear(nn.Module):
    """``y = x Ŵᵀ (+ b)`` plus each token's delta, where ``Ŵ`` is a quantized base matrix; ``name`` is
    the module's checkpoint name. ``way`` says how the base product of a batch of at most
    :data:`GEMV_MAX_ROWS` rows runs, ``large_way`` how a larger one's does (module docstring)."""

    def __init__(self, name: str, weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        if weight.q.dim() != 2 or weight.q.dtype not in (torch.int8, torch.float8_e4m3fn):
            raise BitDeltaError(f"{name}: a quantized base matrix must be 2-D int8 or float8_e4m3fn, got "
                                f"{weight.q.dtype} {tuple(weight.q.shape)}")
        self.name, self.dtype = name, dtype
        self.scheme, self.stored_dtype, self.block = weight.scheme, weight.dtype, weight.block
        self.register_buffer("qweight", weight.q, persistent=False)
        self.register_buffer("weight_scale", weight.scale, persistent=False)
        self.register_buffer("weight_zero_point", weight.zero_point, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.way, self.large_way = choose_ways(weight, dtype)
        # the scale in the form the chosen kernels take (a few KB per matrix)
        if self.way in ("fp8-gemv", "fp8-gemm"):  # the GEMV's larger batches: fp8-gemm or dequantized
            self.register_buffer("scale_f32", weight.scale.float().reshape(-1).contiguous(), persistent=False)
        elif self.way == "int8-weight-only":
            self.register_buffer("scale_n", weight.scale.reshape(-1).to(dtype).contiguous(), persistent=False)

    @property
    def quantized(self) -> QuantizedWeight:
        """The stored weight (its live buffers, not a copy)."""
        return QuantizedWeight(self.qweight, self.weight_scale, self.scheme, self.stored_dtype, self.block,
                               self.weight_zero_point)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.quantized.dequantized(dtype or self.dtype)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """``x Ŵᵀ`` in ``x``'s dtype, by this matrix's way for ``x``'s rows (fixed per captured batch size)."""
        way = self.way
        if way == "fp8-gemv":
            if x.shape[0] <= GEMV_MAX_ROWS:
                return fp8_weight_only_triton(x, self.qweight, self.scale_f32)
            way = self.large_way
        if way == "fp8-gemm":
            return fp8_gemm(x, self.qweight, self.scale_f32)
        if way == "int8-weight-only" and (not x.is_cuda or x.shape[0] <= INT8_GPU_MAX_ROWS):
            return int8_weight_only(x, self.qweight, self.scale_n)
        return F.linear(x, self.dequantized(x.dtype))

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        if not step.per_tenant:
            y = self.base(x)
        elif x.is_cuda and x.shape[0] <= OVERLAP_MAX_ROWS:
            # as the fused decode op does: the delta kernels on a side stream while the base product runs
            cur = torch.cuda.current_stream(x.device)
            side = _side_stream(x.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                delta = decode_delta(step.deltas, self.name, x, step.batch)
            if delta is None:
                cur.wait_stream(side)
                y = step.deltas.linear(self.name, x, self.dequantized(x.dtype), step.batch)
            else:
                y = self.base(x)
                cur.wait_stream(side)
                delta.record_stream(cur)
                y = y.add_(delta)
        else:
            delta = decode_delta(step.deltas, self.name, x, step.batch)
            if delta is not None:
                y = self.base(x).add_(delta)
            else:  # the dispatch's own call, on the weight dequantized for this call
                y = step.deltas.linear(self.name, x, self.dequantized(x.dtype), step.batch)
        if self.bias is not None:
            y = y + step.param(f"{self.name}.bias", self.bias)
        return y

    def extra_repr(self) -> str:
        larger = f" (more than {GEMV_MAX_ROWS} rows: {self.large_way})" if self.large_way != self.way else ""
        return f"{self.name}, {self.scheme} {tuple(self.qweight.shape)}, {self.way}{larger}"


def ways_used(model: nn.Module) -> dict[str, int]:
    """How many quantized matrices of ``model`` compute their base product each way (their decode-sized
    batches' way: an ``fp8-gemv`` matrix runs larger batches by its ``large_way``, ``fp8-gemm`` or dequantized)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantTenantLinear):
            counts[m.way] = counts.get(m.way, 0) + 1
    return counts
