"""The engine on a quantized (INT8/FP8) base: the tokens of the merged dequantized model, the stored
weights served as they are, and deltas of another base quantization refused.

A tiny random Llama base with two fine-tunes, compressed with ``base_quant`` int8 and fp8 (and none).
On the CPU the quantized matrices run weight-only (``torch._weight_int8pack_mm``) or dequantized;
the tests marked ``cuda`` check the FP8 GEMM path (``torch._scaled_mm``), the FP8 GEMV for decode
batches (bitdelta.ops.fp8_gemv) and CUDA graphs on both. The GEMV's choice, its fallbacks and its
numbers are also checked on the CPU, the kernel running in Triton's interpreter: there only the
stand-in for "this device is a GPU" (``quant_linear._gemv_runs_on``) is patched.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bitdelta
from arch_pairs import byte_tokenizer, finetune_of
from bitdelta.cli import build_parser
from bitdelta.errors import BitDeltaError, WrongBaseError
from bitdelta.hf import load_model
from bitdelta.ops.fp8_gemv import fp8_weight_only_triton
from bitdelta.quant import write_quantized_base
from bitdelta.safetensors_io import SafetensorsCheckpoint
from bitdelta.serving import quant_linear
from bitdelta.serving.config import EngineConfig
from bitdelta.serving.mapping import BatchMapping
from bitdelta.serving.quant_base import describe
from bitdelta.serving.quant_linear import QuantizedWeight, QuantTenantLinear, fp8_gemm, ways_used
from bitdelta.serving.runtime import build_runtime
from serving.engine_checks import emulate_graph_layout, greedy, random_prompts, run_to_completion, tiny_llama

SCHEMES = ("int8", "fp8")
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny_base():
    # every dimension a multiple of 16, so that the same pair also runs the FP8 GEMM on a GPU
    tok = byte_tokenizer()
    model = tiny_llama(tok, max_positions=128)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a spread large enough that greedy paths depend on the weights
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.08)
    return model, tok


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Base and two fine-tune directories, and per base quantization two saved deltas (row, col)."""
    tmp = tmp_path_factory.mktemp("quant-serve")
    base, tok = _tiny_base()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        for seed in (1, 2):
            finetune_of(base, seed, scale=0.3).save_pretrained(tmp / f"ft{seed}")
    deltas = {}
    for scheme in (None, *SCHEMES):
        for tenant, seed, scale in (("row", 1, "row"), ("col", 2, "col")):
            d = bitdelta.compress(tmp / "base", tmp / f"ft{seed}", scale=scale, base_quant=scheme, progress=False)
            path = tmp / f"delta-{scheme or 'none'}-{tenant}"
            d.save_pretrained(path)
            deltas[scheme, tenant] = path
    return {"base": tmp / "base", "deltas": deltas, "tmp": tmp}


def _runtime(base, deltas, **settings):
    return build_runtime(base, {k: str(v) for k, v in deltas.items()}, device="cpu", kv_cache_mb=16,
                         start=False, **settings)


def _merged(pair, scheme, tenant):
    """The reference: the dequantized base loaded as merge loads it, with the delta merged in."""
    model = load_model(pair["base"], dtype="float32", device="cpu", base_quant=scheme)
    if tenant is not None:
        bitdelta.merge(model, bitdelta.Delta.from_pretrained(pair["deltas"][scheme, tenant]))
    return model


def _run(engine, plan, vocab, seed=0, kv_slots: dict | None = None):
    """Submits ``plan`` [(tenant, arrival step, prompt length, new tokens)] and steps until all finish;
    ``kv_slots`` receives each request's KV slot (request id -> slot)."""
    def note_kv_slots(reqs):
        if kv_slots is not None:
            kv_slots.update({r.id: r.kv_slot for r in reqs if r.kv_slot is not None and r.id not in kv_slots})

    plan = random_prompts(plan, vocab, torch.Generator().manual_seed(seed), low=3)
    return run_to_completion(engine, plan, max_steps=200, on_step=note_kv_slots)


# ---------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("scheme", SCHEMES)
def test_engine_on_quantized_base_matches_merged_dequantized_model(pair, scheme):
    deltas = {t: pair["deltas"][scheme, t] for t in ("row", "col")}
    rt = _runtime(pair["base"], deltas, base_quant=scheme)
    try:
        model = rt.model
        assert model.base_quantization["scheme"] == scheme
        layers = model.quantized_modules()
        assert len(layers) == 2 * 7  # every decoder matrix; the tied embedding/head stays dense
        for name, layer in layers.items():  # the served weights are the 8-bit ones, one scale per row
            assert layer.qweight.dtype == STORAGE[scheme] and layer.weight_scale.shape == (layer.qweight.shape[0], 1)
            assert isinstance(model.weights[name], QuantizedWeight)
        want_way = "dequantize" if scheme == "fp8" else ("int8-weight-only" if hasattr(torch, "_weight_int8pack_mm")
                                                          else "dequantize")
        assert {m.way for m in layers.values()} == {want_way}
        assert describe(model).startswith(f"{scheme} base")

        engine = rt.engine
        emulate_graph_layout(engine)
        plan = [(None, 0, 9, 8), ("row", 0, 6, 14), ("col", 0, 40, 6), ("row", 2, 4, 8), ("col", 3, 7, 9),
                (None, 4, 12, 5)]  # base-only, decode, prompt (segmented) and column-scaled rows in one engine
        reqs = _run(engine, plan, model.vocab_size)
        assert engine.graphs.replays >= 1
        merged = {t: _merged(pair, scheme, t) for t in (None, "row", "col")}
        outputs = set()
        for r in reqs:
            assert r.finish_reason == "length"
            assert r.output == greedy(merged[r.tenant], r.prompt, r.params.max_tokens), r.tenant
            outputs.add(tuple(r.output[:4]))
        assert len(outputs) > 2  # tenants really take different paths

        # one step with the three tenants: logits against each merged model's
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, model.vocab_size, (11,), generator=g).tolist() for _ in range(3)]
        tenants = [None, "row", "col"]
        entries = [(i, 0, p, -1 if t is None else rt.slots.load(t)) for i, (t, p) in enumerate(zip(tenants, prompts))]
        got = model.forward(BatchMapping.build(entries, model.device), engine.kv, rt.slots)
        with torch.no_grad():
            want = torch.stack([merged[t](torch.tensor([p])).logits[0, -1] for t, p in zip(tenants, prompts)])
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    finally:
        rt.shutdown()


def test_quantized_base_uses_the_same_bits_as_compress(pair):
    """Quantizing at load is compress's own quantization: the served weights dequantize to exactly
    the base the merged reference holds, matrix by matrix."""
    rt = _runtime(pair["base"], {}, base_quant="fp8")
    try:
        ref = _merged(pair, "fp8", None)
        for name, layer in rt.model.quantized_modules().items():
            assert torch.equal(layer.dequantized(torch.float32), ref.get_parameter(f"{name}.weight"))
    finally:
        rt.shutdown()


@pytest.mark.parametrize("served, made", [("int8", "fp8"), ("int8", None), ("fp8", "int8"), ("none", "fp8"),
                                          ("none", "int8")])
def test_delta_of_another_base_quantization_is_refused(pair, served, made):
    rt = _runtime(pair["base"], {}, base_quant=served)
    try:
        with pytest.raises(WrongBaseError) as err:
            rt.register("other", str(pair["deltas"][made, "row"]))
        msg = str(err.value)
        assert "'other'" in msg and (made or "unquantized") in msg
        assert (served if served != "none" else "unquantized") in msg
        assert f"--base-quant {made or 'none'}" in msg  # says how to serve it
        assert rt.slots.names() == [] and "other" not in rt.texts  # nothing kept
        same = None if served == "none" else served
        rt.register("same", str(pair["deltas"][same, "row"]))  # the matching one registers
        assert rt.slots.names() == ["same"]
    finally:
        rt.shutdown()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_base_directory_is_served_as_stored(pair, scheme, monkeypatch):
    qdir = pair["tmp"] / f"base-{scheme}"
    if not qdir.exists():
        write_quantized_base(pair["base"], scheme, qdir, progress=False)
    from bitdelta import quant

    def no_requantization(*args, **kwargs):
        raise AssertionError("a quantized directory must be served as stored, not quantized again")

    monkeypatch.setattr(quant, "quantize", no_requantization)
    monkeypatch.setattr("bitdelta.serving.quant_linear.quantize", no_requantization)
    rt = _runtime(qdir, {"row": pair["deltas"][scheme, "row"]})  # no --base-quant: as the directory says
    try:
        assert rt.model.base_quantization["scheme"] == scheme
        stored = SafetensorsCheckpoint.open(qdir)
        layers = rt.model.quantized_modules()
        assert layers
        for name, layer in layers.items():  # the very bytes of the file
            q = stored.get(f"{name}.weight")
            assert q.dtype == layer.qweight.dtype
            assert q.view(torch.uint8).numpy().tobytes() == layer.qweight.view(torch.uint8).numpy().tobytes()
            assert torch.equal(stored.get(f"{name}.weight_scale").reshape(-1, 1), layer.weight_scale)
        # the delta made against the plain base quantized on the fly serves here with the same tokens
        reqs = _run(rt.engine, [("row", 0, 7, 6), (None, 0, 5, 6)], rt.model.vocab_size)
        monkeypatch.undo()
        for r in reqs:
            assert r.output == greedy(_merged(pair, scheme, r.tenant), r.prompt, 6)
    finally:
        rt.shutdown()
    other = "int8" if scheme == "fp8" else "fp8"
    with pytest.raises(BitDeltaError, match=f"already quantized to {scheme}"):
        _runtime(qdir, {}, base_quant=other)


def test_quantized_directory_served_dense_keeps_its_scheme(pair):
    """``--base-quant none`` serves a quantized directory dequantized; its deltas still match and the
    other scheme's are still refused."""
    qdir = pair["tmp"] / "base-fp8"
    if not qdir.exists():
        write_quantized_base(pair["base"], "fp8", qdir, progress=False)
    rt = _runtime(qdir, {"row": pair["deltas"]["fp8", "row"]}, base_quant="none")
    try:
        assert not rt.model.quantized_modules() and rt.model.base_quantization["scheme"] == "fp8"
        with pytest.raises(WrongBaseError, match="int8"):
            rt.register("int8-delta", str(pair["deltas"]["int8", "row"]))
    finally:
        rt.shutdown()


def test_base_quant_flag():
    args = build_parser().parse_args(["serve", "--base", "b", "--base-quant", "FP8"])
    assert EngineConfig.from_args(args).base_quant == "fp8"
    assert EngineConfig.from_args(build_parser().parse_args(["serve", "--base", "b"])).base_quant is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--base", "b", "--base-quant", "int4"])


def test_fp8_row_quantization_pads_and_is_shared_by_projections_of_one_input():
    from bitdelta.serving import fp8_rows

    x = torch.randn(3, 40) * torch.tensor([[1.0], [1e-3], [0.0]])  # the last row all zero
    x8, scale = fp8_rows.quantize_rows_torch(x, 16)
    assert x8.shape == (16, 40) and x8.dtype == torch.float8_e4m3fn and scale.shape == (16, 1)
    assert torch.equal(x8[2:].float(), torch.zeros(14, 40))  # the zero row and the padding
    assert float(x8[:2].float().abs().max()) == 448.0  # each row's largest value uses the whole range
    back = x8[:2].float() * scale[:2]
    assert float(((back - x[:2]).norm(dim=1) / x[:2].norm(dim=1)).max()) < 0.05
    fp8_rows.forget()
    a = fp8_rows.quantize_rows(x, 16)
    assert fp8_rows.quantize_rows(x, 16)[0] is a[0]  # q, k and v of one input: one quantization
    x.mul_(2)  # the same tensor changed in place: quantized again
    b = fp8_rows.quantize_rows(x, 16)
    assert b[0] is not a[0] and torch.allclose(b[1][:2], 2 * a[1][:2])
    fp8_rows.forget()


# ---------------------------------------------------------------------------------- the FP8 GEMV's choice (CPU)


@pytest.fixture
def gemv_on_cpu(monkeypatch):
    """The GEMV tried on the CPU (its kernel in Triton's interpreter), with fresh trials."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(quant_linear.GEMV_SWITCH, raising=False)
    monkeypatch.setattr(quant_linear, "_gemv_runs_on", lambda device: True)
    monkeypatch.setattr(quant_linear, "_TRIALS", {})


def _cpu_fp8_weight(n, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return QuantizedWeight.quantize((torch.randn(n, k, generator=g) * 0.05).to(dtype), "fp8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_gemv_runs_decode_batches_and_the_next_way_larger_ones(gemv_on_cpu, dtype):
    qw = _cpu_fp8_weight(40, 72, seed=3, dtype=dtype)  # no multiple of any tile
    layer = QuantTenantLinear("m", qw, None, dtype)
    assert (layer.way, layer.large_way) == ("fp8-gemv", "dequantize")  # no FP8 GEMM on a CPU
    assert "fp8-gemv (more than 16 rows: dequantize)" in layer.extra_repr()
    assert ways_used(nn.ModuleList([layer])) == {"fp8-gemv": 1}
    g = torch.Generator().manual_seed(4)
    ref_w = qw.dequantized(torch.float32)
    for rows in (1, 3, 16, 17):
        x = torch.randn(rows, 72, generator=g).to(dtype)
        y = layer.base(x)
        assert y.shape == (rows, 40) and y.dtype == dtype
        if rows <= 16:  # the kernel itself, for real
            assert torch.equal(y, fp8_weight_only_triton(x, layer.qweight, layer.scale_f32))
        else:
            assert torch.equal(y, F.linear(x, layer.dequantized(dtype)))
        ref = x.float() @ ref_w.t()
        assert float((y.float() - ref).norm() / ref.norm()) < quant_linear.GEMV_TRIAL_REL_ERROR / 2


def test_fp8_gemv_is_not_chosen_where_it_does_not_apply(gemv_on_cpu, monkeypatch):
    fp8 = _cpu_fp8_weight(32, 48, seed=5)
    int8 = QuantizedWeight.quantize(fp8.dequantized(), "int8")
    assert QuantTenantLinear("int8", int8, None, torch.float32).way != "fp8-gemv"
    block = QuantizedWeight(fp8.q, torch.rand(2, 3) + 0.5, "fp8", torch.float32, block=(16, 16))  # block scales
    assert QuantTenantLinear("block", block, None, torch.float32).way == "dequantize"
    monkeypatch.setenv(quant_linear.GEMV_SWITCH, "off")
    assert QuantTenantLinear("off", fp8, None, torch.float32).way == "dequantize"
    monkeypatch.setenv(quant_linear.GEMV_SWITCH, "sometimes")
    with pytest.raises(ValueError, match="BITDELTA_FP8_GEMV must be auto or off"):
        QuantTenantLinear("bad", fp8, None, torch.float32)
    monkeypatch.setattr(quant_linear, "_gemv_runs_on", lambda device: device.type == "cuda")  # the real rule
    monkeypatch.delenv(quant_linear.GEMV_SWITCH)
    assert QuantTenantLinear("cpu", fp8, None, torch.float32).way == "dequantize"


class _CompilationError(Exception):
    """What a Triton kernel that does not compile raises (not a RuntimeError)."""


@pytest.mark.parametrize("failure", ["does not compile", "refuses", "computes something else"])
def test_fp8_gemv_that_fails_its_trial_is_never_used(gemv_on_cpu, monkeypatch, caplog, failure):
    real = quant_linear.fp8_weight_only_triton

    def broken(x, q, scale):
        if failure == "does not compile":
            raise _CompilationError("at 12:8: unsupported conversion")
        if failure == "refuses":
            raise RuntimeError("no kernel image for this device")
        return real(x, q, scale) * 1.05  # 5% off: within the GEMM's trial bound, not the GEMV's

    monkeypatch.setattr(quant_linear, "fp8_weight_only_triton", broken)
    with caplog.at_level(logging.WARNING, logger=quant_linear.__name__):
        layer = QuantTenantLinear("m", _cpu_fp8_weight(24, 40, seed=6), None, torch.float32)
    assert (layer.way, layer.large_way) == ("dequantize", "dequantize")
    assert any("fp8-gemv" in r.getMessage() for r in caplog.records)  # says why
    x = torch.randn(2, 40)
    assert torch.equal(layer.base(x), F.linear(x, layer.dequantized()))


@pytest.mark.slow  # the whole engine with the GEMV in the Triton interpreter
def test_engine_on_fp8_gemv_matches_merged_dequantized_model(pair, gemv_on_cpu, monkeypatch):
    """On the CPU the GEMV runs the base-only steps of at most 16 rows (tenants' steps make the dispatch
    call on the dequantized weight, larger ones dequantize): greedy tokens of the merged dequantized
    model, base-only and with a tenant."""
    rt = _runtime(pair["base"], {"row": pair["deltas"]["fp8", "row"]}, base_quant="fp8")
    try:
        layers = rt.model.quantized_modules()
        assert {(m.way, m.large_way) for m in layers.values()} == {("fp8-gemv", "dequantize")}
        assert describe(rt.model).startswith("fp8 base") and "fp8-gemv" in describe(rt.model)
        calls = []

        def counted(x, q, scale):
            calls.append(x.shape[0])
            return fp8_weight_only_triton(x, q, scale)

        monkeypatch.setattr(quant_linear, "fp8_weight_only_triton", counted)
        # base-only prompts (15 rows) and decode steps, a tenant's steps, base-only steps again
        plan = [(None, 0, 6, 10), (None, 0, 9, 8), ("row", 3, 5, 3)]
        reqs = _run(rt.engine, plan, rt.model.vocab_size)
        assert calls and max(calls) == 15 and 2 in calls
        merged = {t: _merged(pair, "fp8", t) for t in (None, "row")}
        for r in reqs:
            assert r.finish_reason == "length"
            assert r.output == greedy(merged[r.tenant], r.prompt, r.params.max_tokens), r.tenant
    finally:
        rt.shutdown()


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@cuda
def test_fp8_row_kernel_matches_the_torch_form():
    from bitdelta.serving import fp8_rows

    if fp8_rows._kernel() is None:
        pytest.skip("needs Triton")
    g = torch.Generator(device="cuda").manual_seed(1)
    for m, k, m_pad in ((1, 4096, 16), (17, 11008, 32), (64, 8192, 64), (300, 128, 304)):
        x = (torch.randn(m, k, generator=g, device="cuda")
             * torch.rand(m, 1, generator=g, device="cuda")).to(torch.bfloat16)
        x[0] = 0
        q_k, s_k = fp8_rows.quantize_rows_kernel(x, m_pad)
        q_t, s_t = fp8_rows.quantize_rows_torch(x, m_pad)
        torch.testing.assert_close(s_k, s_t, rtol=1e-6, atol=0)  # the kernel's division may round differently
        a, b = q_k.float(), q_t.float()
        step = torch.maximum(0.125 * torch.minimum(a.abs(), b.abs()), torch.full_like(a, 2**-9))
        assert bool(((a - b).abs() <= step).all())  # at most one e4m3 step apart
        assert float((q_k.view(torch.uint8) != q_t.view(torch.uint8)).float().mean()) < 1e-3


def _fp8_weight(n, k, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) * 0.02
    return QuantizedWeight.quantize(w, "fp8")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_fp8_gemm_against_dequantized_reference(n, k, monkeypatch):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    monkeypatch.setenv(quant_linear.GEMV_SWITCH, "off")  # every batch size through the GEMM
    qw = _fp8_weight(n, k, seed=n + k)
    layer = QuantTenantLinear("m", qw, None, torch.bfloat16)
    assert layer.way == "fp8-gemm"
    ref_w = qw.dequantized(torch.float32)
    g = torch.Generator(device="cuda").manual_seed(0)
    for m in (1, 3, 17, 64):
        x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
        y = layer.base(x)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        ref = x.float() @ ref_w.t()
        rel = float((y.float() - ref).norm() / ref.norm())
        assert rel < 0.04, (m, rel)  # e4m3 activations per token: about 2.5% relative
        assert torch.equal(fp8_gemm(x, qw.q, layer.scale_f32), y)  # the module runs exactly this


class _StepLogits:
    """Each step's logits by (KV slot, position of the token they predict), through ``wrap_forward``."""

    def __init__(self):
        self.rows: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, forward, batch):
        logits = forward()
        for (slot, start, n), row in zip(batch.seqs, logits):
            self.rows[slot, start + n] = row.float().cpu()
        return logits


def _fp8_engine_run(pair, plan, graphs: bool, way: str = "fp8-gemm"):
    deltas = {t: str(pair["deltas"]["fp8", t]) for t in ("row", "col")}
    rt = build_runtime(pair["base"], deltas, device="cuda", dtype="bfloat16", kv_cache_mb=64, base_quant="fp8",
                       cuda_graphs=graphs, start=False)
    try:
        if way == "fp8-gemm":
            assert {m.way for m in rt.model.quantized_modules().values()} == {"fp8-gemm"}
        else:
            assert {(m.way, m.large_way) for m in rt.model.quantized_modules().values()} == {(way, "fp8-gemm")}
        rec = rt.engine.wrap_forward = _StepLogits()
        kv_slots: dict = {}
        reqs = _run(rt.engine, plan, rt.model.vocab_size, kv_slots=kv_slots)
        if graphs:
            assert rt.engine.graphs is not None and rt.engine.graphs.replays > 0
        assert len(set(kv_slots.values())) == len(reqs)  # no slot reused: (slot, position) names one token
        return [(kv_slots[r.id], len(r.prompt), r.output) for r in reqs], rec.rows
    finally:
        rt.shutdown()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("way", ["fp8-gemm", "fp8-gemv"])
def test_fp8_base_with_cuda_graphs_gives_eager_tokens(pair, way, monkeypatch):
    """Graph replays (batch padded to its bucket, attention over a span bucket) and eager steps give the
    same greedy tokens; where the two would pick differently, the eager logits were a near tie. Decode
    steps run the base by the GEMM, or by the GEMV (the default)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    monkeypatch.setenv(quant_linear.GEMV_SWITCH, "off" if way == "fp8-gemm" else "auto")
    plan = [(None, 0, 9, 12), ("row", 0, 6, 16), ("col", 0, 40, 10), ("row", 1, 4, 12)]
    graph_out, graph_logits = _fp8_engine_run(pair, plan, graphs=True, way=way)
    eager_out, eager_logits = _fp8_engine_run(pair, plan, graphs=False, way=way)
    # The two differ by rounding: a step's batch is padded to its bucket, attention spans a bucket, and
    # a hidden state one bf16 step away can round an activation to the neighbouring e4m3 value. So the
    # logits agree within the FP8 activations' own error, and a token may differ only where that
    # error covers the gap between the two best tokens (after which the sequences are no longer alike).
    compared = 0
    for (slot, plen, g_tokens), (slot_e, _, e_tokens) in zip(graph_out, eager_out):
        assert slot == slot_e
        for i, (g, e) in enumerate(zip(g_tokens, e_tokens)):
            eg, ee = graph_logits[slot, plen + i], eager_logits[slot, plen + i]
            assert float((eg - ee).norm() / ee.norm()) < 0.04, (slot, i)
            if g != e:
                assert float(ee[e] - ee[g]) <= 2 * float((eg - ee).abs().max()), (slot, i)
                break
            compared += 1
    assert compared >= 30


@pytest.mark.cuda
@cuda
def test_fp8_decode_step_adds_the_delta_kernels_product(pair):
    """A decode step on the FP8 base: the base by the FP8 GEMM plus the decode kernel's delta-only
    product, against the dispatch's fused op on the dequantized weight."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    from bitdelta.serving.models.common import Step
    from bitdelta.serving.quant_linear import decode_delta

    deltas = {t: str(pair["deltas"]["fp8", t]) for t in ("row",)}
    rt = build_runtime(pair["base"], deltas, device="cuda", dtype="bfloat16", kv_cache_mb=64, base_quant="fp8",
                       cuda_graphs=False, start=False)
    try:
        slot = rt.slots.load("row")
        batch = BatchMapping.build([(i, 5, [7 + i], slot if i % 2 else -1) for i in range(6)], rt.model.device)
        name, layer = next(iter(rt.model.quantized_modules().items()))
        x = torch.randn(6, layer.qweight.shape[1], device="cuda", dtype=torch.bfloat16)
        assert decode_delta(rt.slots, name, x, batch) is not None  # the fast path is taken
        got = layer(x, Step(batch, rt.engine.kv, rt.slots))
        want = rt.slots.linear(name, x, layer.dequantized(torch.bfloat16), batch)
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        assert rel < 0.04, rel
        base_only = layer.base(x)
        moved = (got.float() - base_only.float())[1::2].norm() / base_only.float()[1::2].norm()
        assert float(moved) > 0.05 and torch.equal(got[0::2], base_only[0::2])  # tenants' rows only
    finally:
        rt.shutdown()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 8192)])
def test_fp8_gemv_against_dequantized_reference(n, k, monkeypatch):
    """On a GPU the GEMV runs decode batches (any compute capability: below 8.9 it converts e4m3 with
    integer operations) and the next way larger ones."""
    monkeypatch.delenv(quant_linear.GEMV_SWITCH, raising=False)
    qw = _fp8_weight(n, k, seed=n + k + 1)
    layer = QuantTenantLinear("m", qw, None, torch.bfloat16)
    has_gemm = torch.cuda.get_device_capability() >= (8, 9)
    assert (layer.way, layer.large_way) == ("fp8-gemv", "fp8-gemm" if has_gemm else "dequantize")
    ref_w = qw.dequantized(torch.float32)
    g = torch.Generator(device="cuda").manual_seed(0)
    for m in (1, 2, 3, 16, 17):
        x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
        y = layer.base(x)
        ref = x.float() @ ref_w.t()
        rel = float((y.float() - ref).norm() / ref.norm())
        if m <= 16:  # the activations as they are: only bf16 roundings (output, the reference's weight)
            assert torch.equal(y, fp8_weight_only_triton(x, qw.q, layer.scale_f32)) and rel < 0.005, (m, rel)
        elif has_gemm:
            assert torch.equal(y, fp8_gemm(x, qw.q, layer.scale_f32)) and rel < 0.04, (m, rel)


@pytest.mark.cuda
@cuda
def test_quantizing_on_the_gpu_gives_compress_bits():
    """The benchmark builds large bases quantized on the GPU: the bits equal the CPU's (compress's)."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(512, 768, generator=g) * 0.02).to(torch.bfloat16)
    for scheme in SCHEMES:
        cpu, gpu = QuantizedWeight.quantize(w, scheme), QuantizedWeight.quantize(w.cuda(), scheme)
        assert torch.equal(cpu.q.view(torch.uint8), gpu.q.cpu().view(torch.uint8))
        assert torch.equal(cpu.scale, gpu.scale.cpu())
