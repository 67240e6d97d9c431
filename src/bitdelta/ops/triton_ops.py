"""Launch wrappers for the Triton BitDelta kernels: asserts, allocation, config lookup, launch.

Shapes and semantics are those of :mod:`bitdelta.ops.reference`. The decode path neither syncs
with the host nor allocates a data-dependent amount of memory, so it can be captured in a CUDA
graph; the prefill path reads its segment table on the host to route long segments to cuBLAS.
Configs come from ``DEFAULT_CONFIGS`` (tuned on an H100) unless a ``config`` dict is given.

    y = bitdelta_decode(x, w, b, signs, scales, "row", ids)                  # T <= 128
    y = bitdelta_segmented(x, w, b, signs, scales, "col", starts, seg_ids)   # prefill
    w_d = expand_delta(w, signs[d], scales[d], "row")                        # W + Δ̂_d, dense
    y = bitdelta_linear(x, w, b, signs, scales, "scalar", ids)               # picks one of the two
"""

from __future__ import annotations

import os

import torch
import triton

from bitdelta.ops import DECODE_MAX_TOKENS
from bitdelta.ops import triton_kernels as K_
from bitdelta.ops.segment_table import SegmentTable
from bitdelta.scale_modes import MATRIX_MODES

from .launch import cdiv, interpreting, next_pow2

MODE_CODE = {m.value: m.code for m in MATRIX_MODES}  # the kernels' MODE constexpr
TARGET_PROGRAMS = 1024

# Launch configs; "decode" keyed by nothing (one config works across the three Llama shapes),
# "segmented" likewise. Override per call with config=...
DEFAULT_CONFIGS = {
    # SPLIT_K: programs along K (0 = auto: about TARGET_PROGRAMS programs in all); SWAP: weight
    # tile as the MMA's A operand (see triton_kernels._mm).
    # BKW: sign words per K step of the CUDA-core GEMV; DOT_MIN: tokens of one tenant from which
    # its delta goes to tensor cores instead; GEMV: the CUDA-core GEMV's arithmetic, 0 = a select
    # and an fp32 add per weight, 1 = 4-bit lookup tables, 2 = packed fp16 pairs (the decode op
    # 1.03-1.40x faster than with 0 on an H100 at B = 1-64, docs/benchmarks.md; it needs int32
    # sign words, row or scalar scales and fp16/bf16 inputs, else 0 runs). 2 rounds x to fp16: a
    # model whose activations exceed fp16's range (65504) sets BITDELTA_DECODE_GEMV=0.
    "decode": {"BN": 128, "BKD": 256, "BKW": 8, "TG": 16, "DOT_MIN": 4, "SPLIT_K": 0,
               "GEMV": int(os.environ.get("BITDELTA_DECODE_GEMV", "2")),
               "num_warps": 4, "num_stages": 2},
    # EXPAND_MIN: segments of at least this many rows go to cuBLAS against W + Δ̂ expanded once.
    "segmented": {"BM": 256, "BN": 128, "BK": 64, "SWAP": True, "num_warps": 8, "num_stages": 3,
                  "EXPAND_MIN": 512},
    "expand": {"BN": 32, "BK": 256, "num_warps": 4},
    # Prompt chunks of at most SHORT_ROWS rows per tenant (the engine's 128-token prompts and chunks):
    # a 256-row tile would leave half its rows empty; on an H200 these tiles ran 32 x 128-row
    # segments 1.4x faster than the default ones (benchmarks/prefill_step.py --sweep).
    "segmented_short": {"BM": 128, "BN": 64, "BK": 64, "SWAP": True, "num_warps": 4, "num_stages": 4},
}
SHORT_ROWS = 128


def get_config(op: str, override: dict | None = None) -> dict:
    if not override:  # read-only use: no copy (the decode wrapper runs per module per step)
        return DEFAULT_CONFIGS[op]
    cfg = dict(DEFAULT_CONFIGS[op])
    cfg.update(override)
    return cfg


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    """The CPU interpreter computes bf16 dots wrongly (triton 3.9); multiply in fp32 there."""
    return dtype == torch.bfloat16 and interpreting()


def _common_asserts(x, weight, bias, signs, scales, mode):
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert weight.dtype == x.dtype and x.stride(-1) == 1 and weight.stride(-1) == 1
    assert signs.dtype == torch.uint8 and signs.dim() == 4 and signs.shape[-1] * 8 >= x.shape[1]
    assert mode in MODE_CODE, mode
    assert bias is None or bias.is_contiguous()


def _scale_strides(scales: torch.Tensor):
    return scales.stride(0), (scales.stride(1) if scales.dim() > 1 else 0)


def _word_view(signs: torch.Tensor):
    """The sign planes as int32 words (32 columns each) when rows are a whole number of words."""
    if signs.shape[-1] % 4 == 0:
        return signs.view(torch.int32), 32
    return signs, 8


def decode_delta(x, signs, scales, mode, ids, config: dict | None = None) -> torch.Tensor:
    """The delta part of a small batch: ``Δ̂_{ids[t]} x[t]`` as fp32 ``[T, N]`` (0 where ids is -1).

    Each distinct tenant's product runs as its own programs, in parallel; no host sync.
    """
    t, k = x.shape
    n = signs.shape[2]
    assert t <= DECODE_MAX_TOKENS, f"decode kernel takes at most {DECODE_MAX_TOKENS} tokens (got {t})"
    cfg = get_config("decode", config)
    d32 = torch.zeros((t, n), dtype=torch.float32, device=x.device)
    if t == 0:
        return d32
    signs = signs.contiguous()
    words, wb = _word_view(signs)
    scales = scales.contiguous().float()
    ids = ids.to(torch.int32).contiguous()
    n_blocks = cdiv(n, cfg["BN"])
    step = max(cfg["BKD"], cfg["BKW"] * wb)
    split = cfg["SPLIT_K"] or max(1, TARGET_PROGRAMS // (n_blocks * t))
    k_split = cdiv(cdiv(k, split), step) * step
    split = cdiv(k, k_split)
    K_.bitdelta_decode_kernel[(n_blocks, t, split)](
        x, signs, words, scales, ids, d32,
        t, n, k, signs.shape[-1], words.shape[-1], k_split,
        x.stride(0), d32.stride(0),
        signs.stride(0), signs.stride(1), signs.stride(2),
        words.stride(0), words.stride(1), words.stride(2),
        *_scale_strides(scales),
        MODE=MODE_CODE[mode], BITS=signs.shape[1],
        BT=max(16, next_pow2(t)), TG=cfg["TG"], BN=cfg["BN"], BKD=cfg["BKD"], BKW=cfg["BKW"],
        WB=wb, DOT_MIN=cfg["DOT_MIN"], GEMV=cfg.get("GEMV", 0), PREC=_prec(x.dtype), UPCAST=_upcast(x.dtype),
        INTERP=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return d32


def bitdelta_decode(x, weight, bias, signs, scales, mode, ids, config: dict | None = None):
    """Small batches (T <= DECODE_MAX_TOKENS): the base product by cuBLAS, the deltas by
    :func:`decode_delta`, then one add. No host sync, fixed-size allocations: CUDA-graph safe."""
    _common_asserts(x, weight, bias, signs, scales, mode)
    if x.shape[0] == 0:
        return torch.empty((0, weight.shape[0]), dtype=x.dtype, device=x.device)
    d32 = decode_delta(x, signs, scales, mode, ids, config)
    if x.dtype == torch.float32:
        return torch.addmm(d32 if bias is None else d32 + bias, x, weight.t())
    return torch.nn.functional.linear(x, weight, bias).add_(d32)


def _block_table(seg_starts: torch.Tensor, num_tokens: int, bm: int, skip: torch.Tensor | None = None):
    """Device-side map from program index to (segment, first row); no host sync, fixed sizes.
    Segments where ``skip`` is true get no blocks (their rows are computed elsewhere)."""
    starts = seg_starts.to(torch.int64)
    s = starts.numel() - 1
    max_blocks = triton.cdiv(num_tokens, bm) + s
    lens = (starts[1:] - starts[:-1]).clamp_min(0)
    if skip is not None:
        lens = torch.where(skip, 0, lens)
    nb = (lens + bm - 1) // bm
    cum = torch.cumsum(nb, 0)
    b = torch.arange(max_blocks, device=seg_starts.device)
    seg = torch.searchsorted(cum, b, right=True)
    valid = seg < s
    segc = seg.clamp_max(s - 1)
    m0 = starts[segc] + (b - (cum[segc] - nb[segc])) * bm
    blk_seg = torch.where(valid, segc, -1).to(torch.int32)
    return blk_seg, m0.to(torch.int32), max_blocks


def expand_delta(weight, signs_d, scales_d, mode, config: dict | None = None):
    """W_base + Δ̂_d as a dense matrix in weight's dtype (signs_d [bits, N, KB], scales_d of the mode)."""
    n, k = weight.shape
    cfg = get_config("expand", config)
    signs_d = signs_d.contiguous()
    scales_d = scales_d.contiguous().float()
    out = torch.empty_like(weight)
    K_.expand_delta_kernel[(triton.cdiv(n, cfg["BN"]), triton.cdiv(k, cfg["BK"]))](
        weight, signs_d, scales_d, out, n, k, signs_d.shape[-1],
        weight.stride(0), out.stride(0), signs_d.stride(0), signs_d.stride(1),
        scales_d.stride(0) if scales_d.dim() > 1 else 0,
        MODE=MODE_CODE[mode], BITS=signs_d.shape[0], BN=cfg["BN"], BK=cfg["BK"], num_warps=cfg["num_warps"],
    )
    return out


def bitdelta_segmented(x, weight, bias, signs, scales, mode, seg_starts, seg_ids, config: dict | None = None,
                       table: SegmentTable | None = None):
    """Prefill: segments of at least ``EXPAND_MIN`` rows run as one cuBLAS GEMM against
    W_base + Δ̂ (expanded once per segment); shorter ones share one fused Triton GEMM that rebuilds
    W_base + Δ̂ tile by tile. ``table``: the same segments as host lists
    (:class:`~bitdelta.ops.segment_table.SegmentTable`), which spares the host reads of the segment
    table and the device-side block map; without it the table is read on the host when
    ``EXPAND_MIN`` is set (the prefill path is not graph-captured), and ``EXPAND_MIN = 0`` keeps
    everything on the device. Segments of at most ``SHORT_ROWS`` rows take the ``segmented_short``
    tiles when the table is known and no ``config`` is given.

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
    expand_min = cfg.get("EXPAND_MIN", 0)
    if table is not None:
        if table.num_rows != t or len(table.ids) != s:
            raise ValueError(f"the segment table covers {table.num_rows} rows in {len(table.ids)} segments; the call "
                             f"has {t} rows in {s}")
        starts, sids = table.starts, table.ids
        if not config and 0 < table.longest_short(expand_min) <= SHORT_ROWS:
            cfg = {**DEFAULT_CONFIGS["segmented_short"], "EXPAND_MIN": expand_min}
    elif expand_min > 0:
        starts, sids = seg_starts.tolist(), seg_ids.tolist()
    if table is not None:
        long = table.long_segments(expand_min)
    else:
        long = [i for i in range(s) if starts[i + 1] - starts[i] >= expand_min] if expand_min > 0 else []
    for i in long:
        a, b, d = starts[i], starts[i + 1], sids[i]
        wd = weight if d < 0 else expand_delta(weight, signs[d], scales[d], mode, config)
        if bias is None:
            torch.mm(x[a:b], wd.t(), out=y[a:b])
        else:
            torch.addmm(bias, x[a:b], wd.t(), out=y[a:b])
    if len(long) == s:
        return y
    seg_starts = seg_starts.to(torch.int32).contiguous()
    seg_ids = seg_ids.to(torch.int32).contiguous()
    if table is not None:
        blk_seg, blk_m0, num_blocks = table.blocks(cfg["BM"], expand_min, x.device)
    else:
        skip = None
        if long:
            skip = torch.zeros(s, dtype=torch.bool)
            skip[long] = True
            skip = skip.to(x.device)
        blk_seg, blk_m0, num_blocks = _block_table(seg_starts, t, cfg["BM"], skip)
    grid = (num_blocks, triton.cdiv(n, cfg["BN"]))
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
    """Any T: the decode kernel up to DECODE_MAX_TOKENS tokens, else sort by tenant and run the segmented GEMM."""
    if x.shape[0] <= DECODE_MAX_TOKENS:
        return bitdelta_decode(x, weight, bias, signs, scales, mode, ids, config)
    order, seg_starts, seg_ids = sort_into_segments(ids)
    ys = bitdelta_segmented(x.index_select(0, order), weight, bias, signs, scales, mode,
                            seg_starts, seg_ids, config)
    y = torch.empty_like(ys)
    y.index_copy_(0, order, ys)
    return y
