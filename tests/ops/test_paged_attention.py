"""Paged decode attention: the reference against a plain dense computation, the Triton kernel against
the reference (on CPU under TRITON_INTERPRET=1, compiled on a CUDA machine), the split chooser, input
errors, the dispatcher, and (cuda-marked) replay of a captured CUDA graph with new lengths and tables.

Tolerances (kernel vs reference; outputs are convex combinations of N(0, 1) values, so O(1)):
float32: both compute in float32 and differ only in summation order over at most a few hundred
keys (about 1e-6), so 1e-5. float16: the kernel rounds the softmax weights to float16 for the
value dot, as flash attention does (2^-11 relative each), and both round the output once (one
ulp, 2^-11 relative), about 1e-3 in all, so the house 5e-3. bfloat16: the same with 2^-8,
so the house (3e-2, 2e-2).
"""

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from _inputs import TOLERANCES  # noqa: E402

from bitdelta.ops import paged_attention as pa  # noqa: E402
from bitdelta.ops import paged_attention_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and type(paged_attention_kernels.paged_decode_kernel).__name__ != "InterpretedFunction":
    importlib.reload(paged_attention_kernels)  # jitted before the env var was set: re-decorate


def make_paged(batch, heads, kv_heads, dim, block_size, seq_lens, dtype, seed=0, spare_pages=3, poison=False):
    """q, k_cache, v_cache, block_tables, seq_lens with every row's pages shuffled through the pool.

    Table entries past a row's pages hold garbage (-1 or huge). With ``poison``, every cache slot no
    row's key occupies (spare pages, the tail of each row's last page) is NaN, so reading one shows.
    """
    g = torch.Generator().manual_seed(seed)
    pages = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(pages) + 1  # one more column: every row has garbage past its end
    num_blocks = sum(pages) + spare_pages
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    k = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    v = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    order = torch.randperm(num_blocks, generator=g)
    table = torch.where(torch.rand(batch, max_blocks, generator=g) < 0.5, -1, 2**30).int()
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[used:used + n].int()
        used += n
    if poison:
        occupied = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        for b, n in enumerate(seq_lens):
            for j in range(n):
                occupied[table[b, j // block_size], j % block_size] = True
        k[~occupied], v[~occupied] = float("nan"), float("nan")
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q, k.to(dtype), v.to(dtype), table, lens


def dense_attention(q, k_cache, v_cache, table, lens, scale=None, window=None, softcap=None):
    """Row by row: gather the row's keys page by page, slice the window, softmax, weight the values."""
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    scale = dim ** -0.5 if scale is None else scale
    out = torch.empty(batch, heads, dim)
    for b in range(batch):
        n = int(lens[b])
        pages = [int(table[b, p]) for p in range(math.ceil(n / block_size))]
        keys = torch.cat([k_cache[p] for p in pages])[:n].float()  # [n, KV, D]
        values = torch.cat([v_cache[p] for p in pages])[:n].float()
        first = 0 if window is None else max(0, n - window)
        for h in range(heads):
            g = h // (heads // kv_heads)
            s = keys[first:, g] @ q[b, h].float() * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            out[b, h] = torch.softmax(s, dim=0) @ values[first:, g]
    return out


def _close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    assert actual.dtype == dtype and torch.isfinite(actual).all()
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 3.0), (40, 1.5)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (6, 6)])
def test_reference_matches_dense(heads, kv_heads, window, softcap):
    lens = [1, 16, 17, 70]
    q, k, v, table, seq = make_paged(4, heads, kv_heads, 24, 16, lens, torch.float32, seed=heads, poison=True)
    q = q * 3  # large scores, so the softcap bends them
    out = pa.paged_decode_attention_reference(q, k, v, table, seq, window=window, softcap=softcap)
    torch.testing.assert_close(out, dense_attention(q, k, v, table, seq, window=window, softcap=softcap),
                               rtol=1e-5, atol=1e-5)


def test_reference_scale_and_dtype():
    q, k, v, table, seq = make_paged(2, 4, 2, 32, 16, [5, 33], torch.float16, seed=5)
    out = pa.paged_decode_attention_reference(q, k, v, table, seq, scale=0.3)
    assert out.dtype == torch.float16 and out.shape == (2, 4, 32)
    _close(out, dense_attention(q, k, v, table, seq, scale=0.3), torch.float16)


# (B, H, KV, D, block size, seq_lens, window, softcap, dtype, splits): every value of each axis appears,
# lengths cross page boundaries and include 1, splits None (the heuristic: 1 at these sizes), 2 and 3.
CASES = [
    (1, 4, 1, 64, 16, [1], None, None, torch.float32, None),
    (1, 8, 2, 80, 32, [95], 30, None, torch.float16, 3),
    (3, 6, 6, 128, 16, [1, 17, 48], None, 2.0, torch.float32, 2),
    (3, 4, 1, 80, 16, [33, 16, 64], 20, 1.5, torch.float16, None),
    (5, 8, 2, 64, 32, [1, 32, 33, 70, 9], None, None, torch.float16, None),
    (5, 6, 6, 80, 32, [64, 65, 2, 31, 100], 50, None, torch.float32, 2),
    (3, 8, 2, 128, 32, [40, 1, 97], None, 2.5, torch.bfloat16, 2),
    (1, 6, 6, 64, 16, [130], 1, None, torch.bfloat16, None),
    (5, 4, 1, 128, 32, [7, 100, 1, 64, 33], 33, 3.0, torch.float32, 3),
    (3, 8, 2, 64, 16, [15, 16, 17], 16, None, torch.float32, 2),
    (1, 20, 1, 64, 16, [50], None, None, torch.float16, 2),  # a group of 20 heads: 32 rows of the dot
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-KV{c[2]}-D{c[3]}-bs{c[4]}-"
                         f"w{c[6]}-cap{c[7]}-{str(c[8])[6:]}-s{c[9]}")
def test_kernel_matches_reference(case):
    batch, heads, kv_heads, dim, block_size, lens, window, softcap, dtype, splits = case
    q, k, v, table, seq = make_paged(batch, heads, kv_heads, dim, block_size, lens, dtype, seed=sum(lens),
                                     poison=True)
    q = q * 2
    expected = pa.paged_decode_attention_reference(q, k, v, table, seq, window=window, softcap=softcap)
    q, k, v, table, seq = (t.to(DEVICE) for t in (q, k, v, table, seq))
    out = pa.paged_decode_attention_triton(q, k, v, table, seq, window=window, softcap=softcap, num_splits=splits)
    _close(out, expected, dtype)


def test_split_and_unsplit_agree_with_more_splits_than_tiles():
    """Splits past a row's last tile see no key (max -inf, sum 0) and must drop out of the merge."""
    q, k, v, table, seq = (t.to(DEVICE) for t in make_paged(3, 8, 2, 96, 16, [1, 20, 90], torch.float32, seed=3))
    one = pa.paged_decode_attention_triton(q, k, v, table, seq, num_splits=1)
    for splits in (2, 5):  # the longest row has 3 tiles of keys
        torch.testing.assert_close(pa.paged_decode_attention_triton(q, k, v, table, seq, num_splits=splits), one,
                                   rtol=1e-5, atol=1e-5)


def test_query_as_a_slice_of_a_wider_projection():
    """q is often a view into the fused QKV output: its row stride is not H * D."""
    q, k, v, table, seq = make_paged(3, 8, 2, 64, 16, [9, 40, 16], torch.float16, seed=4)
    wide = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(4)).half()
    wide[:, 2:10] = q
    expected = pa.paged_decode_attention_reference(q, k, v, table, seq, softcap=5.0)
    wide, k, v, table, seq = (t.to(DEVICE) for t in (wide, k, v, table, seq))
    view = wide[:, 2:10]
    assert not view.is_contiguous()
    _close(pa.paged_decode_attention_triton(view, k, v, table, seq, softcap=5.0, num_splits=2), expected,
           torch.float16)


def test_head_dim_256_and_custom_scale():
    q, k, v, table, seq = make_paged(2, 4, 2, 256, 16, [18, 40], torch.float16, seed=7)
    expected = pa.paged_decode_attention_reference(q, k, v, table, seq, scale=0.05)
    q, k, v, table, seq = (t.to(DEVICE) for t in (q, k, v, table, seq))
    _close(pa.paged_decode_attention_triton(q, k, v, table, seq, scale=0.05, num_splits=2), expected, torch.float16)


def test_choose_num_splits():
    assert pa.choose_num_splits(64, 32, 4096, sm_count=132) == 1  # B x KV fills the GPU
    assert pa.choose_num_splits(1, 8, 100, sm_count=132) == 1  # too short to split
    few = pa.choose_num_splits(1, 8, 32768, sm_count=132)
    assert 1 < few <= pa.MAX_SPLITS and few * 8 <= 2 * pa.PROGRAMS_PER_SM * 132
    assert pa.choose_num_splits(1, 8, 1024, sm_count=132) == 1024 // pa.MIN_TOKENS_PER_SPLIT
    assert pa.choose_num_splits(2, 8, 32768, sm_count=132) <= few


def test_max_seq_len_bounds_the_splits_and_keeps_the_result():
    q, k, v, table, seq = make_paged(1, 4, 1, 64, 16, [50], torch.float32, seed=11)
    table = torch.cat([table, torch.full((1, 200), -1, dtype=torch.int32)], dim=1)  # a wide table: many splits
    expected = pa.paged_decode_attention_reference(q, k, v, table, seq)
    q, k, v, table, seq = (t.to(DEVICE) for t in (q, k, v, table, seq))
    for bound in (None, 64, 10**6):
        _close(pa.paged_decode_attention_triton(q, k, v, table, seq, max_seq_len=bound), expected, torch.float32)


def test_dispatcher(monkeypatch):
    q, k, v, table, seq = make_paged(2, 4, 2, 16, 16, [3, 20], torch.float32, seed=2)
    expected = pa.paged_decode_attention_reference(q, k, v, table, seq, window=5)
    torch.testing.assert_close(pa.paged_decode_attention(q, k, v, table, seq, window=5), expected)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not pa.triton_runs(torch.device("cpu"))  # no CUDA, no interpreter: the reference runs
    torch.testing.assert_close(pa.paged_decode_attention(q, k, v, table, seq, window=5), expected)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(q=a["q"][0]), "q must be"),
    (lambda a: a.update(q=a["q"].double()), "float16, bfloat16 or float32"),
    (lambda a: a.update(k=a["k"].half()), "q's dtype"),
    (lambda a: a.update(v=a["v"][:, :8]), "both be"),
    (lambda a: a.update(q=a["q"][:, :3]), "multiple of the kv heads"),
    (lambda a: a.update(q=a["q"][..., :8]), "head dim"),
    (lambda a: a.update(table=a["table"][:1]), "block_tables must be"),
    (lambda a: a.update(seq=a["seq"][:1]), "seq_lens must be"),
    (lambda a: a.update(seq=a["seq"].float()), "integer"),
    (lambda a: a.update(window=0), "window"),
    (lambda a: a.update(softcap=-1.0), "softcap"),
    (lambda a: a.update(seq=torch.tensor([0, 5], dtype=torch.int32)), "seq_lens must lie"),
    (lambda a: a.update(seq=torch.tensor([3, 10**4], dtype=torch.int32)), "seq_lens must lie"),
])
def test_bad_input_is_refused(change, message):
    q, k, v, table, seq = make_paged(2, 4, 2, 16, 16, [3, 20], torch.float32, seed=2)
    args = dict(q=q, k=k, v=v, table=table, seq=seq, window=None, softcap=None)
    change(args)
    with pytest.raises(ValueError, match=message):
        pa.paged_decode_attention_reference(args["q"], args["k"], args["v"], args["table"], args["seq"],
                                            window=args["window"], softcap=args["softcap"])


def test_table_entry_outside_the_pool_is_refused():
    q, k, v, table, seq = make_paged(2, 4, 2, 16, 16, [3, 20], torch.float32, seed=2)
    table[1, 1] = k.shape[0]
    with pytest.raises(ValueError, match="outside"):
        pa.paged_decode_attention_reference(q, k, v, table, seq)


# Run in a fresh process without TRITON_INTERPRET: one process cannot mix interpreted and jitted kernels.
SM90_COMPILE = """
import subprocess, sys, tempfile
from pathlib import Path
import torch, triton
from triton.backends.compiler import GPUTarget
from bitdelta.ops import paged_attention as pa
from bitdelta.ops import paged_attention_kernels as kernels

def build(fn, consts, types, **options):
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else types(n) for n in names}
    # what a real launch knows of aligned pointers and strides
    hints = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and (n.endswith("_ptr") or n.startswith("stride"))}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, attrs=hints,
                                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
for dtype, dim, block_size, group, split in [(torch.bfloat16, 128, 16, 1, False), (torch.float16, 80, 32, 4, True),
                                             (torch.float32, 256, 16, 8, False), (torch.bfloat16, 96, 16, 6, True),
                                             (torch.bfloat16, 128, 16, 20, False)]:
    elem = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    q_rows = 1 if group == 1 else max(16, pa.next_pow2(group))
    cfg = pa._launch_config(dim, block_size, dtype, q_rows)
    consts = dict(GROUP=group, Q_ROWS=q_rows, D=dim, D_PAD=pa.next_pow2(dim),
                  BLOCK_SIZE=block_size, BLOCK_N=cfg["BLOCK_N"], SPLIT=split, HAS_WINDOW=True, HAS_SOFTCAP=True,
                  IEEE_DOT=dtype == torch.float32)
    types = lambda n: (elem if n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr") else "*i32" if n in (
        "table_ptr", "lens_ptr") else "*fp32" if n.endswith("_ptr") else "fp32" if n in ("scale", "softcap") else "i32")
    cubins = [build(kernels.paged_decode_kernel, consts, types, num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"]).asm["cubin"]]
    if split:
        cubins.append(build(kernels.merge_splits_kernel, dict(D=dim, D_PAD=pa.next_pow2(dim), SPLITS_PAD=8),
                            lambda n: elem if n == "out_ptr" else "*fp32" if n.endswith("_ptr") else "i32",
                            num_warps=4).asm["cubin"])
    for cubin in cubins:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout if cuobjdump.exists() else "STACK:0 (no cuobjdump)"
        print("COMPILED", dtype, dim, block_size, group, split, [l.strip() for l in usage.splitlines() if "REG" in l])
"""


@pytest.mark.slow  # up to a minute: Triton's whole compile pipeline down to ptxas, for a few configs
def test_kernels_compile_for_sm90_without_a_gpu():
    """The compiled path (not the interpreter's) builds for an H100/H200 at head dims 80-256, GQA groups
    of 1-20 heads, split and not; and its registers spill nowhere (spills would show as stack)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SM90_COMPILE], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COMPILED")]
    assert len(lines) == 7 and all("STACK:0" in line for line in lines), proc.stdout  # 5 configs, 2 merges


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("splits", [1, 4])
def test_cuda_graph_replays_with_new_lengths_and_tables(splits):
    batch, heads, kv_heads, dim, block_size, max_blocks = 3, 8, 2, 128, 16, 12
    q, k, v, table, seq = (t.cuda() for t in make_paged(batch, heads, kv_heads, dim, block_size, [5, 40, 100],
                                                         torch.float16, seed=1, spare_pages=100))
    static_table = torch.full((batch, max_blocks), -1, dtype=torch.int32, device="cuda")
    static_table[:, :table.shape[1]] = table
    static_seq = seq.clone()
    bound = max_blocks * block_size
    run = lambda: pa.paged_decode_attention_triton(q, k, v, static_table, static_seq, softcap=20.0,  # noqa: E731
                                                   max_seq_len=bound, num_splits=splits)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    g = torch.Generator().manual_seed(9)
    for lens in ([1, 190, 17], [64, 65, 2]):
        pages = torch.randperm(k.shape[0], generator=g)[:batch * max_blocks].view(batch, max_blocks).int()
        for b, n in enumerate(lens):
            pages[b, math.ceil(n / block_size):] = -1
        static_table.copy_(pages)
        static_seq.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=g).half())
        graph.replay()
        torch.cuda.synchronize()
        expected = pa.paged_decode_attention_reference(q, k, v, static_table, static_seq, softcap=20.0)
        _close(out, expected, torch.float16)
