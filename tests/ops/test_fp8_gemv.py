"""The FP8 weight-only GEMV (bitdelta.ops.fp8_gemv): the reference against a dense product, the Triton
kernel against the reference.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py sets it first). The
interpreter converts e4m3fn like the GPU for every finite value (the two NaN codes come out as ±480,
which a quantized weight never holds); it rounds float32 to bfloat16 toward zero where a GPU rounds
to nearest, which the tolerance covers (one unit in the last place of the output).

Tolerance, against the product computed in float64: the kernel takes every product exactly in
float32 (an e4m3 value has 4 significant bits, a bf16/fp16 value 8/11), so it differs only by the
float32 sums (at most ``K · 2⁻²⁴ · Σ|x·w|``, the standard bound for K additions in any order) and
the final rounding to the output dtype (less than one unit in the last place: ``2⁻⁷ |y|`` for
bfloat16, ``2⁻¹⁰ |y|`` for float16). The reference obeys the same bound, so kernel and reference
agree within twice it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bitdelta.ops.fp8_gemv import (
    MAX_ROWS,
    GemvConfig,
    default_config,
    fp8_weight_only_reference,
    fp8_weight_only_triton,
)

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}
# small tiles so that the interpreter stays fast and every tail (N, K, the rows) is masked
CONFIGS = {
    "default": None,
    "cuda-cores": GemvConfig(use_dot=False, block_n=16, block_k=64),
    "tensor-cores": GemvConfig(use_dot=True, block_n=16, block_k=64),
    "split-k": GemvConfig(use_dot=True, block_n=32, block_k=32, split_k=3),
    "cuda-cores-split-k": GemvConfig(use_dot=False, block_n=16, block_k=32, split_k=4),
}
SHAPES = [(37, 300), (50, 97)]  # (N, K): neither a multiple of any tile


def _inputs(m, n, k, dtype, seed, device=DEVICE):
    """Random activations and an FP8 weight quantized per row as bitdelta.quant does (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.05
    scale = w.abs().amax(dim=1) / 448.0
    q = (w / scale[:, None]).to(torch.float8_e4m3fn)
    return x.to(device), q.to(device), scale.to(device)


def _bound(x, q, scale):
    """(float64 product, the tolerance of the module docstring)."""
    xd, qd, sd = x.double(), q.double(), scale.double().reshape(1, -1)
    exact = (xd @ qd.t()) * sd
    magnitude = (xd.abs() @ qd.abs().t()) * sd
    return exact, ULP[x.dtype] * exact.abs() + x.shape[1] * 2.0**-24 * magnitude


def _assert_within(y, want, bound, what):
    excess = (y.double() - want.double()).abs() - bound
    assert float(excess.max()) <= 0, f"{what}: {float(excess.max()):.3g} beyond the bound"


def test_reference_is_the_dense_product():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, q, scale = _inputs(5, 29, 71, dtype, seed=1, device="cpu")
        y = fp8_weight_only_reference(x, q, scale)
        assert y.dtype == dtype and y.shape == (5, 29)
        dense = (x.float() @ (q.float() * scale[:, None]).t()).to(dtype)  # the dequantized weight, multiplied
        torch.testing.assert_close(y, dense, rtol=ULP[dtype], atol=1e-6)
        exact, bound = _bound(x, q, scale)
        _assert_within(y, exact, bound, "reference")
        assert float(y.float().abs().min()) > 0 or dtype != torch.float32  # a real product, not zeros
    # an [N, 1] scale (as checkpoints store it) is the same scale
    assert torch.equal(fp8_weight_only_reference(x, q, scale.reshape(-1, 1)), y)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_kernel_matches_reference(m, dtype, config):
    for i, (n, k) in enumerate(SHAPES):
        x, q, scale = _inputs(m, n, k, dtype, seed=100 * m + i)
        y = fp8_weight_only_triton(x, q, scale, config=CONFIGS[config])
        assert y.dtype == dtype and y.shape == (m, n) and bool(torch.isfinite(y).all())
        exact, bound = _bound(x, q, scale)
        _assert_within(y, exact, bound, f"kernel {config} m={m} {n}x{k}")
        _assert_within(y, fp8_weight_only_reference(x, q, scale), 2 * bound, f"kernel vs reference {config}")


@pytest.mark.parametrize("soft", [False, True], ids=["e4m3-type", "integer-conversion"])
def test_every_finite_e4m3_value_converts_exactly(soft):
    """Both conversions (Triton's float8e4nv and the integer one for older GPUs) on every finite code:
    one column of weights, x = 1 and scale 1 return the weights themselves."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)  # 0x7F/0xFF: NaN
    q = codes.view(torch.float8_e4m3fn).reshape(-1, 1).to(DEVICE)
    x = torch.ones(1, 1, device=DEVICE)
    scale = torch.ones(q.shape[0], device=DEVICE)
    for config in (GemvConfig(False, 16, 16), GemvConfig(True, 16, 16)):
        y = fp8_weight_only_triton(x, q, scale, config=config, soft_fp8=soft)
        assert torch.equal(y[0], q.float()[:, 0]), config


def test_split_k_is_deterministic_and_x_may_be_a_strided_view():
    x, q, scale = _inputs(4, 45, 260, torch.bfloat16, seed=5)
    cfg = GemvConfig(use_dot=True, block_n=16, block_k=32, split_k=3)
    a = fp8_weight_only_triton(x, q, scale, config=cfg)
    assert torch.equal(a, fp8_weight_only_triton(x, q, scale, config=cfg))  # partial sums added in a fixed order
    wide = torch.zeros(4, 2 * 260, dtype=torch.bfloat16, device=DEVICE)
    wide[:, 7:267] = x  # rows further apart than K, and an offset start
    assert torch.equal(fp8_weight_only_triton(wide[:, 7:267], q, scale, config=cfg), a)
    cols = x.t().contiguous().t()  # column-major: copied to rows first
    assert torch.equal(fp8_weight_only_triton(cols, q, scale, config=cfg), a)


def test_empty_batch_and_k_split_past_the_end():
    x, q, scale = _inputs(2, 20, 40, torch.float16, seed=6)
    assert fp8_weight_only_triton(x[:0], q, scale).shape == (0, 20)
    # more slices asked for than K has steps: as many as there are steps
    y = fp8_weight_only_triton(x, q, scale, config=GemvConfig(False, 16, 32, split_k=8))
    exact, bound = _bound(x, q, scale)
    _assert_within(y, exact, bound, "split past the end")


def test_bad_inputs_are_refused_with_a_reason(monkeypatch):
    x, q, scale = _inputs(2, 20, 40, torch.bfloat16, seed=7)
    for fn in (fp8_weight_only_reference, fp8_weight_only_triton):
        with pytest.raises(ValueError, match="float8_e4m3fn"):
            fn(x, q.float(), scale)
        with pytest.raises(ValueError, match="columns"):
            fn(x[:, :39], q, scale)
        with pytest.raises(ValueError, match="one value per row"):
            fn(x, q, scale[:19])
        with pytest.raises(ValueError, match="float32"):
            fn(x, q, scale.to(torch.bfloat16))
        with pytest.raises(ValueError, match="2-D float16"):
            fn(x.to(torch.int32), q, scale)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        fp8_weight_only_triton(torch.randn(MAX_ROWS + 1, 40, device=DEVICE), q, scale)
    with pytest.raises(ValueError, match="contiguous"):
        fp8_weight_only_triton(x, q.t().contiguous().t(), scale)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs CUDA"):
            fp8_weight_only_triton(x, q, scale)


def test_default_config():
    sms = 132  # an H200
    one, two, three = (default_config(m, 4096, 4096, sms) for m in (1, 2, 3))
    assert not one.use_dot and not two.use_dot and three.use_dot  # a GEMV on CUDA cores for one or two rows
    assert one.split_k == 1 and default_config(16, 11008, 4096, sms).split_k == 1  # enough row strips
    kv = default_config(1, 1024, 8192, sms)  # a 70B K/V projection: 64 strips on 132 SMs
    assert kv.split_k > 1 and kv.split_k * -(-1024 // kv.block_n) >= sms
    assert default_config(1, 64, 512, sms).split_k == 1  # too short a K to split


# Compiles the kernel for a GPU that is not there (Triton ships its LLVM and ptxas): what a CUDA machine
# would build, with the divisibility Triton specializes for 16-aligned pointers and K.
_AOT = textwrap.dedent("""
    import json, re, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bitdelta.ops import fp8_gemv as G

    gemv, _ = G._kernels()
    facts = []
    for arch, use_dot, bm, soft in json.loads(sys.argv[1]):
        sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": "*bf16"}
        sig.update({a: "i32" for a in ("M", "N", "K", "stride_xm", "stride_qn", "stride_om", "stride_os",
                                       "k_per_split")})
        consts = {"BM": bm, "BN": 16, "BK": 256, "USE_DOT": use_dot, "SPLIT": False, "SOFT_FP8": soft,
                  "CT": tl.bfloat16, "PREC": "tf32", "POST": 256.0 if soft else 1.0}
        sig.update({c: "constexpr" for c in consts})
        aligned = ("x_ptr", "q_ptr", "s_ptr", "out_ptr", "N", "K", "stride_xm", "stride_qn", "stride_om",
                   "k_per_split")
        attrs = {(gemv.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        k = triton.compile(ASTSource(gemv, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4, "num_stages": 3})
        ptx = k.asm["ptx"]
        wide = len(re.findall(r"ld\\.global[^;]*\\.v4\\.b32", ptx))
        wide += len(re.findall(r"cp\\.async\\.cg\\.shared\\.global[^;]*, 0x10", ptx))
        facts.append({"wide_loads": wide, "e4m3_cvt": len(re.findall(r"cvt\\.rn\\.f16x2\\.e4m3x2", ptx)),
                      "local": len(re.findall(r"(ld|st)\\.local", ptx)), "mma": "mma" in ptx})
    print(json.dumps(facts))
""")


@pytest.mark.slow  # compiles four kernels (about 10 s)
def test_kernel_compiles_for_gpus_with_wide_loads():
    """Without a GPU: the kernel compiles for Hopper (sm_90), Ada (sm_89) and Ampere (sm_80, integer
    conversion), reads the weights with 16-byte loads, converts with the e4m3 instruction where there is
    one, and spills nothing to local memory."""
    cases = [(90, False, 1, False), (90, True, 16, False), (89, True, 16, False), (80, True, 16, True)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600, env=env)
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "backend" in proc.stderr.lower()):
        pytest.skip(f"this Triton cannot compile for NVIDIA GPUs here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    for (arch, use_dot, _, soft), f in zip(cases, facts):
        assert f["wide_loads"] > 0 and f["local"] == 0, (arch, use_dot, f)
        assert (f["e4m3_cvt"] > 0) == (not soft), (arch, f)
        assert f["mma"] == use_dot, (arch, f)


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 8192)])
def test_kernel_on_llama_shapes(n, k):
    for m in (1, 2, 5, 16):
        x, q, scale = _inputs(m, n, k, torch.bfloat16, seed=n + k + m)
        y = fp8_weight_only_triton(x, q, scale)
        exact, bound = _bound(x, q, scale)
        _assert_within(y, exact, bound, f"m={m} {n}x{k}")
        if torch.cuda.get_device_capability() >= (8, 9):  # the integer conversion gives the same numbers
            assert torch.equal(fp8_weight_only_triton(x, q, scale, soft_fp8=True), y)


@pytest.mark.cuda
def test_kernel_is_captured_in_a_cuda_graph():
    x, q, scale = _inputs(3, 1024, 8192, torch.bfloat16, seed=11)  # split-K on most GPUs: two kernels
    want = fp8_weight_only_triton(x, q, scale)
    static_x = x.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_weight_only_triton(static_x, q, scale)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    static_x.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_weight_only_triton(static_x, q, scale))
