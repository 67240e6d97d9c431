"""Registration checks deltas against the base's samples and magnitudes read once at start-up: it reads
no base weight (dense or quantized), and refuses wrong-base and out-of-bounds deltas as before."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

import bitdelta
import bitdelta.fingerprint as fingerprint
from arch_pairs import byte_tokenizer, finetune_of
from bitdelta.errors import InvalidDeltaError, WrongBaseError
from bitdelta.fingerprint import sample_weight
from bitdelta.serving.models import DeltaModel
from bitdelta.serving.quant_linear import QuantizedWeight
from bitdelta.serving.residency import DeltaSlots
from bitdelta.serving.runtime import build_runtime
from serving.engine_checks import tiny_llama


def _model(tiny_models):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DeltaModel.from_hf(AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32))


def _live(model):
    """The base as registration read it on every call before: live weights, a tied head aliased."""
    live = model.readable()
    if model.head_name == model.embed_name:
        live["lm_head"] = live[model.embed_name]
    return live


def _count_base_reads(model, monkeypatch) -> dict:
    """Counts every later read of ``model``'s weights through readable() or a fingerprint sample."""
    counts = {"readable": 0, "sample_weight": 0}
    readable, sample = model.readable, fingerprint.sample_weight

    def counting_readable():
        counts["readable"] += 1
        return readable()

    def counting_sample(w):
        counts["sample_weight"] += 1
        return sample(w)

    monkeypatch.setattr(model, "readable", counting_readable)
    monkeypatch.setattr(fingerprint, "sample_weight", counting_sample)
    return counts


def test_registering_many_deltas_reads_no_base_weight(tiny_models, delta_dir, monkeypatch):
    model = _model(tiny_models)
    slots = DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=8)
    counts = _count_base_reads(model, monkeypatch)
    # A registration that read the weights would now see another base and refuse every delta; the
    # served base is frozen, so this only happens here, to prove the weights are not read.
    with torch.no_grad():
        for w in [*model.weights.values(), *model.params1d.values()]:
            w.zero_()
    names = [f"{kind}-{i}" for i in range(3) for kind in ("shakespeare", "gsm8k")]
    for name in names:
        slots.register(name, delta_dir / name.split("-")[0])
    assert slots.names() == names
    assert counts == {"readable": 0, "sample_weight": 0}


def test_wrong_base_delta_is_refused_with_the_live_weights_error(tiny_models, delta_dir, tmp_path):
    model = _model(tiny_models)
    slots = DeltaSlots(model, max_gpu_deltas=1)
    wrong = tmp_path / "wrong"  # compressed against a fine-tune, not the served base
    bitdelta.compress(tiny_models["shakespeare"], tiny_models["gsm8k"], scale="row", progress=False).save_pretrained(
        wrong)
    with pytest.raises(WrongBaseError) as err:
        slots.register("wrong", wrong)
    delta = bitdelta.Delta.from_pretrained(wrong)
    with pytest.raises(WrongBaseError) as live_err:
        delta.fingerprint.verify(_live(model), delta_name=str(wrong), base_name=delta.base_model_name_or_path,
                                 model_name=str(model.config._name_or_path))
    assert str(err.value) == str(live_err.value)
    assert "different weights" in str(err.value) and slots.names() == []
    slots.register("right", delta_dir / "shakespeare")  # the right base's delta still registers
    assert slots.names() == ["right"]


def test_value_bounds_still_refuse_a_huge_scale(tiny_models, delta_dir):
    slots = DeltaSlots(_model(tiny_models), max_gpu_deltas=1)
    delta = bitdelta.Delta.from_pretrained(delta_dir / "shakespeare")
    name = sorted(delta.modules)[0]
    delta.modules[name].scale = torch.full_like(delta.modules[name].scale, 3e38, dtype=torch.float32)
    with pytest.raises(InvalidDeltaError, match=f"module {name}: scale .* largest magnitude"):
        slots.register("huge", delta_dir / "shakespeare", delta=delta)
    assert slots.names() == []


def test_reference_holds_what_the_live_base_gives(tiny_models):
    model = _model(tiny_models)
    ref = DeltaSlots(model, max_gpu_deltas=1).base_reference
    live = _live(model)
    for name in live:
        w = live[name]
        assert ref.samples.shape(name) == tuple(w.shape)
        assert torch.equal(ref.samples.sample(name), sample_weight(w)) and ref.samples.sample(name).dtype == model.dtype
        assert ref.magnitudes[name] == (float(w.abs().max()), tuple(w.shape))


def test_register_timing_with_and_without_the_reference(tiny_models, delta_dir):
    """Prints registration time against the start-up reference and against the live weights (the
    way before it); the figures are for reading, not asserted."""
    model = _model(tiny_models)
    slots = DeltaSlots(model, max_gpu_deltas=1, max_cpu_deltas=64)
    delta = bitdelta.Delta.from_pretrained(delta_dir / "shakespeare")
    t0 = time.perf_counter()
    for i in range(10):
        slots.register(f"cached-{i}", delta_dir / "shakespeare", delta=delta)
    cached = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    for _ in range(10):
        delta.fingerprint.verify(_live(model), delta_name="d", base_name="b", model_name="m")
    live_verify = (time.perf_counter() - t0) / 10
    print(f"\nregister (cached reference): {cached * 1e3:.2f} ms; live-weight verify alone: {live_verify * 1e3:.2f} ms")
    assert len(slots.names()) == 10


# ---------------------------------------------------------------------------------- quantized base


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory):
    """A tiny random base, a fine-tune, and its delta compressed against the base quantized to int8."""
    tmp = tmp_path_factory.mktemp("cold-start-int8")
    tok = byte_tokenizer()
    base = tiny_llama(tok, max_positions=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        finetune_of(base, 1, scale=0.3).save_pretrained(tmp / "ft")
    bitdelta.compress(tmp / "base", tmp / "ft", scale="row", base_quant="int8", progress=False).save_pretrained(
        tmp / "delta")
    return tmp


def test_quantized_base_is_dequantized_at_start_up_not_at_registration(int8_pair, monkeypatch):
    dequantized = {"calls": 0}
    original = QuantizedWeight.dequantized

    def counting(self, dtype=None):
        dequantized["calls"] += 1
        return original(self, dtype)

    monkeypatch.setattr(QuantizedWeight, "dequantized", counting)
    rt = build_runtime(int8_pair / "base", {}, device="cpu", kv_cache_mb=16, base_quant="int8", start=False)
    try:
        model = rt.model
        quantized = [n for n, w in model.weights.items() if isinstance(w, QuantizedWeight)]
        assert quantized and dequantized["calls"] >= len(quantized)  # each read at start-up
        at_start_up = dequantized["calls"]
        for name in quantized:  # samples of the matrix as a delta sees it: dequantized, in the model's dtype
            assert torch.equal(rt.slots.base_reference.samples.sample(name),
                               sample_weight(original(model.weights[name], model.dtype)))
        for i in range(3):
            rt.register(f"t{i}", str(int8_pair / "delta"))
        assert dequantized["calls"] == at_start_up  # registration dequantized nothing
        assert rt.slots.names() == ["t0", "t1", "t2"]
    finally:
        rt.shutdown()
