"""Artifact round trip, sharding, atomic writes, and clear errors for every kind of bad file."""

import json
import os

import pytest
import torch

import bitdelta
from bitdelta import artifact
from bitdelta.errors import FormatError, ShapeMismatchError, WrongBaseError
from models import load, make_model, make_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")
    return make_pair("llama", tmp)


@pytest.fixture()
def saved(pair, tmp_path):
    base_dir, ft_dir = pair
    delta = bitdelta.compress(base_dir, ft_dir, scale="col", bits=2, progress=False)
    out = tmp_path / "ft.bitdelta"
    delta.save_pretrained(out)
    return delta, out


def _assert_same(a, b):
    assert a.modules.keys() == b.modules.keys() and a.dense.keys() == b.dense.keys()
    for k, m in a.modules.items():
        n = b.modules[k]
        assert (m.kind, m.mode, m.bits, m.in_features, m.vocab) == (n.kind, n.mode, n.bits, n.in_features, n.vocab)
        assert torch.equal(m.sign, n.sign) and torch.equal(m.scale, n.scale)
    for k in a.dense:
        assert torch.equal(a.dense[k], b.dense[k])
    assert a.fingerprint.sha256 == b.fingerprint.sha256


def test_round_trip_and_config_contents(saved):
    delta, out = saved
    loaded = bitdelta.Delta.from_pretrained(out)
    _assert_same(delta, loaded)
    cfg = json.loads((out / "delta_config.json").read_text())
    assert cfg["format"] == "bitdelta" and cfg["format_version"] == 1
    assert cfg["packing"]["bit_order"] == "little" and cfg["packing"]["axis"] == "in_features"
    assert cfg["base_fingerprint"]["sha256"] == delta.fingerprint.sha256
    q = cfg["modules"]["model.layers.0.self_attn.q_proj"]
    assert q == {"kind": "linear", "scale": "col", "bits": 2, "shape": [40, 40]}
    assert cfg["modules"]["model.embed_tokens"]["scale"] == "row"
    assert cfg["tied_parameters"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "model.norm.weight" in cfg["dense_parameters"]
    assert (out / "README.md").read_text().startswith("---")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary directories left"


def test_writes_are_deterministic(pair, tmp_path):
    base_dir, ft_dir = pair
    for name in ("a", "b"):
        bitdelta.compress(base_dir, ft_dir, progress=False).save_pretrained(tmp_path / name)
    for f in ("delta.safetensors", "delta_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_sharded_when_over_threshold(saved, tmp_path):
    delta, _ = saved
    out = tmp_path / "sharded"
    delta.save_pretrained(out, max_shard_size=2000)
    shards = sorted(out.glob("delta-*.safetensors"))
    assert len(shards) > 2 and (out / "delta.safetensors.index.json").is_file()
    assert not (out / "delta.safetensors").exists()
    _assert_same(delta, bitdelta.Delta.from_pretrained(out))
    shards[1].unlink()
    with pytest.raises(FormatError, match="missing"):
        bitdelta.Delta.from_pretrained(out)


def test_crash_during_save_leaves_old_artifact_intact(saved, monkeypatch):
    delta, out = saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "write_sharded", boom)
    with pytest.raises(OSError, match="disk full"):
        delta.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    bitdelta.Delta.from_pretrained(out)


def test_refuses_to_overwrite_a_non_artifact_directory(saved, tmp_path):
    delta, _ = saved
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a bitdelta artifact"):
        delta.save_pretrained(precious)
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_truncated_weights_file(saved):
    _, out = saved
    f = out / "delta.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        bitdelta.Delta.from_pretrained(out)
    f.write_bytes(data[:5])
    with pytest.raises(FormatError, match="truncated"):
        bitdelta.Delta.from_pretrained(out)


def test_corrupt_header_and_config(saved):
    _, out = saved
    f = out / "delta.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupt"):
        bitdelta.Delta.from_pretrained(out)
    (out / "delta_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        bitdelta.Delta.from_pretrained(out)


def test_corrupt_weights_detected_by_fingerprint_hash(saved):
    _, out = saved
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "delta.safetensors")
    tensors[artifact.FINGERPRINT_KEY][0, 0] += 1.0
    save_file(tensors, out / "delta.safetensors", {"format": "pt"})
    with pytest.raises(FormatError, match="fingerprint"):
        bitdelta.Delta.from_pretrained(out)


def test_newer_format_version_says_upgrade(saved):
    _, out = saved
    cfg = json.loads((out / "delta_config.json").read_text())
    cfg["format_version"] = 99
    (out / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="upgrade"):
        bitdelta.Delta.from_pretrained(out)


def test_unknown_keys_warn_and_are_dropped(saved):
    _, out = saved
    cfg = json.loads((out / "delta_config.json").read_text())
    cfg["from_the_future"] = 1
    (out / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="from_the_future"):
        delta = bitdelta.Delta.from_pretrained(out)
    assert "from_the_future" not in delta.info


def test_shape_mismatch_inside_artifact(saved):
    _, out = saved
    cfg = json.loads((out / "delta_config.json").read_text())
    cfg["modules"]["model.layers.0.mlp.up_proj"]["shape"] = [56, 48]
    (out / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="up_proj"):
        bitdelta.Delta.from_pretrained(out)


def test_missing_config_and_missing_dir(tmp_path):
    with pytest.raises(FormatError):
        bitdelta.Delta.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="delta_config.json is missing"):
        bitdelta.Delta.from_pretrained(tmp_path / "empty")


def test_wrong_base_is_a_clear_error_naming_both(saved, pair, tmp_path):
    _, out = saved
    base_dir, ft_dir = pair
    delta = bitdelta.Delta.from_pretrained(out)
    other = make_model("llama", seed=123)
    other.config._name_or_path = "some-other-llama"
    with pytest.raises(WrongBaseError) as e:
        bitdelta.apply(other, delta)
    assert "some-other-llama" in str(e.value) and str(base_dir) in str(e.value)
    # the fine-tune itself is not the base either
    with pytest.raises(WrongBaseError):
        bitdelta.merge(load(ft_dir), delta)
    # nothing was modified by the failed merge
    ft = load(ft_dir)
    assert all(torch.equal(a, b) for a, b in zip(ft.state_dict().values(), load(ft_dir).state_dict().values()))


def test_shape_mismatch_base_is_a_clear_error(saved, tmp_path):
    _, out = saved
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64)
    with pytest.raises(ShapeMismatchError, match="intermediate|mlp|56x40|40x56"):
        bitdelta.apply(transformers.LlamaForCausalLM(cfg), bitdelta.Delta.from_pretrained(out))


def test_base_in_another_dtype_still_matches(saved, pair):
    _, out = saved
    base_dir, _ = pair
    model = load(base_dir).to(torch.bfloat16)
    bitdelta.verify_base(model, bitdelta.Delta.from_pretrained(out))


def test_compress_rejects_mismatched_pairs(tmp_path):
    base_dir, _ = make_pair("llama", tmp_path)
    _, other_ft = make_pair("gpt2", tmp_path)
    with pytest.raises(bitdelta.BitDeltaError, match="same base architecture"):
        bitdelta.compress(base_dir, other_ft, progress=False)
    bigger = make_model("llama")
    import transformers

    cfg = bigger.config
    cfg.intermediate_size = 64
    big = transformers.LlamaForCausalLM(cfg)
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(ShapeMismatchError, match="must come from this base"):
        bitdelta.compress(base_dir, tmp_path / "big", progress=False)
    with pytest.raises(bitdelta.BitDeltaError, match="auto"):
        bitdelta.compress(base_dir, base_dir, scale="auto", progress=False)


def test_pickled_checkpoints_are_refused_with_advice(tmp_path):
    base_dir, ft_dir = make_pair("llama", tmp_path)
    os.remove(ft_dir / "model.safetensors")
    torch.save({}, ft_dir / "pytorch_model.bin")
    with pytest.raises(FormatError, match="safe_serialization"):
        bitdelta.compress(base_dir, ft_dir, progress=False)
