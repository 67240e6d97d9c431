"""Decode delta product on binary tensor cores: CUDA C++ compiled at run time by NVRTC (sm_80+).

Algorithm and error bound: :mod:`bitdelta.ops.bitplane` (its pure-PyTorch functions are this
kernel's spec). Two launches per call:

* ``bd_popc_prep`` (grid: 512-column groups × tokens × planes): quantises each token's input
  (times the column scales in ``col`` mode) to int8 per group and writes its 8 bit planes with one
  warp ballot per plane and 32 columns, plus the group's scale and ``scale · Σx_int``.
* ``bd_popc_delta`` (grid: 16·NW-row blocks × token slots × K splits): each warp owns 16 output
  rows; per 512-column group it loads two 16-byte sign words per thread, straight from the packed
  layout (the MMA's A fragment is 32 consecutive columns of one row per register, which is what an
  aligned 4-byte slice of a packed row holds, so no repacking and no decoding), and runs two
  ``mma.sync.m16n8k256.b1.and.popc`` per token against the token's 8 bit planes (the N=8 columns).
  The program of token slot i works only if token i starts a run of ``TG`` tokens of its tenant
  (rank 0, TG, 2TG, ... in batch order) and does those tokens: a tenant with one token has its
  bits read by one program, one with many tokens by several programs in parallel, whose repeated
  reads of the same signs mostly hit L2. Partial sums go atomically into an fp32 buffer, zeroed by
  the prep kernel, like the Triton decode kernel's.

Needs only what a CUDA build of PyTorch already installs (the NVRTC library it loads and the
driver): no compiler at run time, no extra package. :func:`available` says whether it can run;
the decode dispatcher falls back to the Triton kernel when it cannot.

    d32 = decode_delta(x, signs, scales, "row", ids)                 # fp32 [T, N], delta term only
    y = bitdelta_decode(x, w, b, signs, scales, "row", ids)          # base (cuBLAS) + delta
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import torch

from bitdelta.errors import BitDeltaError
from bitdelta.scale_modes import ScaleMode

from .launch import cdiv

GROUP = 512  # columns per quantisation group and per warp step (bitplane.GROUP)
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
MAX_TOKENS = 128  # the tenant scan covers at most this many token slots (ops.DECODE_MAX_TOKENS)

# NW: warps per block (16 rows each); TG: tokens of one tenant per program (a tenant with more
# tokens is spread over several programs, which re-read its signs mostly from L2); U: groups whose sign
# words are loaded before the first MMA (loads in flight); TARGET: blocks to aim for when choosing
# the K split; OVERLAP_MAX: batches of at most this many tokens run the delta on a side stream
# beside the cuBLAS base product (measured faster up to 16 on an H200, docs/benchmarks.md).
# TG 4 beat TG 1 at 16-64 tenants on an H200 although TG 1 needs half the registers (56 vs 124).
DEFAULT_CONFIG = {"NW": 4, "TG": 4, "U": 4, "TARGET": 1024, "OVERLAP_MAX": 16}


class PopcUnavailable(BitDeltaError):
    """The binary tensor-core kernel cannot run here (no NVRTC library, no driver, or a GPU older
    than sm_80); use the Triton kernel (``BITDELTA_DECODE_KERNEL=triton``)."""


_SOURCE = r"""
#define FULL 0xffffffffu

__device__ __forceinline__ float load_x(const void* x, long long idx) {
#if XDT == 0
    unsigned short h = ((const unsigned short*)x)[idx];
    float f;
    asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
#elif XDT == 1
    unsigned short h = ((const unsigned short*)x)[idx];
    return __uint_as_float(((unsigned)h) << 16);
#else
    return ((const float*)x)[idx];
#endif
}

// One 512-column group of one token (and delta plane p in col mode): int8 quantisation with one
// scale, 8 bit planes of 16 words (bit j of word w = column 32w + j of the group), scale and
// scale * sum of the integers. One thread per column.
// It also zeroes the output row of token t (slice c of NCH), which bd_popc_delta then adds into,
// saving a memset launch.
extern "C" __global__ void __launch_bounds__(512) bd_popc_prep(
    const void* x, const float* cs, const int* ids, unsigned* planes, float2* qsx, float* out,
    int T, int K, int NCH, int P, int sxt, int csd, int csp, int N, int sot)
{
    const int c = blockIdx.x, t = blockIdx.y, p = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (p == 0) {
        const int seg = (N + NCH - 1) / NCH;
        const int hi = min(N, (c + 1) * seg);
        for (int n = c * seg + tid; n < hi; n += 512) out[(long long)t * sot + n] = 0.f;
    }
    const int d = ids[t];
    if (d < 0) return;  // base-only token: its planes are never read
    const int k = c * 512 + tid;
    float v = 0.f;
    if (k < K) {
        v = load_x(x, (long long)t * sxt + k);
#if MODE == 2
        v = v * cs[(long long)d * csd + (long long)p * csp + k];
#endif
    }
    __shared__ float smax[16];
    __shared__ int ssum[16];
    float m = fabsf(v);
    #pragma unroll
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
    if (lane == 0) smax[warp] = m;
    __syncthreads();
    float amax = smax[0];
    #pragma unroll
    for (int i = 1; i < 16; i++) amax = fmaxf(amax, smax[i]);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    const int xi = __float2int_rn(v * inv);
    unsigned* dst = planes + (((long long)t * P + p) * NCH + c) * 128;
    #pragma unroll
    for (int b = 0; b < 8; b++) {
        const unsigned word = __ballot_sync(FULL, (xi >> b) & 1);
        if (lane == b) dst[b * 16 + warp] = word;
    }
    int s = xi;
    #pragma unroll
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    if (lane == 0) ssum[warp] = s;
    __syncthreads();
    if (tid == 0) {
        int tot = 0;
        #pragma unroll
        for (int i = 0; i < 16; i++) tot += ssum[i];
        const float q = amax / 127.f;
        qsx[((long long)t * P + p) * NCH + c] = make_float2(q, q * (float)tot);
    }
}

// 16 bytes of a packed sign row from byte `off`; zero past the row (KB bytes) or for a masked row.
__device__ __forceinline__ uint4 ld_signs(const unsigned char* row, int off, int KB, bool valid) {
    uint4 r = make_uint4(0u, 0u, 0u, 0u);
#if ALIGNED
    if (valid && off < KB) {
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
            : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(row + off));
    }
#else
    if (valid) {
        unsigned w[4];
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            unsigned v = 0u;
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                const int o = off + 4 * i + j;
                if (o < KB) v |= ((unsigned)row[o]) << (8 * j);
            }
            w[i] = v;
        }
        r = make_uint4(w[0], w[1], w[2], w[3]);
    }
#endif
    return r;
}

__device__ __forceinline__ void bmma(int* acc, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                     unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// y[t, n] += delta term for tokens rank..rank+TG-1 of the tenant of token slot blockIdx.y (if that
// token's rank among its tenant's tokens is a multiple of TG), rows of warp w of block blockIdx.x,
// groups of split blockIdx.z.
extern "C" __global__ void __launch_bounds__(NW * 32) bd_popc_delta(
    const unsigned char* signs, const uint4* planes, const float2* qsx, const float* scales,
    const int* ids, float* out,
    int T, int N, int KB, int NCH, int CPS, int BITS, int P,
    int ssd, int ssp, int ssn, int scd, int scp, int sot)
{
    __shared__ int s_tok[128];
    __shared__ int s_cnt, s_skip;
    const int i = blockIdx.y;
    const int d = ids[i];
    if (d < 0) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (warp == 0) {
        int cnt = 0, rank = 0;
        for (int base = 0; base < T; base += 32) {
            const int t = base + lane;
            const bool m = t < T && ids[t] == d;
            const unsigned bal = __ballot_sync(FULL, m);
            if (m) s_tok[cnt + __popc(bal & ((1u << lane) - 1u))] = t;
            rank += __popc(__ballot_sync(FULL, m && t < i));
            cnt += __popc(bal);
        }
        // Token i is its tenant's rank-th: the block works if it starts a pass of TG tokens.
        if (lane == 0) { s_cnt = cnt; s_skip = rank % TG ? -1 : rank; }
    }
    __syncthreads();
    if (s_skip < 0) return;
    const int g0 = s_skip;
    const int cnt = s_cnt;
    const int r0 = (blockIdx.x * NW + warp) * 16;
    const int c_lo = blockIdx.z * CPS;
    const int c_hi = min(NCH, c_lo + CPS);
    if (r0 >= N || c_lo >= c_hi) return;
    const int g = lane >> 2, tig = lane & 3;
    const int rowA = r0 + g, rowB = r0 + g + 8;
    const bool vA = rowA < N, vB = rowB < N;
    // Weights of the two bit planes this thread's accumulators hold (columns 2tig, 2tig + 1).
    const float wlo = (float)(1 << (2 * tig));
    const float whi = tig == 3 ? -128.f : (float)(1 << (2 * tig + 1));

    {
        float res[TG][2];
        #pragma unroll
        for (int j = 0; j < TG; j++) { res[j][0] = 0.f; res[j][1] = 0.f; }
        for (int p = 0; p < BITS; p++) {
            const unsigned char* base = signs + (long long)d * ssd + (long long)p * ssp;
            const unsigned char* ra = base + (long long)rowA * ssn;
            const unsigned char* rb = base + (long long)rowB * ssn;
            const int pp = MODE == 2 ? p : 0;
            float facc[TG][4];
            float corr[TG];
            #pragma unroll
            for (int j = 0; j < TG; j++) {
                facc[j][0] = facc[j][1] = facc[j][2] = facc[j][3] = 0.f;
                corr[j] = 0.f;
            }
            for (int c0 = c_lo; c0 < c_hi; c0 += U) {
                uint4 sa[U], sb[U];
                #pragma unroll
                for (int u = 0; u < U; u++) {
                    const int off = (c0 + u) * 64 + tig * 16;
                    const bool in = c0 + u < c_hi;
                    sa[u] = ld_signs(ra, off, KB, vA && in);
                    sb[u] = ld_signs(rb, off, KB, vB && in);
                }
                #pragma unroll
                for (int j = 0; j < TG; j++) {
                    if (g0 + j < cnt) {
                        const long long pbase = ((long long)s_tok[g0 + j] * P + pp) * NCH;
                        #pragma unroll
                        for (int u = 0; u < U; u++) {
                            if (c0 + u < c_hi) {
                                // Thread (g, tig) holds words 4tig..4tig+3 of bit plane g.
                                const uint4 xb = planes[(pbase + c0 + u) * 32 + lane];
                                int acc[4] = {0, 0, 0, 0};
                                bmma(acc, sa[u].x, sb[u].x, sa[u].y, sb[u].y, xb.x, xb.y);
                                bmma(acc, sa[u].z, sb[u].z, sa[u].w, sb[u].w, xb.z, xb.w);
                                const float2 q = qsx[pbase + c0 + u];
                                facc[j][0] += q.x * (float)acc[0];
                                facc[j][1] += q.x * (float)acc[1];
                                facc[j][2] += q.x * (float)acc[2];
                                facc[j][3] += q.x * (float)acc[3];
                                corr[j] += q.y;
                            }
                        }
                    }
                }
            }
            float s0 = 1.f, s1 = 1.f;
#if MODE == 0
            s0 = s1 = scales[(long long)d * scd + (long long)p * scp];
#elif MODE == 1
            s0 = vA ? scales[(long long)d * scd + (long long)p * scp + rowA] : 0.f;
            s1 = vB ? scales[(long long)d * scd + (long long)p * scp + rowB] : 0.f;
#endif
            #pragma unroll
            for (int j = 0; j < TG; j++) {
                if (g0 + j < cnt) {
                    float v0 = wlo * facc[j][0] + whi * facc[j][1];
                    float v1 = wlo * facc[j][2] + whi * facc[j][3];
                    v0 += __shfl_xor_sync(FULL, v0, 1);
                    v1 += __shfl_xor_sync(FULL, v1, 1);
                    v0 += __shfl_xor_sync(FULL, v0, 2);
                    v1 += __shfl_xor_sync(FULL, v1, 2);
                    res[j][0] += s0 * (2.f * v0 - corr[j]);
                    res[j][1] += s1 * (2.f * v1 - corr[j]);
                }
            }
        }
        #pragma unroll
        for (int j = 0; j < TG; j++) {
            if (g0 + j < cnt) {
                float* o = out + (long long)s_tok[g0 + j] * sot;
                if (tig == 0 && vA) atomicAdd(o + rowA, res[j][0]);
                if (tig == 1 && vB) atomicAdd(o + rowB, res[j][1]);
            }
        }
    }
}
"""


def kernel_source(xdt: int, mode: int, nw: int, tg: int, u: int, aligned: bool) -> str:
    """The CUDA source for one variant (compile-time constants as #defines)."""
    head = f"#define XDT {xdt}\n#define MODE {mode}\n#define NW {nw}\n#define TG {tg}\n#define U {u}\n"
    return head + f"#define ALIGNED {int(aligned)}\n" + _SOURCE


# ---------------------------------------------------------------------------------------------
# NVRTC + driver API through ctypes: nothing beyond the libraries a CUDA build of PyTorch loads.

_LOCK = threading.Lock()
_LIBS: tuple | None = None
_MODULES: dict = {}
_AVAILABLE: dict[int, bool] = {}


def _load_nvrtc():
    try:  # the library torch itself uses (already loaded by a CUDA build of torch)
        from torch.cuda._utils import _get_nvrtc_library

        return _get_nvrtc_library()
    except Exception:
        pass
    major = (torch.version.cuda or "12").split(".")[0]
    names = [f"libnvrtc.so.{major}", "libnvrtc.so"]
    site = os.path.dirname(os.path.dirname(torch.__file__))  # pip's nvidia-cuda-nvrtc wheel lives beside torch
    names += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise PopcUnavailable("no NVRTC library found (install a CUDA build of torch, which brings nvidia-cuda-nvrtc)")


def _libs():
    global _LIBS
    if _LIBS is None:
        try:
            cuda = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise PopcUnavailable(f"no CUDA driver library (libcuda.so.1): {e}") from None
        cuda.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 6 + [
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        _LIBS = (_load_nvrtc(), cuda)
    return _LIBS


def _check_cu(res: int, what: str) -> None:
    if res != 0:
        _, cuda = _libs()
        msg = ctypes.c_char_p()
        cuda.cuGetErrorString(res, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {res} ({(msg.value or b'?').decode()})")


def _compile(src: str, arch: str) -> bytes:
    nvrtc, _ = _libs()
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"bd_popc.cu", 0, None, None):
        raise PopcUnavailable("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-lineinfo"]
    res = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    if res:
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
        raise PopcUnavailable(f"NVRTC could not compile the popc kernel for {arch}: {log.value.decode()[:2000]}")
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


def _ensure_context(device: torch.device) -> None:
    """Makes the device's primary context (the one torch uses) current in this thread."""
    _, cuda = _libs()
    ctx = ctypes.c_void_p()
    _check_cu(cuda.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        torch.cuda.set_device(device)
        torch.cuda.current_stream(device).synchronize()  # a runtime call makes the context current
        cuda.cuCtxGetCurrent(ctypes.byref(ctx))
        if not ctx.value:
            dev = ctypes.c_int()
            _check_cu(cuda.cuDeviceGet(ctypes.byref(dev), device.index or 0), "cuDeviceGet")
            _check_cu(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            _check_cu(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def _functions(device: torch.device, key: tuple):
    """(prep, delta) CUfunction handles for a variant on a device, compiled once per process."""
    full = (device.index,) + key
    fns = _MODULES.get(full)
    if fns is not None:
        return fns
    with _LOCK:
        fns = _MODULES.get(full)
        if fns is None:
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                raise PopcUnavailable(f"the binary MMA needs sm_80 or newer (this GPU is sm_{major}{minor})")
            cubin = _compile(kernel_source(*key), f"sm_{major}{minor}")
            _, cuda = _libs()
            with torch.cuda.device(device):
                _ensure_context(device)
                mod = ctypes.c_void_p()
                _check_cu(cuda.cuModuleLoadData(ctypes.byref(mod), cubin), "cuModuleLoadData")
                fns = []
                for name in (b"bd_popc_prep", b"bd_popc_delta"):
                    f = ctypes.c_void_p()
                    _check_cu(cuda.cuModuleGetFunction(ctypes.byref(f), mod, name), "cuModuleGetFunction")
                    fns.append(f)
            fns = _MODULES[full] = (tuple(fns), mod)
    return fns


def _launch(fn, grid, block, args, stream: int) -> None:
    _, cuda = _libs()
    holders = [a if isinstance(a, ctypes._SimpleCData) else ctypes.c_int(a) for a in args]
    # Each parameter's address, as cuLaunchKernel takes them; addressof gives the same pointers as
    # cast(byref(h)) for less host time (an eager step launches hundreds of these).
    params = (ctypes.c_void_p * len(holders))(*map(ctypes.addressof, holders))
    _check_cu(cuda.cuLaunchKernel(fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], 0,
                                  ctypes.c_void_p(stream), params, None), "cuLaunchKernel")


def available(device: torch.device | str | None = None) -> bool:
    """True when the kernel compiles and loads on ``device`` (default: the current CUDA device);
    the answer for each device is computed once per process."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    ok = _AVAILABLE.get(dev.index)
    if ok is None:
        try:
            _functions(dev, (0, 1, DEFAULT_CONFIG["NW"], DEFAULT_CONFIG["TG"], DEFAULT_CONFIG["U"], True))
            ok = True
        except (PopcUnavailable, RuntimeError, OSError, AttributeError):
            ok = False
        _AVAILABLE[dev.index] = ok
    return ok


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def decode_delta(x, signs, scales, mode, ids, config: dict | None = None) -> torch.Tensor:
    """``Δ̂_{ids[t]} x[t]`` as fp32 ``[T, N]`` (0 where ids is -1), by the binary tensor cores.

    x [T, K] fp16/bf16/fp32 (T <= 128), signs [D, bits, N, ceil(K/8)] uint8, scales of the mode,
    ids [T] int. No host sync, fixed-size allocations: CUDA-graph safe.
    """
    return decode_delta_group(x, [(signs, scales)], mode, ids, config)


def decode_delta_group(x, members, mode, ids, config: dict | None = None) -> torch.Tensor:
    """The delta terms of several matrices that read the same input (a layer's q, k and v, or its
    gate and up), side by side: fp32 ``[T, N_1 + N_2 + ...]``.

    ``members``: ``(signs [D, bits, N_i, ceil(K/8)], scales)`` per matrix, all of one ``K``, bit
    count and mode. The input is quantised into bit planes once (one prep launch, which also zeroes
    the whole output), then one delta launch per matrix writes its columns: a group of three costs
    four launches where three separate calls cost six. Column scales multiply the input before it
    is quantised, so ``col`` mode takes one matrix at a time.
    """
    if x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # its module and context belong to x's device
            return decode_delta_group(x, members, mode, ids, config)
    cfg = DEFAULT_CONFIG if not config else {**DEFAULT_CONFIG, **config}
    t, k = x.shape
    if not members:
        raise BitDeltaError("decode_delta_group needs at least one (signs, scales) pair")
    if mode == "col" and len(members) > 1:
        raise BitDeltaError("column-scaled deltas quantise the input per matrix: call decode_delta once per matrix")
    if t > MAX_TOKENS:
        raise BitDeltaError(f"the popc decode kernel takes at most {MAX_TOKENS} tokens (got {t}); use the segmented op")
    if x.dtype not in DTYPE_CODE:
        raise BitDeltaError(f"x must be fp16, bf16 or fp32 for the popc kernel (got {x.dtype})")
    bits, kb = members[0][0].shape[1], members[0][0].shape[3]
    for signs, _ in members:
        if signs.shape[1] != bits or signs.shape[3] != kb:
            raise BitDeltaError(f"the matrices of a group must share bits and K (got {tuple(signs.shape)} "
                                f"beside {tuple(members[0][0].shape)})")
    widths = [signs.shape[2] for signs, _ in members]
    n_total = sum(widths)
    if t == 0 or n_total == 0:
        return torch.zeros((t, n_total), dtype=torch.float32, device=x.device)
    out = torch.empty((t, n_total), dtype=torch.float32, device=x.device)  # zeroed by the prep kernel
    if x.stride(1) != 1:
        x = x.contiguous()
    ids = ids.to(torch.int32).contiguous()
    nch = cdiv(k, GROUP)
    p = bits if mode == "col" else 1
    planes = torch.empty((t, p, nch, 128), dtype=torch.int32, device=x.device)
    qsx = torch.empty((t, p, nch, 2), dtype=torch.float32, device=x.device)
    nw, tg, u = int(cfg["NW"]), int(cfg["TG"]), int(cfg["U"])
    stream = torch.cuda.current_stream(x.device).cuda_stream
    col = 0
    for i, (signs, scales) in enumerate(members):
        signs = signs.contiguous()
        scales = scales.contiguous().float()
        n = widths[i]
        aligned = kb % 16 == 0 and signs.data_ptr() % 16 == 0
        (prep, delta), _ = _functions(x.device, (DTYPE_CODE[x.dtype], ScaleMode(mode).code, nw, tg, u, aligned))
        sc_d = scales.stride(0)
        sc_p = scales.stride(1) if scales.dim() > 1 else 0
        if i == 0:
            _launch(prep, (nch, t, p), (512, 1, 1),
                    [_ptr(x), _ptr(scales), _ptr(ids), _ptr(planes), _ptr(qsx), _ptr(out), t, k, nch, p, x.stride(0),
                     sc_d, sc_p, n_total, out.stride(0)],
                    stream)
        if n == 0:
            continue
        nbx = cdiv(n, 16 * nw)
        split = max(1, min(nch, cdiv(int(cfg["TARGET"]), nbx * t)))
        cps = cdiv(nch, split)
        split = cdiv(nch, cps)
        # this matrix's columns: the output pointer moved ``col`` floats along the row
        dst = ctypes.c_void_p(out.data_ptr() + 4 * col)
        _launch(delta, (nbx, t, split), (32 * nw, 1, 1),
                [_ptr(signs), _ptr(planes), _ptr(qsx), _ptr(scales), _ptr(ids), dst,
                 t, n, kb, nch, cps, bits, p, signs.stride(0), signs.stride(1), signs.stride(2), sc_d, sc_p,
                 out.stride(0)],
                stream)
        col += n
    return out


_SIDE: dict = {}


def bitdelta_decode(x, weight, bias, signs, scales, mode, ids, config: dict | None = None,
                    overlap: bool | None = None):
    """Base product (cuBLAS) + :func:`decode_delta` + one add; ``[T, N]`` in x's dtype.

    ``overlap=True`` runs the delta kernels on a side stream while cuBLAS runs the base product
    (both in flight at once, joined before the add; capturable in a CUDA graph); ``None`` does so
    for batches of at most ``OVERLAP_MAX`` tokens.
    """
    return bitdelta_decode_group(x, weight, bias, [(signs, scales)], mode, ids, config, overlap)


def bitdelta_decode_group(x, weight, bias, members, mode, ids, config: dict | None = None,
                          overlap: bool | None = None):
    """:func:`bitdelta_decode` of matrices stacked along the output: ``weight [N_1 + N_2 + ..., K]``
    is their base rows one after the other, ``members`` their ``(signs, scales)`` in that order
    (:func:`decode_delta_group`). One base GEMM, one prep, a delta launch per matrix, one add."""
    if x.shape[0] == 0:
        return torch.empty((0, weight.shape[0]), dtype=x.dtype, device=x.device)
    if overlap is None:
        cfg = DEFAULT_CONFIG if not config else {**DEFAULT_CONFIG, **config}
        overlap = x.shape[0] <= cfg["OVERLAP_MAX"]
    if overlap:
        cur = torch.cuda.current_stream(x.device)
        side = _SIDE.get(x.device.index)
        if side is None:
            side = _SIDE[x.device.index] = torch.cuda.Stream(x.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            d32 = decode_delta_group(x, members, mode, ids, config)
        y = torch.nn.functional.linear(x, weight, bias)
        cur.wait_stream(side)
        d32.record_stream(cur)
    else:
        d32 = decode_delta_group(x, members, mode, ids, config)
        y = torch.nn.functional.linear(x, weight, bias)
    return y.add_(d32)
