"""What the benchmarks share: the device, timing and logging, random bases and deltas, the memory
roofline, and report writing.

Speed and size do not depend on weight values, so the benchmarks build their inputs at random, with
one builder per kind of input, all here: a Llama-shaped served base (:func:`build_base`), the 1-bit
delta ``bitdelta.compress`` would write for it (:func:`synthetic_delta`, over
:func:`random_packed_module`), the inputs of one multi-tenant linear op
(:func:`random_linear_inputs`), and a tiny Hugging Face pair with token batches for distillation.
Nothing here keeps state between calls: a benchmark passes its :class:`BenchDevice` and
:class:`RunLog` to whatever needs them.

    dev, log = BenchDevice("cuda"), RunLog()
    model = build_base(LLAMA2_7B, torch.bfloat16, dev.device)
    bw = copy_bandwidth(dev.device)        # GB/s, bytes read + written
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bitdelta import __version__
from bitdelta.delta import Delta, PackedModule
from bitdelta.fingerprint import Fingerprint, sample_weight
from bitdelta.pack import pack_signs, packed_width
from bitdelta.targets import EMBEDDING, LINEAR

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
LLAMA2_7B = dict(vocab=32000, hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, max_pos=4096)
SMOKE = dict(vocab=256, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, max_pos=512)
# Each decoder layer's matrices: name -> (out, in) as "h" (hidden), "kv" (K/V width) or "i" (MLP width).
LINEARS = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("kv", "h"), "self_attn.v_proj": ("kv", "h"),
           "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
           "mlp.down_proj": ("h", "i")}


# ---------------------------------------------------------------------------------- device, timing, log


class BenchDevice:
    """The device a benchmark runs on, and what it does differently on a GPU (sync, peak memory)."""

    def __init__(self, device):
        self.device = torch.device(device)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()

    def free_memory(self) -> None:
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int | None:
        if not self.on_gpu:
            return None
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.on_gpu else "cpu"


class RunLog:
    """Prints each line with the seconds since the run began and keeps it (for a log file)."""

    def __init__(self, width: int = 6, stream=None):
        self.t0 = time.perf_counter()
        self.width, self.stream = width, stream
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        line = f"[{self.elapsed():{self.width}.1f}s] {msg}"
        print(line, file=self.stream or sys.stdout, flush=True)
        self.lines.append(line)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def pct(values, q):
    """The ``q``-th percentile (nearest rank) of ``values``; None for no values."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def ms(seconds):
    return None if seconds is None else 1e3 * seconds


def copy_bandwidth(device) -> float:
    """GB/s of a 1 GiB device copy (bytes read + written), median of 20 after 5 warm-up copies
    (16 MiB on a CPU, where it only proves the code runs)."""
    device = torch.device(device)
    n = GiB if device.type == "cuda" else 16 * 2**20
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        if device.type == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    del src, dst
    return 2 * n / pct(times[5:], 50) / 1e9


def meminfo_available() -> int | None:
    """Bytes of host memory available now (Linux), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def drop_page_cache(path: Path) -> None:
    """Asks the kernel to forget the cached pages of every file under ``path`` (clean pages only)."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_and_save(argv, parse_args, run):
    """A benchmark's command line: parses ``argv``, runs it and, given ``--out``, writes its results
    there as JSON; returns the results (for the benchmark's own table)."""
    args = parse_args(argv)
    results = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


# ---------------------------------------------------------------------------------- random bases and deltas


def build_base(shape: dict, dtype, device, seed=0, matrix=None, name="random-llama-base"):
    """A Llama-shaped served model (``DeltaLlama``) with random weights made directly on ``device``
    (no Hugging Face model): std 0.02 matrices, unit norms. ``matrix``, when given, turns each decoder
    matrix into the weight served as it is drawn (a quantized base holds one dense matrix at a time);
    ``name`` is the model's ``_name_or_path``."""
    from bitdelta.serving.model import DeltaLlama

    h, kvd, i = shape["hidden"], shape["hidden"] // shape["heads"] * shape["kv_heads"], shape["inter"]
    dims = {"h": h, "kv": kvd, "i": i}
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s):
        return torch.randn(s, generator=g, device=device, dtype=dtype) * 0.02

    served = matrix or (lambda w: w)
    weights, params1d = {}, {}
    for layer in range(shape["layers"]):
        for sub, (o, k) in LINEARS.items():
            weights[f"model.layers.{layer}.{sub}"] = served(rnd(dims[o], dims[k]))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            params1d[f"model.layers.{layer}.{norm}.weight"] = torch.ones(h, device=device, dtype=dtype)
    params1d["model.norm.weight"] = torch.ones(h, device=device, dtype=dtype)
    weights["model.embed_tokens"] = rnd(shape["vocab"], h)
    weights["lm_head"] = rnd(shape["vocab"], h)
    head_dim = h // shape["heads"]
    cfg = SimpleNamespace(model_type="llama", num_hidden_layers=shape["layers"], hidden_size=h,
                          num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], head_dim=head_dim,
                          rms_norm_eps=1e-5, max_position_embeddings=shape["max_pos"],
                          _name_or_path=name)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return DeltaLlama(cfg, weights, params1d, inv_freq, 1.0, False, dtype, device)


def model_bytes(model) -> int:
    """Bytes of a served model's weights and 1-D parameters."""
    return sum(t.numel() * t.element_size() for t in [*model.weights.values(), *model.params1d.values()])


def random_packed_module(kind: str, mode: str, n: int, k: int, bits: int, generator, vocab: bool = False,
                         device="cpu") -> PackedModule:
    """One compressed ``n x k`` matrix with random sign bits and positive scales (0.5e-3 to 1.5e-3,
    the size of real fine-tunes' scales), on the CPU."""
    sign = torch.randint(0, 256, (bits, n, packed_width(k)), generator=generator, device=device, dtype=torch.uint8)
    scale_shape = {"scalar": (bits,), "row": (bits, n), "col": (bits, k)}[mode]
    scale = torch.rand(scale_shape, generator=generator, device=device) * 1e-3 + 5e-4
    return PackedModule(kind, mode, sign.cpu(), scale.cpu(), k, vocab)


def synthetic_delta(model, seed: int) -> Delta:
    """The 1-bit delta ``bitdelta.compress`` writes for the served ``model`` (random signs and scales:
    row scales on the vocabulary matrices, scalar elsewhere; dense norms; the base's fingerprint)."""
    dev = model.device
    g = torch.Generator(device=dev).manual_seed(1000 + seed)
    modules, samples = {}, {}
    for name, (n, k) in model.delta_modules().items():
        vocab = name in (model.embed_name, model.head_name)
        kind = EMBEDDING if name == model.embed_name else LINEAR
        modules[name] = random_packed_module(kind, "row" if vocab else "scalar", n, k, 1, g, vocab, dev)
        samples[name] = ((n, k), sample_weight(model.weights[name]))
    dense = {n: (p * (1 + 0.01 * seed)).cpu() for n, p in model.params1d.items()}
    num_params = sum(t.numel() for t in [*model.weights.values(), *model.params1d.values()])
    info = {"bitdelta_version": __version__, "base_model_name_or_path": "random-llama-base",
            "finetuned_model_name_or_path": f"random-finetune-{seed}", "finetuned_num_parameters": num_params,
            "model_type": "llama", "vocab_size": model.vocab_size, "compression": {"scale": "scalar", "bits": 1}}
    return Delta(modules, dense, Fingerprint.from_samples(samples), info)


def random_linear_inputs(t, n, k, d, bits, mode, dtype, ids=None, seed=0, bias=False, device="cpu"):
    """Inputs of one multi-tenant linear op (``bitdelta.ops``), never zeros.

    Returns x ``[T, K]``, weight ``[N, K]``, bias ``[N]`` or None, signs ``[D, bits, N, K/8]``,
    scales (``[D, bits]``, ``[D, bits, N]`` or ``[D, bits, K]`` by ``mode``; residual planes shrink
    like real ones) and tenant ids ``[T]`` int32 (random, -1 = base only, when ``ids`` is None).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, k, generator=g, device=device).to(dtype)
    w = (torch.randn(n, k, generator=g, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    signs = pack_signs(torch.rand(d, bits, n, k, generator=g, device=device) > 0.5)
    shape = {"scalar": (d, bits), "row": (d, bits, n), "col": (d, bits, k)}[mode]
    sc = (torch.rand(shape, generator=g, device=device) + 0.5) * (2.0 / k**0.5)
    if bits > 1:
        sc = sc * torch.tensor([0.5**p for p in range(bits)], device=device).view(1, bits, *([1] * (sc.dim() - 2)))
    if ids is None:
        ids = torch.randint(-1, d, (t,), generator=g, device=device)
    return x, w, b, signs, sc.float(), torch.as_tensor(ids, dtype=torch.int32, device=device)


@torch.no_grad()
def tiny_llama_pair(work: Path, seed: int = 0) -> tuple[Path, Path]:
    """A 2-layer Llama (vocab 97, hidden 40) and a 'fine-tune' of it (every parameter moved by 2% of
    its spread), saved under ``work``; returns (base dir, fine-tune dir)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=56, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    base_dir, ft_dir = Path(work) / "llama-base", Path(work) / "llama-ft"
    base.save_pretrained(base_dir)
    for p in base.parameters():
        spread = p.float().std() if p.numel() > 1 else p.float().abs()
        p.add_(torch.randn(p.shape, generator=g) * 0.02 * (spread + 1e-3))
    base.save_pretrained(ft_dir)
    return base_dir, ft_dir


def random_token_batches(n: int, length: int, vocab: int, seed: int, ragged: bool = True):
    """``n`` rows of random token ids (``TokenBatches``); ``ragged``: most rows right-padded."""
    from bitdelta.calibration import TokenBatches

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n if ragged else 0):
        cut = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        mask[i, cut:] = 0
        ids[i, cut:] = 0
    return TokenBatches(ids, mask)


# ---------------------------------------------------------------------------------- memory roofline


def roofline_terms(model, slots) -> dict:
    """Bytes a decode step must move: fixed base part, per distinct tenant, per token, per context token."""
    elem = torch.empty((), dtype=model.dtype).element_size()
    base = sum(w.numel() for n, w in model.weights.items() if n != model.embed_name) * elem
    base += sum(p.numel() for p in model.params1d.values()) * elem
    tenant = 0
    for name, pool in slots.pools.items():
        if name == model.embed_name:
            continue
        tenant += pool["signs"][0].numel() + pool["row"][0].numel() * 4  # sign planes + row scales of one slot
    per_token = model.hidden * elem + (model.hidden + 7) // 8 + 4  # embedding row, its delta row + scale
    kv_token = 2 * model.num_layers * model.kv_heads * model.head_dim * elem  # K and V, every layer
    return {"base": base, "tenant": tenant, "token": per_token, "kv_token": kv_token}


def step_bytes(terms: dict, tokens: int, tenants: int, ctx: int) -> int:
    """Base once + each distinct tenant's bits once + per-token rows + KV.

    KV: a decode token at position p reads p + 1 cache rows (its own, just written, included) and
    writes 1; ``ctx`` is the sum of p over the step's tokens.
    """
    return terms["base"] + tenants * terms["tenant"] + tokens * terms["token"] + (ctx + 2 * tokens) * terms["kv_token"]


def decode_op_bytes(n: int, k: int, tenants: int, elem: int = 2) -> float:
    """Bytes one decode linear op must read: the ``n x k`` base weight once and each tenant's sign bits."""
    return elem * n * k + tenants * n * k / 8


def roofline_us(nbytes: float, gbps: float) -> float:
    """Microseconds to move ``nbytes`` at ``gbps`` (the measured copy bandwidth)."""
    return nbytes / (gbps * 1e9) * 1e6


# ---------------------------------------------------------------------------------- reports


def write_json(path: Path, obj, indent: int = 1) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=indent, default=str))


def replace_between(text: str, begin: str, end: str, body: str) -> str | None:
    """``text`` with what lies between the markers ``begin`` and ``end`` replaced by ``body`` (the
    markers kept); None when ``text`` lacks either marker."""
    if begin not in text or end not in text:
        return None
    head, rest = text.split(begin, 1)
    return head + begin + body + end + rest.split(end, 1)[1]


# Kernel-against-reference tolerances of the GPU benchmarks (the tests' own, per dtype: rtol, atol).
KERNEL_TOLERANCES = {torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 2e-2), torch.float32: (1e-5, 1e-5)}


def graph_time_us(calls, inner: int = 1, reps: int = 15) -> float:
    """Median microseconds of GPU time per call, launch overhead excluded: the closures ``calls``
    (e.g. over distinct input sets, together larger than L2, so each call reads from memory) are
    captured ``inner`` times in turn into one CUDA graph, which is replayed ``reps`` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and allocates outside the capture
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            for f in calls:
                f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (inner * len(calls)))
    del graph
    return statistics.median(times)


def time_us(fn, dev: BenchDevice, reps: int) -> float:
    """Median microseconds of ``fn``: replayed from a CUDA graph on a GPU, wall clock on a CPU."""
    if dev.on_gpu:
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=reps, return_mode="median") * 1e3
    fn()
    times = []
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def check(out, expected, dtype, what: str) -> float:
    """Max abs error of a kernel's output against the reference; raises past :data:`KERNEL_TOLERANCES`."""
    rtol, atol = KERNEL_TOLERANCES[dtype]
    err = (out.float() - expected.float()).abs()
    bad = err > atol + rtol * expected.float().abs()
    if out.shape != expected.shape or not torch.isfinite(out).all() or bool(bad.any()):
        raise AssertionError(f"{what}: kernel differs from the reference (max abs error {float(err.max()):.3g})")
    return float(err.max())
