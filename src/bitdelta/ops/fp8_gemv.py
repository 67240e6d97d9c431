"""An FP8 weight-only product for decode-sized batches: ``y = (x @ qᵀ) · scale`` with ``q`` read as e4m3.

A base stored in FP8 with one scale per output channel (:mod:`bitdelta.quant`) halves the bytes a
decode step reads, but ``torch._scaled_mm`` gains nothing from it at a handful of rows: cuBLASLt's FP8
GEMMs at M = 1..16 take as long as the bf16 ones, and every call first quantizes the activations. At
these sizes the product is bound by reading the weight, so this kernel reads each FP8 weight once,
converts it in registers, multiplies it by the activations as they are (fp16, bf16 or fp32) and
accumulates in float32; each output row is multiplied by its scale at the end.

* Every program holds all the rows of ``x`` (at most :data:`MAX_ROWS`) and a ``BLOCK_N``-row strip of
  the weight, walking K in ``BLOCK_K`` steps; each weight row is contiguous in K, so a thread's share
  of a tile is one or more 16-byte loads.
* Few rows (``use_dot`` off) multiply on CUDA cores, a ``[rows, BLOCK_N, BLOCK_K]`` float32 product
  summed over K once at the end; more rows use ``tl.dot`` with the weight tile as the first operand
  (rows padded to 16 in registers, never in memory). Both take products exactly in float32.
* Split-K (``split_k`` > 1) for matrices with too few row strips to fill the GPU: each K slice writes
  its float32 partial sums to a workspace and a second small kernel adds them in a fixed order, scales
  and casts (deterministic: no atomics).
* GPUs without FP8 conversion instructions (compute capability below 8.9, where Triton refuses
  ``float8e4nv``) convert with integer operations: the e4m3 bits shifted into an fp16 are the value
  times 2⁻⁸ exactly (subnormals included), and the 2⁸ is put back with the scale.

No call syncs with the host or allocates anything whose size depends on values, so calls can be
captured in CUDA graphs. :func:`fp8_weight_only_reference` is the pure-PyTorch definition the kernel
is checked against.

    y = fp8_weight_only_triton(x, q, scale)      # x [M <= 16, K] bf16, q [N, K] float8_e4m3fn, scale [N] fp32
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .launch import cdiv, interpreting

MAX_ROWS = 16  # every row of x lives in one program's registers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Row strips per streaming multiprocessor below which K is split (one wave of programs is too few
# loads in flight to reach the memory bandwidth).
_MIN_STRIPS_PER_SM = 1
_MAX_SPLIT_K = 8
_MIN_K_STEPS_PER_SPLIT = 4  # a K slice shorter than this many tiles costs more in partial sums than it gains


@dataclass(frozen=True)
class GemvConfig:
    """One launch configuration of the kernel (:func:`default_config` picks one per shape)."""

    use_dot: bool  # tensor cores (rows padded to 16 in registers) instead of CUDA-core products
    block_n: int  # weight rows per program
    block_k: int  # K step (weight bytes per row per step)
    split_k: int = 1  # K slices, each its own program, summed by a second kernel
    num_warps: int = 4
    num_stages: int = 3


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be a 2-D float16, bfloat16 or float32 tensor, got {x.dtype} {tuple(x.shape)}")
    if q.dim() != 2 or q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"q must be a 2-D torch.float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns but q has {q.shape[1]} (q is [N, K], row-major as stored)")
    if scale.dtype != torch.float32 or scale.numel() != q.shape[0] or scale.dim() not in (1, 2):
        raise ValueError(f"scale must be float32 with one value per row of q ([{q.shape[0]}] or "
                         f"[{q.shape[0]}, 1]), got {scale.dtype} {tuple(scale.shape)}")
    if not (x.device == q.device == scale.device):
        raise ValueError(f"x, q and scale must be on one device, got {x.device}, {q.device}, {scale.device}")


def fp8_weight_only_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x @ qᵀ) · scale`` in float32, returned in ``x``'s dtype: ``x [M, K]`` fp16/bf16/fp32,
    ``q [N, K]`` float8_e4m3fn, ``scale [N]`` float32 (one per output row)."""
    _check(x, q, scale)
    return ((x.float() @ q.float().t()) * scale.reshape(1, -1)).to(x.dtype)


# ---------------------------------------------------------------------------------- the kernels


@functools.cache
def _kernels():
    """The two Triton kernels, decorated on first use (so that a test can set TRITON_INTERPRET first)."""
    import triton
    import triton.language as tl

    # M (the batch's rows) is not specialized: one compiled kernel serves every batch size of a bucket
    @triton.jit(do_not_specialize=["M"])
    def fp8_gemv(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_om, stride_os, k_per_split,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
                 SPLIT: tl.constexpr, SOFT_FP8: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr,
                 POST: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_m = tl.arange(0, BM)
        n_mask = offs_n < N
        m_mask = offs_m < M
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        w_rows = q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        if USE_DOT:
            acc = tl.zeros([BN, BM], dtype=tl.float32)
        else:
            acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_mask = offs_k < k_hi
            u = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
            if SOFT_FP8:  # e4m3 bits shifted into an fp16: the value times 2^-8, exactly (POST puts 2^8 back)
                b = u.to(tl.int16)  # zero-extended
                w = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)
            else:
                w = u.to(tl.float8e4nv, bitcast=True)  # [BN, BK]
            xv = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if USE_DOT:
                # the weight tile as the first operand: it can stay in registers where it was converted
                acc = tl.dot(w.to(CT), tl.trans(xv.to(CT)), acc, input_precision=PREC)
            else:
                acc += xv.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if USE_DOT:
            res = acc  # [BN, BM]
            ptrs = offs_m[None, :] * stride_om + offs_n[:, None]
            mask = n_mask[:, None] & m_mask[None, :]
            sc = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
        else:
            res = tl.sum(acc, axis=2)  # [BM, BN]
            ptrs = offs_m[:, None] * stride_om + offs_n[None, :]
            mask = m_mask[:, None] & n_mask[None, :]
            sc = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if SPLIT:  # float32 partial sums of this K slice; the sum kernel scales them
            tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + ptrs, res, mask=mask)
        else:
            tl.store(out_ptr + ptrs, (res * (sc * POST)).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def split_k_sum(ws_ptr, s_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, POST: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):  # a fixed order: the same sums at every call
            total += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
        sc = tl.load(s_ptr + offs % N, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (total * (sc * POST)).to(out_ptr.dtype.element_ty), mask=mask)

    return fp8_gemv, split_k_sum


_TL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the same choices
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _soft_fp8(device: torch.device) -> bool:
    """Whether Triton lacks an e4m3 conversion here (compute capability below 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)


@functools.lru_cache(maxsize=4096)  # a few shapes and batch sizes per model: no Python work per call
def default_config(m: int, n: int, k: int, multiprocessors: int) -> GemvConfig:
    """The launch configuration for ``x [m, k] @ qᵀ [k, n]`` on a GPU with ``multiprocessors`` SMs.

    One or two rows multiply on CUDA cores (a GEMV: no padding to the tensor cores' 16 rows), more on
    tensor cores. Strips of 16 weight rows keep enough programs for 4096-row matrices on a large GPU;
    K is split only when even that leaves the GPU less than a wave of programs (70B K/V projections)."""
    use_dot = m > 2
    block_k = 256
    block_n = 32 if -(-n // 32) >= 2 * multiprocessors else 16
    strips = -(-n // block_n)
    split_k = 1
    if strips < _MIN_STRIPS_PER_SM * multiprocessors:
        split_k = -(-2 * multiprocessors // strips)
        split_k = max(1, min(split_k, _MAX_SPLIT_K, k // (_MIN_K_STEPS_PER_SPLIT * block_k)))
    return GemvConfig(use_dot, block_n, block_k, split_k)


def _rows_block(m: int, use_dot: bool) -> int:
    if use_dot:
        return 16  # tl.dot's smallest M (padding in registers only)
    return max(1, 1 << (m - 1).bit_length())


def fp8_weight_only_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                           config: GemvConfig | None = None, soft_fp8: bool | None = None) -> torch.Tensor:
    """``(x @ qᵀ) · scale`` by the Triton kernel (module docstring), in ``x``'s dtype.

    ``x [M, K]`` (M <= :data:`MAX_ROWS`) fp16/bf16/fp32; ``q [N, K]`` float8_e4m3fn, row-major as stored;
    ``scale [N]`` float32. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. ``config``: a launch
    configuration (default :func:`default_config`); ``soft_fp8``: convert e4m3 by integer operations
    (default: where the GPU has no conversion instruction)."""
    _check(x, q, scale)
    m, k = x.shape
    n = q.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"the FP8 GEMV takes at most {MAX_ROWS} rows of x, got {m} (use a GEMM for more)")
    if q.stride(1) != 1 or q.stride(0) != k:
        raise ValueError("q must be contiguous (row-major [N, K], as stored): a copy per call would read it twice")
    if not x.is_cuda and not interpreting():
        raise RuntimeError("the FP8 GEMV kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or default_config(m, n, k, _multiprocessors(x.device))
    soft = _soft_fp8(x.device) if soft_fp8 is None else soft_fp8
    import triton.language as tl

    gemv, split_sum = _kernels()
    # products taken exactly in float32: fp16/bf16 tensor-core inputs (an e4m3 value is exact in both);
    # the interpreter's 16-bit dot is not exact, so it multiplies in float32 as fp32 inputs do on a GPU
    compute = torch.float32 if interpreting() else x.dtype
    ct = getattr(tl, _TL_DTYPES[compute])
    prec = "ieee" if compute == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    post = 256.0 if soft else 1.0
    bm = _rows_block(m, cfg.use_dot)
    q8 = q.view(torch.uint8)
    scale = scale.reshape(-1).contiguous()
    steps = cdiv(k, cfg.block_k)
    steps_per_split = cdiv(steps, max(1, min(cfg.split_k, steps)))  # whole K steps per slice
    k_per_split = max(1, steps_per_split) * cfg.block_k
    split_k = max(1, cdiv(k, k_per_split))
    target = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (cdiv(n, cfg.block_n), split_k)
    gemv[grid](x, q8, scale, target, m, n, k, x.stride(0), q.stride(0), n, m * n, k_per_split,
               BM=bm, BN=cfg.block_n, BK=cfg.block_k, USE_DOT=cfg.use_dot, SPLIT=split_k > 1, SOFT_FP8=soft,
               CT=ct, PREC=prec, POST=post, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split_k > 1:
        block = 1024
        split_sum[(cdiv(m * n, block),)](target, scale, out, m * n, n, SPLIT_K=split_k, POST=post,
                                         BLOCK=block, num_warps=4)
    return out
