"""The fused base kernels (RMSNorm with and without the residual add, gated activation, RoPE with the
paged KV write) against their PyTorch references: on CPU under TRITON_INTERPRET=1 (set before the
kernels are decorated), compiled on a CUDA machine. Odd sizes, the base's, per-token and tenant-table
norm weights, both norm numerics, both activations, partial rotary, cache rows scattered over the
pool. Then a tiny served model (Llama, Phi-3, Gemma, Qwen3, Gemma-3) with a delta: the same logits and KV
cache with BITDELTA_FUSED_BASE=1 as with 0, over prefill and decode steps with and without deltas
(interpreted on a CPU; compiled on a GPU, cuda-marked).

Tolerances: float32 inputs; kernel and reference compute in float32 and differ only in the order of
the norm's sum of squares, the rsqrt, and exp-based vs library activations (a few ulp), so 1e-5.
Half-precision checks round the same intermediates as the eager ops: at most one ulp apart where a
float32 difference crosses a rounding boundary, within the house half-precision tolerances, and
copies and single rounded adds are bit-exact. Except in the interpreter's bfloat16, whose float32 to
bfloat16 cast truncates (triton 3.9; a GPU rounds to nearest): there, one ulp of bfloat16 anywhere.
"""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from _inputs import TOLERANCES  # noqa: E402

from bitdelta.ops import fused_base_kernels  # noqa: E402
from bitdelta.ops import fused_base_reference as ref  # noqa: E402
from bitdelta.ops import fused_norm as fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and type(fused_base_kernels.rms_norm_kernel).__name__ != "InterpretedFunction":
    importlib.reload(fused_base_kernels)  # jitted before the env var was set: re-decorate

# exp(-g) of a very negative gate is inf in float32, and g / inf the exact limit; numpy (the
# interpreter) warns about it, a GPU does not
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _exact(dtype) -> bool:
    """Whether rounding to ``dtype`` is the GPU's (round to nearest even), so rounded copies match bit for bit."""
    return DEVICE == "cuda" or dtype != torch.bfloat16


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _close(got, want, dtype=torch.float32):
    rtol, atol = TOLERANCES[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got.float()).all()
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------- RMSNorm


def _norm_weight(kind, t, d, dtype, seed):
    """(weight as the kernel takes it, its rows or None, the per-token weight the reference takes):
    the base's ``[D]``, per-token ``[T, D]``, or a table of tenants' rows read at ``rows``."""
    if kind == "base":
        w = _rand(d, seed=seed, dtype=dtype)
        return w, None, w
    if kind == "per-token":
        w = _rand(t, d, seed=seed, dtype=dtype)
        return w, None, w
    table = _rand(4, d, seed=seed, dtype=dtype)
    rows = torch.randint(0, 4, (t,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return table, rows, table[rows]


WEIGHT_KINDS = ["base", "per-token", "table"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("t,d", [(1, 40), (3, 72), (7, 40)])
def test_add_rms_norm_matches_reference(t, d, kind, offset, dtype):
    x, res = _rand(t, d, seed=t, dtype=dtype), _rand(t, d, seed=t + 1, dtype=dtype) * 3
    w, rows, per_token = _norm_weight(kind, t, d, dtype, seed=d)
    want_res = res.clone()
    want = ref.add_rms_norm_reference(x, want_res, per_token, 1e-6, offset)
    got_res = res.clone()
    got = fused.add_rms_norm(x, got_res, w, 1e-6, offset, weight_rows=rows)
    _close(got, want, dtype)
    if _exact(dtype):
        assert torch.equal(got_res, want_res)  # the residual sum is one rounded add: bit-exact
    _close(got_res, want_res, dtype)
    assert not torch.equal(got_res, res)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("t,d", [(1, 72), (7, 40)])
def test_rms_norm_matches_reference(t, d, kind, offset):
    x = _rand(t, d, seed=t) * 2 + 0.5
    w, rows, per_token = _norm_weight(kind, t, d, torch.float32, seed=d)
    out = fused.rms_norm(x, w, 1e-5, offset, weight_rows=rows)
    _close(out, ref.rms_norm_reference(x, per_token, 1e-5, offset))
    # the two numerics differ (a weight of w versus 1 + w): a kernel ignoring the offset fails
    assert (fused.rms_norm(x, w, 1e-5, 1.0 - offset, weight_rows=rows) - out).abs().max() > 1e-2


def test_rms_norm_strided_rows_and_output_buffer():
    wide = _rand(5, 90, seed=3)
    x = wide[:, 7:47]  # rows 90 apart
    w = _rand(40, seed=4)
    out = torch.full((5, 40), float("nan"), device=DEVICE)
    fused.rms_norm(x, w, 1e-6, out=out)
    _close(out, ref.rms_norm_reference(x, w, 1e-6))


def test_norm_launchers_refuse_bad_inputs():
    x, w = _rand(3, 40, seed=0), _rand(40, seed=1)
    with pytest.raises(ValueError, match="weight must have"):
        fused.rms_norm(x, w.half(), 1e-6)
    with pytest.raises(ValueError, match=r"base norm weight must be a contiguous \[40\]"):
        fused.rms_norm(x, _rand(41, seed=2), 1e-6)
    with pytest.raises(ValueError, match=r"weight must be \[3, 40\]"):
        fused.rms_norm(x, _rand(2, 40, seed=2), 1e-6)
    with pytest.raises(ValueError, match="contiguous last dim"):
        fused.rms_norm(_rand(40, 3, seed=2).t(), w, 1e-6)
    with pytest.raises(ValueError, match=r"residual must be \[3, 40\]"):
        fused.add_rms_norm(x, _rand(3, 41, seed=2), w, 1e-6)
    with pytest.raises(ValueError, match="x must be"):
        fused.rms_norm(_rand(2, 3, 40, seed=2), w, 1e-6)
    rows = torch.tensor([0, 1, 0], device=DEVICE)
    with pytest.raises(ValueError, match="with weight_rows, weight must be a table"):
        fused.rms_norm(x, w, 1e-6, weight_rows=rows)
    with pytest.raises(ValueError, match=r"weight_rows must be \[T=3\]"):
        fused.rms_norm(x, _rand(2, 40, seed=2), 1e-6, weight_rows=rows[:2])


# ---------------------------------------------------------------------------------- gated activation


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("t,width", [(1, 72), (3, 40), (7, 1100)])  # 1100: two column blocks
def test_gated_activation_matches_reference(t, width, act, dtype):
    gate, up = _rand(t, width, seed=width, dtype=dtype) * 3, _rand(t, width, seed=t, dtype=dtype)
    got = fused.gated_activation(gate, up, act)
    _close(got, ref.gated_activation_reference(gate, up, act), dtype)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activation_one_gate_up_tensor(act):
    gate_up = _rand(3, 2 * 72, seed=5) * 3
    got = fused.gated_activation(gate_up, act=act)
    _close(got, ref.gated_activation_reference(gate_up, act=act))
    # gate first: swapping the halves changes the result
    swapped = torch.cat((gate_up[:, 72:], gate_up[:, :72]), dim=1)
    assert (fused.gated_activation(swapped, act=act) - got).abs().max() > 1e-2


def test_gated_activation_extremes_stay_finite():
    gate = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0]], device=DEVICE).repeat(2, 1)
    up = _rand(2, 5, seed=1)
    for act in ("silu", "gelu_tanh"):
        _close(fused.gated_activation(gate, up, act), ref.gated_activation_reference(gate, up, act))


def test_gated_activation_refuses_bad_inputs():
    g = _rand(3, 40, seed=0)
    with pytest.raises(ValueError, match="act must be"):
        fused.gated_activation(g, g, "relu")
    with pytest.raises(ValueError, match="even width"):
        fused.gated_activation(_rand(3, 41, seed=0))
    with pytest.raises(ValueError, match=r"up must be \[3, 40\]"):
        fused.gated_activation(g, _rand(3, 39, seed=0))
    with pytest.raises(ValueError, match="up must have"):
        fused.gated_activation(g, g.half())


# ---------------------------------------------------------------------------------- RoPE + KV write


def _tables(t, rot, dtype, seed):
    """cos and signed sin ``[T, 1, R]`` as ``rope_tables`` makes them, at random positions."""
    from bitdelta.serving.models.common import rope_tables

    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 500, (t,), generator=g).to(DEVICE)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    return rope_tables(positions, inv_freq.to(DEVICE), 1.0, dtype)


def _rope_case(t, heads, kv, d, rot, dtype, seed):
    q, k, v = (_rand(t, n, d, seed=seed + i, dtype=dtype) for i, n in enumerate((heads, kv, kv)))
    cos, sin = _tables(t, rot, dtype, seed)
    blocks, block_size = 5, 4
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(blocks * block_size, generator=g)[:t].to(DEVICE)  # scattered over the pool
    kc = _rand(blocks, block_size, kv, d, seed=seed + 7, dtype=dtype)
    vc = _rand(blocks, block_size, kv, d, seed=seed + 8, dtype=dtype)
    return q, k, v, cos, sin, kc, vc, rows


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("t,heads,kv,d,rot", [(1, 4, 2, 40, 40), (3, 4, 4, 72, 72), (7, 6, 2, 40, 20),
                                              (3, 2, 1, 72, 36)], ids=["T1-gqa", "T3-mha", "T7-partial",
                                                                       "T3-partial-half"])
def test_rope_kv_write_matches_reference(t, heads, kv, d, rot, dtype):
    q, k, v, cos, sin, kc, vc, rows = _rope_case(t, heads, kv, d, rot, dtype, seed=t + d)
    want_kc, want_vc = kc.clone(), vc.clone()
    want_q, want_k = ref.rope_kv_write_reference(q, k, v, cos, sin, want_kc, want_vc, rows)
    got_q, got_k = fused.rope_kv_write(q, k, v, cos, sin, kc, vc, rows, return_k=True)
    _close(got_q, want_q, dtype)
    _close(got_k, want_k, dtype)
    _close(kc, want_kc, dtype)
    assert torch.equal(vc, want_vc)  # values are copied, untouched rows stay as they were
    if rot < d and _exact(dtype):  # the dims past the rotary ones pass through exactly
        assert torch.equal(got_q[..., rot:], q[..., rot:])
    assert (got_q - q).abs().max() > 1e-2  # and the rotary ones rotate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["qwen3", "gemma3"])
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("t,rot", [(1, 40), (7, 20)], ids=["T1", "T7-partial"])
def test_rope_kv_write_with_qk_norms_matches_reference(t, rot, kind, offset, dtype):
    heads, kv, d = 4, 2, 40
    q, k, v, cos, sin, kc, vc, rows = _rope_case(t, heads, kv, d, rot, dtype, seed=t + rot)
    qw, w_rows, q_per_token = _norm_weight(kind, t, d, dtype, seed=3)
    kw, _, k_per_token = _norm_weight(kind, t, d, dtype, seed=4) if kind != "table" else (None, None, None)
    if kind == "table":  # the same rows of a second table
        kw = _rand(4, d, seed=4, dtype=dtype)
        k_per_token = kw[w_rows]
    want_kc, want_vc = kc.clone(), vc.clone()
    want_q, want_k = ref.rope_kv_write_reference(q * 3, k * 3, v, cos, sin, want_kc, want_vc, rows,
                                                 q_per_token, k_per_token, 1e-6, offset)
    got_q, got_k = fused.rope_kv_write(q * 3, k * 3, v, cos, sin, kc, vc, rows, return_k=True, q_weight=qw,
                                       k_weight=kw, weight_rows=w_rows, eps=1e-6, offset=offset)
    _close(got_q, want_q, dtype)
    _close(got_k, want_k, dtype)
    _close(kc, want_kc, dtype)
    assert torch.equal(vc, want_vc)
    # without the norms the result differs (a kernel skipping them fails)
    assert (fused.rope_kv_write(q * 3, k * 3, v, cos, sin, kc.clone(), vc.clone(), rows) - got_q).abs().max() > 1e-1


def test_rope_kv_write_strided_views_and_int32_rows():
    # Phi-3 style: q, k, v as views of one qkv projection output (row stride wider than the heads)
    t, heads, kv, d = 3, 4, 2, 40
    qkv = _rand(t, (heads + 2 * kv) * d, seed=9)
    q, k, v = (p.reshape(t, -1, d) for p in qkv.split([heads * d, kv * d, kv * d], dim=-1))
    cos, sin = _tables(t, d, torch.float32, seed=9)
    kc, vc = _rand(4, 4, kv, d, seed=1), _rand(4, 4, kv, d, seed=2)
    rows = torch.tensor([13, 0, 6], device=DEVICE)
    want_kc, want_vc = kc.clone(), vc.clone()
    want_q, _ = ref.rope_kv_write_reference(q, k, v, cos, sin, want_kc, want_vc, rows)
    got_q = fused.rope_kv_write(q, k, v, cos, sin, kc, vc, rows.int())
    _close(got_q, want_q)
    _close(kc, want_kc)
    assert torch.equal(vc, want_vc)


def test_rope_launcher_refuses_bad_inputs():
    q, k, v, cos, sin, kc, vc, rows = _rope_case(3, 4, 2, 40, 40, torch.float32, seed=1)
    with pytest.raises(ValueError, match="even R"):
        fused.rope_kv_write(q, k, v, cos[..., :7], sin[..., :7], kc, vc, rows)
    with pytest.raises(ValueError, match="k_cache must be"):
        fused.rope_kv_write(q, k, v, cos, sin, kc[..., :36], vc, rows)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        fused.rope_kv_write(q, k, v, cos, sin, kc.transpose(0, 1), vc.transpose(0, 1), rows)
    with pytest.raises(ValueError, match="kv_index must be"):
        fused.rope_kv_write(q, k, v, cos, sin, kc, vc, rows.float())
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        fused.rope_kv_write(q[:, :3], k, v, cos, sin, kc, vc, rows)
    with pytest.raises(ValueError, match="need both q_weight and k_weight"):
        fused.rope_kv_write(q, k, v, cos, sin, kc, vc, rows, q_weight=_rand(40, seed=1))
    with pytest.raises(ValueError, match=r"k_weight must be \[40\] or \[3, 40\]"):
        fused.rope_kv_write(q, k, v, cos, sin, kc, vc, rows, q_weight=_rand(40, seed=1), k_weight=_rand(2, 40, seed=1))
    with pytest.raises(ValueError, match="weight_rows without q/k norm weights"):
        fused.rope_kv_write(q, k, v, cos, sin, kc, vc, rows, weight_rows=rows)
    with pytest.raises(ValueError, match="contiguous head dim"):
        fused.rope_kv_write(q.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :40], k, v, cos, sin, kc, vc,
                            rows)


# ---------------------------------------------------------------------------------- a served model


def _served_pair(arch, tmp_path, device="cpu", dtype=torch.float32):
    """A tiny served base of ``arch`` with one row-scaled delta registered (its slot loaded): Llama,
    Phi-3 (partial rotary, fused qkv and gate_up), Gemma (Gemma's norms, GELU-tanh), Qwen3 (q/k
    norms) or Gemma-3 (sandwich norms, q/k norms in Gemma's numerics, two rotary tables)."""
    import warnings

    import transformers

    import bitdelta
    from arch_pairs import finetune_of, load_model, make_arch_model
    from bitdelta.serving.models import DeltaModel
    from bitdelta.serving.residency import DeltaSlots

    if arch == "gemma":  # Gemma (1): (1 + w) norms and GELU-tanh without sandwich norms
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = transformers.GemmaConfig(vocab_size=61, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=72, head_dim=10,
                                           max_position_embeddings=64)
            base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(100)
            for p in base.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    else:
        overrides = {"phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5}}}.get(arch, {})
        base = make_arch_model(arch, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp_path / "base")
        finetune_of(base, 1, scale=0.3).save_pretrained(tmp_path / "ft")
    delta = bitdelta.compress(tmp_path / "base", tmp_path / "ft", scale="row", progress=False)
    model = DeltaModel.from_hf(load_model(tmp_path / "base"), device=device, dtype=dtype)
    slots = DeltaSlots(model, max_gpu_deltas=1)
    slots.register("ft", "<memory:ft>", delta=delta)
    return model, slots, slots.load("ft")


def _run_steps(model, slots, slot, vocab):
    """Logits of prefill and decode steps with and without deltas (and a continuing chunk beside
    decode rows) on a fresh KV cache, and the cache afterwards."""
    from bitdelta.serving.kv_cache import KVCache
    from bitdelta.serving.mapping import BatchMapping

    kv = KVCache(model.num_layers, 4, 32, model.kv_heads, model.head_dim, model.dtype, model.device, block_size=4)
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    steps = [
        [(0, 0, toks(5), -1), (1, 0, toks(5), -1)],  # prefill, base only (one group of two prompts)
        [(2, 0, toks(6), slot), (3, 0, toks(3), -1)],  # prefill with a delta
        [(0, 5, toks(1), slot), (1, 5, toks(1), -1), (2, 6, toks(1), slot), (3, 3, toks(1), -1)],  # decode
        [(0, 6, toks(1), -1), (1, 6, toks(1), -1), (2, 7, toks(1), -1)],  # decode, base only
        [(0, 7, toks(1), slot), (1, 7, toks(3), -1), (3, 4, toks(1), slot)],  # a chunk among decode rows
    ]
    logits = [model.forward(BatchMapping.build(entries, model.device, kv), kv, slots) for entries in steps]
    return logits, kv


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's model check (the GPU benchmark checks CUDA)")
@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma", "qwen3", "gemma3"])
def test_served_model_same_logits_fused_and_unfused(arch, tmp_path, monkeypatch):
    from bitdelta.serving.models import common

    model, slots, slot = _served_pair(arch, tmp_path)
    monkeypatch.setenv("BITDELTA_FUSED_BASE", "0")
    want, want_kv = _run_steps(model, slots, slot, model.vocab_size)

    calls = {}

    def counted(name):
        fn = getattr(fused, name)

        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call

    for name in ("add_rms_norm", "rms_norm", "gated_activation", "rope_kv_write"):
        monkeypatch.setattr(common.fused_norm, name, counted(name))
    monkeypatch.setenv("BITDELTA_FUSED_BASE", "1")
    got, got_kv = _run_steps(model, slots, slot, model.vocab_size)
    layers, steps = model.num_layers, len(want)
    assert calls["rope_kv_write"] == calls["gated_activation"] == layers * steps  # per layer and step
    # one fused norm per residual add (two per layer), the first input norm and the final one, which
    # takes the last add on decode steps; Gemma's sandwich layers normalise two block outputs more
    norms = 2 * layers + 1 + (2 * layers if model.arch.sandwich_norms else 0)
    assert calls["add_rms_norm"] + calls["rms_norm"] == norms * steps
    assert calls["add_rms_norm"] > layers * steps
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=f"step {i}")
    torch.testing.assert_close(got_kv.k, want_kv.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_kv.v, want_kv.v, rtol=1e-5, atol=1e-5)


def test_fused_base_switch(monkeypatch):
    from bitdelta.serving.models.common import fused_base_on

    cpu = torch.device("cpu")
    monkeypatch.delenv("BITDELTA_FUSED_BASE", raising=False)
    assert not fused_base_on(cpu)  # the default: off on a CPU, even under the interpreter
    monkeypatch.setenv("BITDELTA_FUSED_BASE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU runs the kernels only under the interpreter
    assert fused_base_on(cpu)
    monkeypatch.setenv("BITDELTA_FUSED_BASE", "0")
    assert not fused_base_on(cpu)
    monkeypatch.setenv("BITDELTA_FUSED_BASE", "yes")
    with pytest.raises(ValueError, match="must be 1, 0 or auto"):
        fused_base_on(cpu)
    monkeypatch.setenv("BITDELTA_FUSED_BASE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs Triton and CUDA"):
        fused_base_on(cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_served_model_on_gpu_fused_matches_unfused(dtype, tmp_path, monkeypatch):
    """On a GPU (compiled kernels): the same steps' logits with the switch on and off. float32 differs
    only past rounding; bfloat16 by the odd ulp where a float32 difference crosses a rounding boundary."""
    model, slots, slot = _served_pair("llama", tmp_path, device="cuda", dtype=dtype)
    runs = {}
    for on in ("0", "1"):
        monkeypatch.setenv("BITDELTA_FUSED_BASE", on)
        runs[on], _ = _run_steps(model, slots, slot, model.vocab_size)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for i, (a, b) in enumerate(zip(runs["1"], runs["0"])):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"step {i}")
