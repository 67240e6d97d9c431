"""Values and types are checked at load and against the base: absurd scales, NaN/inf dense values,
wrong dtypes and mistyped config fields are clear errors naming the tensor or field, never a crash
on the first request; a legitimate artifact still loads, applies, merges and registers."""

import copy
import json
import shutil

import pytest
import torch

import bitdelta
from bitdelta import artifact
from bitdelta.errors import BitDeltaError, FormatError, InvalidDeltaError, ShapeMismatchError
from bitdelta.report import describe_artifact
from bitdelta.safetensors_io import SafetensorsCheckpoint, save_file
from bitdelta.validate import VALUE_BOUND, check_delta_values
from models import load, make_pair

Q = "model.layers.0.self_attn.q_proj"
NORM = "model.layers.1.input_layernorm.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("values-pair"))


@pytest.fixture(scope="module")
def pristine(pair, tmp_path_factory):
    base_dir, ft_dir = pair
    out = tmp_path_factory.mktemp("values-pristine") / "ft.bitdelta"
    bitdelta.compress(base_dir, ft_dir, scale="row", progress=False).save_pretrained(out)
    return out


@pytest.fixture()
def art(pristine, tmp_path):
    out = tmp_path / "ft"
    shutil.copytree(pristine, out)
    return out


@pytest.fixture(scope="module")
def slots(pair):
    from bitdelta.serving.model import DeltaLlama
    from bitdelta.serving.slots import DeltaSlots

    return DeltaSlots(DeltaLlama.from_hf(load(pair[0])), max_gpu_deltas=1)


def _rewrite(path, change):
    """Rewrites the artifact's weights with ``change(tensors)`` applied (config unchanged)."""
    ckpt = SafetensorsCheckpoint.open(path, stem="delta")
    tensors = {k: ckpt.get(k).clone() for k in ckpt.keys()}
    change(tensors)
    save_file(tensors, path / "delta.safetensors", ckpt.metadata)


def _edit_config(path, edit):
    cfg = json.loads((path / "delta_config.json").read_text())
    edit(cfg)
    (path / "delta_config.json").write_text(json.dumps(cfg))


def test_legitimate_artifact_passes_every_check(pristine, pair, slots):
    delta = bitdelta.Delta.from_pretrained(pristine)
    base = load(pair[0])
    check_delta_values(delta, dict(base.named_parameters()))
    bitdelta.apply(base, delta)
    bitdelta.unapply(base)
    bitdelta.merge(load(pair[0]), delta)
    slots.register("legit", pristine)
    assert "legit" in slots.names()
    slots.unregister("legit")


def test_absurd_scale_refused_by_apply_merge_and_registration(art, pair, slots):
    _rewrite(art, lambda t: t[f"{Q}.scale"].__setitem__((0, 3), 3e38))
    delta = bitdelta.Delta.from_pretrained(art)  # finite: the format alone cannot tell
    base = load(pair[0])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for op in (bitdelta.apply, bitdelta.merge):
        with pytest.raises(InvalidDeltaError, match=f"{Q}.*scale 3e\\+38"):
            op(base, delta)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "nothing changed"
    assert not hasattr(base, "_bitdelta_restore")
    with pytest.raises(InvalidDeltaError, match=Q):
        slots.register("huge-scale", art)
    assert "huge-scale" not in slots.names()


def test_scale_bound_is_relative_to_the_base_module(art, pair):
    delta = bitdelta.Delta.from_pretrained(art)
    w = load(pair[0]).get_submodule(Q).weight.detach()
    limit = VALUE_BOUND * float(w.abs().max())
    delta.modules[Q].scale[0, 0] = 0.99 * limit
    check_delta_values(delta, {Q: w})
    delta.modules[Q].scale[0, 0] = 1.01 * limit
    with pytest.raises(InvalidDeltaError, match=Q):
        check_delta_values(delta, {Q: w})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_dense_norm_refused_at_load(art, bad):
    _rewrite(art, lambda t: t[NORM].__setitem__(5, bad))
    with pytest.raises(FormatError, match=NORM):
        bitdelta.Delta.from_pretrained(art)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scale_refused_at_load(art, bad):
    _rewrite(art, lambda t: t[f"{Q}.scale"].__setitem__((0, 0), bad))
    with pytest.raises(FormatError, match=Q):
        bitdelta.Delta.from_pretrained(art)


def test_non_finite_values_in_memory_refused_by_apply(pristine, pair):
    delta = bitdelta.Delta.from_pretrained(pristine)
    delta.dense[NORM] = delta.dense[NORM].clone()
    delta.dense[NORM][0] = float("nan")
    with pytest.raises(InvalidDeltaError, match=NORM):
        bitdelta.apply(load(pair[0]), delta)


def test_huge_finite_dense_refused_against_the_base(art, pair, slots):
    _rewrite(art, lambda t: t[NORM].__setitem__(0, 1e6))
    delta = bitdelta.Delta.from_pretrained(art)
    with pytest.raises(InvalidDeltaError, match=NORM):
        bitdelta.merge(load(pair[0]), delta)
    with pytest.raises(InvalidDeltaError, match=NORM):
        slots.register("huge-norm", art)


def test_dense_shape_must_match_the_base(pristine, pair):
    delta = bitdelta.Delta.from_pretrained(pristine)
    delta.dense[NORM] = torch.ones(41)
    with pytest.raises(ShapeMismatchError, match=NORM):
        bitdelta.apply(load(pair[0]), delta)


def test_dense_naming_no_base_parameter_is_refused(pristine, pair):
    delta = bitdelta.Delta.from_pretrained(pristine)
    delta.dense["model.norm.not_a_parameter"] = torch.ones(40)
    with pytest.raises(BitDeltaError, match="not_a_parameter"):
        bitdelta.apply(load(pair[0]), delta)


@pytest.mark.parametrize("tensor,dtype,what", [
    (NORM, torch.int64, "dense parameter"), (NORM, torch.bool, "dense parameter"),
    (NORM, torch.uint8, "dense parameter"),
    (f"{Q}.sign", torch.float32, "sign"), (f"{Q}.scale", torch.int32, "scales"),
])
def test_wrong_dtypes_are_format_errors_naming_the_tensor(art, slots, tensor, dtype, what):
    _rewrite(art, lambda t: t.__setitem__(tensor, t[tensor].to(dtype)))
    with pytest.raises(FormatError, match=f"{tensor}.*{what}"):
        bitdelta.Delta.from_pretrained(art)
    with pytest.raises(FormatError, match=tensor):
        slots.register("bad-dtype", art)


@pytest.mark.parametrize("field,value", [
    ("modules", []), ("modules", None), ("modules", "x"), ("dense_parameters", {"a": 1}), ("dense_parameters", [1]),
    ("files", "tokenizer.json"), ("files", [None]), ("base_fingerprint", []), ("base_fingerprint", {"sha256": 5}),
    ("tied_parameters", ["a"]), ("vocab_size", -3), ("vocab_size", "97"), ("finetuned_num_parameters", 1e400),
    ("distillation", [1, 2]), ("format_version", True),
])
def test_config_field_types_are_checked(art, field, value):
    _edit_config(art, lambda c: c.__setitem__(field, value))
    for read in (bitdelta.Delta.from_pretrained, describe_artifact):
        with pytest.raises(FormatError, match=field):
            read(art)


@pytest.mark.parametrize("key,value", [
    ("bits", 10**6), ("bits", float("nan")), ("bits", 0), ("shape", [40]), ("shape", [40, -40]), ("shape", None),
    ("scale", "diagonal"), ("kind", ["linear"]), ("extra_rows", -1), ("vocab", "yes"),
])
def test_module_entry_fields_are_checked(art, key, value):
    _edit_config(art, lambda c: c["modules"][Q].__setitem__(key, value))
    for read in (bitdelta.Delta.from_pretrained, describe_artifact):
        with pytest.raises(FormatError, match=f"modules.{Q}.{key}"):
            read(art)


def test_module_entry_that_is_not_an_object(art):
    _edit_config(art, lambda c: c["modules"].__setitem__(Q, [1, 2]))
    with pytest.raises(FormatError, match=f"modules.{Q}"):
        describe_artifact(art)


def test_tensor_shape_must_follow_from_the_config(art):
    # the config and the weights disagree on the planes: refused from the header, nothing read
    _edit_config(art, lambda c: c["modules"][Q].__setitem__("bits", 2))
    with pytest.raises(FormatError, match=f"{Q}.sign.*shape"):
        bitdelta.Delta.from_pretrained(art)


def test_precheck_sees_the_layout_before_any_read(art, monkeypatch):
    seen = []
    import bitdelta.safetensors_io as sio

    real = sio.read_tensor
    monkeypatch.setattr(sio, "read_tensor", lambda e: (seen.append(e), real(e))[1])

    def refuse(layout):
        assert layout.modules[Q].out_features == 40 and layout.dense[NORM] == (40,)
        assert not seen
        raise BitDeltaError("not for this server")

    with pytest.raises(BitDeltaError, match="not for this server"):
        artifact.load_delta(art, precheck=refuse)
    assert not seen


def test_unlisted_tensors_are_never_read(art, monkeypatch):
    import bitdelta.safetensors_io as sio

    _rewrite(art, lambda t: t.__setitem__("unlisted.extra", torch.zeros(1000)))
    names = []
    real = sio.read_tensor
    monkeypatch.setattr(sio, "read_tensor", lambda e: (names.append(e.shape), real(e))[1])
    delta = bitdelta.Delta.from_pretrained(art)
    assert (1000,) not in names and "unlisted.extra" not in delta.dense


def test_copy_of_a_delta_keeps_validating(pristine, pair):
    # check_delta_values takes magnitudes too (what a server caches)
    delta = copy.deepcopy(bitdelta.Delta.from_pretrained(pristine))
    base = load(pair[0]).requires_grad_(False)
    mags = {n: float(p.abs().max()) for n, p in base.named_parameters()}
    mags.update({n: float(base.get_submodule(n).weight.abs().max()) for n in delta.modules})
    check_delta_values(delta, mags)
    delta.modules[Q].scale.fill_(1e9)
    with pytest.raises(InvalidDeltaError):
        check_delta_values(delta, mags)
