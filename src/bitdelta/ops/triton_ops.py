"""Launch wrappers for the Triton BitDelta kernels: asserts, allocation, config lookup, launch.

Shapes and semantics are those of :mod:`bitdelta.ops.reference`. Nothing here syncs with the
host or allocates a data-dependent amount of memory, so the decode path can be captured in a CUDA
graph. Configs come from ``DEFAULT_CONFIGS`` (tuned on an H100) unless a ``config`` dict is given.

    y = bitdelta_decode(x, w, b, signs, scales, "row", ids)            # T <= 64
    y = bitdelta_segmented(x, w, b, signs, scales, "col", starts, seg_ids)
    y = bitdelta_linear(x, w, b, signs, scales, "scalar", ids)         # picks one of the two
"""

from __future__ import annotations

import os

import torch
import triton

from bitdelta.ops import triton_kernels as K_

MODE_CODE = {"scalar": 0, "row": 1, "col": 2}
DECODE_MAX_TOKENS = 64
TARGET_PROGRAMS = 1024

# Launch configs; "decode" keyed by nothing (one config works across the three Llama shapes),
# "segmented" likewise. Override per call with config=...
DEFAULT_CONFIGS = {
    # SPLIT_K: programs along K (0 = auto: about TARGET_PROGRAMS programs in all); SWAP: weight
    # tile as the MMA's A operand (see triton_kernels._mm).
    # Best on H100 in benchmarks/kernels.py sweeps (docs/benchmarks.md): split-K did not help.
    "decode": {"BN": 32, "BK": 256, "BKD": 256, "TG": 16, "SPLIT_K": 1, "SWAP": False,
               "num_warps": 4, "num_stages": 3},
    "segmented": {"BM": 256, "BN": 128, "BK": 64, "SWAP": True, "num_warps": 8, "num_stages": 3},
}


def get_config(op: str, override: dict | None = None) -> dict:
    cfg = dict(DEFAULT_CONFIGS[op])
    if override:
        cfg.update(override)
    return cfg


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    """The CPU interpreter computes bf16 dots wrongly (triton 3.9); multiply in fp32 there."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _common_asserts(x, weight, bias, signs, scales, mode):
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert weight.dtype == x.dtype and x.stride(-1) == 1 and weight.stride(-1) == 1
    assert signs.dtype == torch.uint8 and signs.dim() == 4 and signs.shape[-1] * 8 >= x.shape[1]
    assert mode in MODE_CODE, mode
    assert bias is None or bias.is_contiguous()


def _scale_strides(scales: torch.Tensor):
    return scales.stride(0), (scales.stride(1) if scales.dim() > 1 else 0)


def bitdelta_decode(x, weight, bias, signs, scales, mode, ids, config: dict | None = None):
    """Small-batch kernel (T <= 64): base read once, each distinct tenant's bits once per N block."""
    _common_asserts(x, weight, bias, signs, scales, mode)
    t, k = x.shape
    n = weight.shape[0]
    assert t <= DECODE_MAX_TOKENS, f"decode kernel takes at most {DECODE_MAX_TOKENS} tokens (got {t})"
    cfg = get_config("decode", config)
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    signs = signs.contiguous()
    scales = scales.contiguous().float()
    ids = ids.to(torch.int32).contiguous()
    bt = max(16, triton.next_power_of_2(t))
    n_blocks = triton.cdiv(n, cfg["BN"])
    step = max(cfg["BK"], cfg["BKD"])
    split = cfg["SPLIT_K"] or max(1, TARGET_PROGRAMS // n_blocks)
    k_split = triton.cdiv(triton.cdiv(k, max(1, split)), step) * step
    split = triton.cdiv(k, k_split)
    out = torch.zeros((t, n), dtype=torch.float32, device=x.device) if split > 1 else y
    K_.bitdelta_decode_kernel[(n_blocks, split)](
        x, weight, bias if bias is not None else x, signs, scales, ids, out,
        t, n, k, signs.shape[-1], k_split,
        x.stride(0), weight.stride(0), out.stride(0),
        signs.stride(0), signs.stride(1), signs.stride(2),
        *_scale_strides(scales),
        HAS_BIAS=bias is not None, MODE=MODE_CODE[mode], BITS=signs.shape[1],
        BT=bt, TG=cfg["TG"], BN=cfg["BN"], BK=cfg["BK"], BKD=cfg["BKD"], SWAP=cfg["SWAP"], ATOMIC=split > 1,
        PREC=_prec(x.dtype), UPCAST=_upcast(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        y.copy_(out)
    return y


def _block_table(seg_starts: torch.Tensor, num_tokens: int, bm: int):
    """Device-side map from program index to (segment, first row); no host sync, fixed sizes."""
    starts = seg_starts.to(torch.int64)
    s = starts.numel() - 1
    max_blocks = triton.cdiv(num_tokens, bm) + s
    lens = (starts[1:] - starts[:-1]).clamp_min(0)
    nb = (lens + bm - 1) // bm
    cum = torch.cumsum(nb, 0)
    b = torch.arange(max_blocks, device=seg_starts.device)
    seg = torch.searchsorted(cum, b, right=True)
    valid = seg < s
    segc = seg.clamp_max(s - 1)
    m0 = starts[segc] + (b - (cum[segc] - nb[segc])) * bm
    blk_seg = torch.where(valid, segc, -1).to(torch.int32)
    return blk_seg, m0.to(torch.int32), max_blocks


def bitdelta_segmented(x, weight, bias, signs, scales, mode, seg_starts, seg_ids, config: dict | None = None):
    """Prefill kernel: one fused GEMM per segment with W_base + Δ̂ rebuilt tile by tile.

    Contract: seg_starts [S+1] non-decreasing with seg_starts[0] == 0 and seg_starts[S] == T.
    """
    _common_asserts(x, weight, bias, signs, scales, mode)
    t, k = x.shape
    n = weight.shape[0]
    cfg = get_config("segmented", config)
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    s = seg_starts.numel() - 1
    if t == 0 or s <= 0:
        return y
    signs = signs.contiguous()
    scales = scales.contiguous().float()
    seg_starts = seg_starts.to(torch.int32).contiguous()
    seg_ids = seg_ids.to(torch.int32).contiguous()
    blk_seg, blk_m0, max_blocks = _block_table(seg_starts, t, cfg["BM"])
    grid = (max_blocks, triton.cdiv(n, cfg["BN"]))
    K_.bitdelta_segmented_kernel[grid](
        x, weight, bias if bias is not None else x, signs, scales, blk_seg, blk_m0, seg_starts, seg_ids, y,
        n, k, signs.shape[-1],
        x.stride(0), weight.stride(0), y.stride(0),
        signs.stride(0), signs.stride(1), signs.stride(2),
        *_scale_strides(scales),
        HAS_BIAS=bias is not None, MODE=MODE_CODE[mode], BITS=signs.shape[1],
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], SWAP=cfg["SWAP"], PREC=_prec(x.dtype), UPCAST=_upcast(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def sort_into_segments(ids: torch.Tensor):
    """Sorts tokens by tenant on the device: returns (order [T], seg_starts [T+1], seg_ids [T]).

    Segment i is the run of equal ids starting at sorted position i (empty unless i starts a run),
    so the table has a fixed size and needs no host sync.
    """
    t = ids.numel()
    sid, order = torch.sort(ids.to(torch.int32), stable=True)
    idx = torch.arange(t, device=ids.device)
    is_start = torch.ones(t, dtype=torch.bool, device=ids.device)
    is_start[1:] = sid[1:] != sid[:-1]
    start_pos = torch.where(is_start, idx, t)
    nxt = start_pos.flip(0).cummin(0).values.flip(0)  # smallest run start >= i
    seg_starts = torch.cat([nxt, torch.full((1,), t, device=ids.device, dtype=nxt.dtype)])
    return order, seg_starts.to(torch.int32), sid


def bitdelta_linear(x, weight, bias, signs, scales, mode, ids, config: dict | None = None):
    """Any T: the decode kernel up to 64 tokens, else sort by tenant and run the segmented GEMM."""
    if x.shape[0] <= DECODE_MAX_TOKENS:
        return bitdelta_decode(x, weight, bias, signs, scales, mode, ids, config)
    order, seg_starts, seg_ids = sort_into_segments(ids)
    ys = bitdelta_segmented(x.index_select(0, order), weight, bias, signs, scales, mode,
                            seg_starts, seg_ids, config)
    y = torch.empty_like(ys)
    y.index_copy_(0, order, ys)
    return y
