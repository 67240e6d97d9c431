"""1-bit deltas on a quantized base: INT8/FP8 arithmetic, the written format, compression against
a quantized base (on the fly and from a quantized directory), merge, wrong-base refusal both ways,
transformers' FP8 format as an input, and the CLI (quantize-base, --base-quant, distill + eval)."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitdelta
from bitdelta.apply import merge
from bitdelta.artifact import load_delta
from bitdelta.cli import main
from bitdelta.compress import compress
from bitdelta.errors import BitDeltaError, FormatError, WrongBaseError
from bitdelta.hf import load_model
from bitdelta.quant import dequantize, fake_quantize, quantize
from bitdelta.sources import WeightSource
from models import load, make_pair

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny"
QMAX = {"int8": 127.0, "fp8": 448.0}
LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _weights(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 50, generator=g) * torch.logspace(-4, 1, 9).unsqueeze(1)  # rows of very different size
    w[3] = 0.0  # a zero row must not divide by zero
    w[5, 7] = 40.0  # one outlier dominates its row's scale
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_within_half_a_step(dtype):
    w = _weights(dtype)
    q, scale = quantize(w, "int8")
    assert q.dtype == torch.int8 and scale.shape == (9, 1) and scale.dtype == dtype
    assert q.abs().max() <= 127 and (q.abs().amax(1)[w.float().abs().amax(1) > 0] >= 126).all()
    assert torch.equal(q[3], torch.zeros_like(q[3])) and scale[3].item() == 1.0
    back = dequantize(q, scale)
    assert back.dtype == dtype
    s = scale.float()
    # half a quantization step, plus the rounding of the result to the weight's dtype
    rounding = 0.0 if dtype == torch.float32 else 2.0**-8
    bound = s / 2 * (1 + 1e-6) + w.float().abs() * rounding
    assert ((back.float() - w.float()).abs() <= bound).all()
    assert torch.equal(fake_quantize(w, "int8"), back)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_round_trip_relative_error(dtype):
    w = _weights(dtype)
    q, scale = quantize(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (9, 1)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() <= 448
    back = dequantize(q, scale).float()
    err = (back - w.float()).abs()
    s = scale.float()
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative for normal numbers; below 2^-6 (subnormal)
    # the step is 2^-9 of the scale; bf16 adds its own 2^-8 rounding of the product
    rel = 2.0**-4 + (0.0 if dtype == torch.float32 else 2.0**-8)
    assert (err <= w.float().abs() * rel + s * 2.0**-10 + 1e-12).all()
    assert (err <= w.float().abs() * 2.0**-3 + s * 2.0**-9).all()  # the documented bound, with room
    assert err.max() > 0  # it does quantize


def test_quantize_refuses_bad_input():
    with pytest.raises(BitDeltaError, match="unknown base quantization"):
        quantize(torch.ones(2, 2), "int4")
    with pytest.raises(BitDeltaError, match="NaN or inf"):
        quantize(torch.tensor([[1.0, float("nan")]]), "fp8")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    base, ft = make_pair("llama", tmp, tie=False)
    out = {"base": base, "ft": ft}
    for scheme in ("int8", "fp8"):
        out[scheme] = tmp / f"base-{scheme}"
        assert main(["quantize-base", str(base), "--scheme", scheme, "--out", str(out[scheme]), "-q"]) == 0
    return out


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantize_base_writes_compressed_tensors(pair, scheme):
    qdir, base = pair[scheme], pair["base"]
    cfg = json.loads((qdir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == {"int8": "naive-quantized", "fp8": "float-quantized"}[scheme]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 8 and weights["strategy"] == "channel" and weights["symmetric"] is True
    assert weights["type"] == {"int8": "int", "fp8": "float"}[scheme]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    assert plain == json.loads((base / "config.json").read_text())

    got, orig = load_file(qdir / "model.safetensors"), load_file(base / "model.safetensors")
    linear = [k for k in orig if k.endswith(LINEAR_SUFFIXES)]
    assert len(linear) == 14
    assert set(got) == set(orig) | {k[: -len("weight")] + "weight_scale" for k in linear}
    want_dtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[scheme]
    for k in orig:
        if k in linear:
            w, q, s = orig[k], got[k], got[k[: -len("weight")] + "weight_scale"]
            assert q.dtype == want_dtype and s.shape == (w.shape[0], 1) and s.dtype == w.dtype
            torch.testing.assert_close(s, w.abs().amax(1, keepdim=True) / QMAX[scheme], rtol=1e-6, atol=0)
            step = s if scheme == "int8" else w.abs() * 2.0**-3 + s * 2.0**-9
            assert ((q.float() * s - w).abs() <= step / (2 if scheme == "int8" else 1) + 1e-7).all()
        else:  # embeddings, norms, the output head: kept as they are
            assert torch.equal(got[k], orig[k]), k


def _independent_dequant(qdir: Path) -> dict[str, torch.Tensor]:
    sd = load_file(qdir / "model.safetensors")
    return {k: (v.float() * sd[k[: -len("weight")] + "weight_scale"].float()) if k.endswith(LINEAR_SUFFIXES) else v
            for k, v in sd.items() if not k.endswith("weight_scale")}


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_compress_against_quantized_base_then_merge(pair, scheme):
    qdir = pair[scheme]
    on_the_fly = compress(pair["base"], pair["ft"], base_quant=scheme, progress=False)
    from_dir = compress(qdir, pair["ft"], progress=False)
    rec = from_dir.info["compression"]["base_quantization"]
    assert rec["scheme"] == scheme and rec["quantized_tensors"] == 14 and "compressed-tensors" in rec["format"]
    assert on_the_fly.info["compression"]["base_quantization"]["scheme"] == scheme
    # the same quantized base either way: same fingerprint, same signs and scales
    assert on_the_fly.fingerprint.sha256 == from_dir.fingerprint.sha256
    for name, m in from_dir.modules.items():
        assert torch.equal(m.sign, on_the_fly.modules[name].sign)
        assert torch.equal(m.scale, on_the_fly.modules[name].scale)
    plain = compress(pair["base"], pair["ft"], progress=False)
    assert plain.info["compression"]["base_quantization"] is None
    assert plain.fingerprint.sha256 != from_dir.fingerprint.sha256

    deq = _independent_dequant(qdir)
    model = load_model(qdir, device="cpu")
    assert model.config.to_dict().get("quantization_config") is None
    for k, v in deq.items():
        assert torch.equal(model.get_parameter(k), v), k
    merged = merge(model, from_dir)
    for name, m in from_dir.modules.items():
        want = deq[f"{name}.weight"] + m.dense()  # dequant(Q(W_base)) + Δ̂, Δ̂ fitted to W_ft − Q(W_base)
        assert torch.equal(merged.get_submodule(name).weight, want), name
    ft = load(pair["ft"])
    ids = torch.tensor([[1, 5, 9, 30, 60, 90]])
    with torch.no_grad():
        err = (merged(ids).logits - ft(ids).logits).abs().mean()
        base_err = (load_model(qdir, device="cpu")(ids).logits - ft(ids).logits).abs().mean()
    assert err < base_err


def test_wrong_base_is_refused_both_ways(pair):
    d_fp8 = compress(pair["base"], pair["ft"], base_quant="fp8", progress=False)
    d_plain = compress(pair["base"], pair["ft"], progress=False)
    with pytest.raises(WrongBaseError, match="quantize-base .* --scheme fp8"):
        bitdelta.apply(load(pair["base"]), d_fp8)  # the unquantized base
    with pytest.raises(WrongBaseError, match="fp8-quantized base.*unquantized"):
        merge(load_model(pair["fp8"], device="cpu"), d_plain)
    with pytest.raises(WrongBaseError, match="quantized to int8 but .* fp8"):
        bitdelta.apply(load_model(pair["int8"], device="cpu"), d_fp8)
    # the right quantized base, loaded dequantized, or the plain base quantized as it loads
    bitdelta.apply(load_model(pair["fp8"], device="cpu"), d_fp8)
    bitdelta.apply(load_model(pair["base"], device="cpu", base_quant="fp8"), d_fp8)


def test_transformers_fp8_block_format_is_read_as_it_is(pair, tmp_path):
    """A base in transformers' own FP8 format (FineGrainedFP8Config: float8 weights and block-wise
    float32 ``weight_scale_inv``), with blocks that do not divide the shapes (40, 56 by 16)."""
    base = pair["base"]
    orig = load_file(base / "model.safetensors")
    out, want = {}, {}
    for k, w in orig.items():
        if not k.endswith(LINEAR_SUFFIXES):
            out[k] = w
            continue
        rows, cols = (-(-n // 16) for n in w.shape)
        pad = torch.zeros(rows * 16, cols * 16)
        pad[: w.shape[0], : w.shape[1]] = w
        blocks = pad.reshape(rows, 16, cols, 16)
        s = blocks.abs().amax(dim=(1, 3)) / 448
        q = (blocks / s[:, None, :, None]).reshape(rows * 16, cols * 16)[: w.shape[0], : w.shape[1]]
        out[k] = q.to(torch.float8_e4m3fn)
        out[k[: -len("weight")] + "weight_scale_inv"] = s
        full = s.repeat_interleave(16, 0).repeat_interleave(16, 1)[: w.shape[0], : w.shape[1]]
        want[k] = out[k].float() * full
    fdir = tmp_path / "fp8-native"
    fdir.mkdir()
    save_file(out, fdir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    (fdir / "config.json").write_text(json.dumps(cfg))

    src = WeightSource.load(fdir)
    assert src.quantization["scheme"] == "fp8" and src.quantization["quantized_tensors"] == 14
    assert not any("scale" in k for k in src.checkpoint_keys())
    for k, v in want.items():
        assert torch.equal(src.get(k), v.to(torch.float32)), k  # the config's dtype (float32 here)
    delta = compress(fdir, pair["ft"], progress=False)
    assert "transformers fp8" in delta.info["compression"]["base_quantization"]["format"]
    merged = merge(load_model(fdir, device="cpu"), delta)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(merged.get_submodule(name).weight, want[f"{name}.weight"] + delta.modules[name].dense())
    with pytest.raises(BitDeltaError, match="already quantized to fp8"):
        compress(fdir, pair["ft"], base_quant="int8", progress=False)

    # a weight quantized without its scale, or an unsupported quantization, is a clear error
    del out["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(out, fdir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="up_proj.weight .* has no weight_scale_inv"):
        WeightSource.load(fdir)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (fdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="quant_method 'gptq'"):
        WeightSource.load(fdir)


def _one_error_line(capsys) -> str:
    """The one ``error:`` line the CLI printed (transformers' loading bars may come before it)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.endswith(lines[0]) and "Traceback" not in err, err
    return lines[0]


def test_cli_misuse_is_one_line(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--base", str(pair["base"]), "--finetuned", str(pair["ft"]), "--out", str(tmp_path / "x"),
              "--base-quant", "foo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--base-quant" in err and "invalid choice: 'foo'" in err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["quantize-base", str(pair["base"]), "--scheme", "int4", "--out", str(tmp_path / "y")])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    # an existing --out is kept unless --overwrite
    before = (pair["int8"] / "model.safetensors").read_bytes()
    assert main(["quantize-base", str(pair["base"]), "--scheme", "fp8", "--out", str(pair["int8"]), "-q"]) == 2
    assert "already exists; pass --overwrite" in _one_error_line(capsys)
    assert (pair["int8"] / "model.safetensors").read_bytes() == before
    # an already quantized base is not quantized again, nor compressed under another scheme
    assert main(["quantize-base", str(pair["fp8"]), "--scheme", "int8", "--out", str(tmp_path / "z"), "-q"]) == 2
    assert "already quantized" in _one_error_line(capsys)
    assert main(["compress", "--base", str(pair["fp8"]), "--finetuned", str(pair["ft"]), "--out", str(tmp_path / "d"),
                 "--base-quant", "int8", "-q"]) == 2
    assert "already quantized to fp8" in _one_error_line(capsys)
    assert not (tmp_path / "z").exists() and not (tmp_path / "d").exists()
    # GPT-2's Conv1D layers are not nn.Linear: nothing a quantized base would quantize
    g_base, g_ft = make_pair("gpt2", tmp_path)
    assert main(["compress", "--base", str(g_base), "--finetuned", str(g_ft), "--out", str(tmp_path / "g"),
                 "--base-quant", "fp8", "-q"]) == 2
    assert "no nn.Linear weight to quantize" in _one_error_line(capsys)
    # a delta for the quantized base, merged onto the plain one: refused, saying what to load
    d = tmp_path / "d8"
    assert main(["compress", "--base", str(pair["base"]), "--finetuned", str(pair["ft"]), "--out", str(d),
                 "--base-quant", "int8", "-q"]) == 0
    capsys.readouterr()
    assert json.loads((d / "delta_config.json").read_text())["compression"]["base_quantization"]["scheme"] == "int8"
    assert main(["merge", "--base", str(pair["base"]), "--delta", str(d), "--out", str(tmp_path / "m")]) == 2
    assert "quantize-base" in _one_error_line(capsys) and not (tmp_path / "m").exists()
    assert main(["merge", "--base", str(pair["int8"]), "--delta", str(d), "--out", str(tmp_path / "m")]) == 0
    merged = load(tmp_path / "m")  # a plain dense model, loadable by transformers alone
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                       _independent_dequant(pair["int8"])["model.layers.0.self_attn.q_proj.weight"]
                       + load_delta(d).modules["model.layers.0.self_attn.q_proj"].dense())


def test_distill_and_eval_through_the_cli_on_a_quantized_base(tmp_path, capsys):
    """The bundled tiny base as INT8: distillation quantizes the base as it loads (--base-quant), eval
    loads the quantized directory; both are the same quantized base (the fingerprint matches)."""
    qdir, d = tmp_path / "base-int8", tmp_path / "sh-int8.bitdelta"
    assert main(["quantize-base", str(TINY / "base"), "--scheme", "int8", "--out", str(qdir), "-q"]) == 0
    assert (qdir / "tokenizer.json").is_file()
    assert main(["compress", "--base", str(TINY / "base"), "--base-quant", "int8",
                 "--finetuned", str(TINY / "shakespeare"), "--out", str(d), "--distill-steps", "3",
                 "--calibration", str(TINY / "heldout" / "shakespeare.txt"),
                 "--num-samples", "8", "--seq-len", "32", "--heldout-samples", "4", "--distill-batch-size", "4",
                 "--device", "cpu", "-q"]) == 0
    cfg = json.loads((d / "delta_config.json").read_text())
    assert cfg["distillation"]["steps"] == 3 and cfg["compression"]["base_quantization"]["scheme"] == "int8"
    capsys.readouterr()
    assert main(["eval", "fidelity", "--base", str(qdir), "--finetuned", str(TINY / "shakespeare"), "--delta", str(d),
                 "--data", str(TINY / "heldout" / "shakespeare.txt"), "--limit", "2", "--max-length", "64",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["delta"] == str(d) and 0 < result["top1_agreement"] <= 1 and result["kl"] >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "ppl", "--model", str(TINY / "base"), "--delta", str(d), "--device", "cpu",
                     "--data", str(TINY / "heldout" / "shakespeare.txt"), "--window", "64"]) == 2
    assert "quantize-base" in _one_error_line(capsys)


def test_inspect_names_the_quantized_base(pair, tmp_path, capsys):
    from bitdelta.report import describe_artifact, format_report

    compress(pair["int8"], pair["ft"], progress=False).save_pretrained(tmp_path / "q")
    compress(pair["base"], pair["ft"], progress=False).save_pretrained(tmp_path / "plain")
    text = format_report(describe_artifact(tmp_path / "q"))
    line = next(ln for ln in text.splitlines() if ln.startswith("base quantized"))
    assert "scheme=int8" in line and "quantized_tensors=14" in line
    assert "base quantized" not in format_report(describe_artifact(tmp_path / "plain"))
