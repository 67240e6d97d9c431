"""Typed settings: ScaleMode and its one shape table, CompressConfig/DistillConfig (checks, round trips through
settings files, overrides, unknown keys), named recipes, DeltaInfo (the delta_config.json metadata, migrations
by format_version), copies of Delta/PackedModule and the apply/distill aliasing contract."""

import dataclasses
import json
import logging

import pytest
import torch

import bitdelta
from bitdelta import artifact_info
from bitdelta.apply import applied_holders
from bitdelta.artifact_info import FORMAT_VERSION, DeltaInfo, migrate
from bitdelta.configs import CompressConfig, DistillConfig, build, fill, read_settings_file, settings_yaml, to_plain
from bitdelta.errors import ConfigError, FormatError
from bitdelta.recipes import RECIPES, Recipe, get_recipe
from bitdelta.scale_modes import MATRIX_MODES, ScaleMode, scale_shape
from models import load, make_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("configs"))


# ---------------------------------------------------------------------------------- ScaleMode


def test_scale_mode_is_its_string_and_has_one_shape_table():
    assert ScaleMode("row") is ScaleMode.ROW and ScaleMode.ROW == "row" and {"row": 1}[ScaleMode.ROW] == 1
    assert f"{ScaleMode.COL}/{ScaleMode.SCALAR}" == "col/scalar" and json.dumps([ScaleMode.AUTO]) == '["auto"]'
    assert [scale_shape(m, 5, 7, 2) for m in MATRIX_MODES] == [(2,), (2, 5), (2, 7)]
    assert [m.code for m in MATRIX_MODES] == [0, 1, 2]
    with pytest.raises(ValueError, match="scale mode must be one of"):
        scale_shape("auto", 5, 7, 1)
    with pytest.raises(ValueError, match="chosen per matrix"):
        _ = ScaleMode.AUTO.code
    # every module of a compressed delta holds its mode as a ScaleMode with the table's scale shape
    m = bitdelta.PackedModule("linear", "col", torch.zeros(2, 5, 1, dtype=torch.uint8), torch.ones(2, 7), 7)
    assert m.mode is ScaleMode.COL
    m.validate("m")
    with pytest.raises(bitdelta.FormatError, match=r"col scale must have shape \(2, 7\)"):
        m.copy(scale=torch.ones(2, 5)).validate("m")


# ---------------------------------------------------------------------------------- configs


def test_config_fields_are_checked_when_made():
    assert CompressConfig(scale="row").scale is ScaleMode.ROW
    assert CompressConfig(target="a,b,").target == ("a", "b") and CompressConfig(exclude=["x"]).exclude == ("x",)
    assert CompressConfig(dtype=torch.bfloat16).dtype == "bfloat16"
    assert DistillConfig(lr="3e-2").lr == 0.03  # YAML reads 3e-2 (no dot) as a string
    for bad, field in [(dict(scale="diag"), "scale"), (dict(bits=9), "bits"), (dict(bits=True), "bits"),
                       (dict(base_quant="int4"), "base_quant"), (dict(dense_embeddings="yes"), "dense_embeddings")]:
        with pytest.raises(ConfigError, match=field):
            CompressConfig(**bad)
    for bad, field in [(dict(steps=0), "steps"), (dict(lr=-1), "lr"), (dict(lr_mode="sideways"), "lr mode"),
                       (dict(loss="l1"), "loss"), (dict(heldout=-1), "heldout"), (dict(seed=1.5), "seed")]:
        with pytest.raises(ConfigError, match=field):
            DistillConfig(**bad)
    assert issubclass(ConfigError, bitdelta.BitDeltaError)


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_configs_round_trip_through_settings_files(tmp_path, suffix):
    compress = CompressConfig(scale="col", bits=2, exclude=("lm_head", "model.layers.0.*"), dtype="float16")
    distill = DistillConfig(steps=7, lr=3e-2, lr_mode="relative", loss="kl", calibration="self", heldout=4)
    data = {"recipe": "row", "compress": to_plain(compress), "distill": to_plain(distill)}
    path = tmp_path / f"s{suffix}"
    if suffix == ".yaml":
        path.write_text(settings_yaml(data))
    else:
        lines = ['recipe = "row"']
        for section in ("compress", "distill"):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in data[section].items() if v is not None]
        path.write_text("\n".join(lines) + "\n")
    back = read_settings_file(path)
    assert back["recipe"] == "row"
    assert build(CompressConfig, back["compress"], "compress") == compress
    assert build(DistillConfig, back["distill"], "distill") == distill


def test_overrides_and_unknown_keys(tmp_path):
    start = get_recipe("paper").distill
    over = fill(start, {"steps": 50, "lr": 1e-3}, "distill")
    assert (over.steps, over.lr, over.lr_mode) == (50, 1e-3, "absolute") and start.steps == 200  # a copy
    with pytest.raises(ConfigError) as e:
        fill(start, {"stepz": 1, "lrr": 2}, "distill")
    assert "unknown keys lrr, stepz" in str(e.value) and "valid keys: steps, lr, lr_mode" in str(e.value)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.toml"):
        read_settings_file(tmp_path / "x.json")
    (tmp_path / "bad.yaml").write_text("compress: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_settings_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_settings_file(tmp_path / "list.yaml")


# ---------------------------------------------------------------------------------- recipes


def test_recipes_are_named_pairs_of_configs():
    assert list(RECIPES) == ["default", "paper", "row", "col", "auto", "auto-2bit", "reference"]
    for name, r in RECIPES.items():
        assert isinstance(r, Recipe) and r.name == name and r.description and "\n" not in r.description
        assert isinstance(r.compress, CompressConfig) and isinstance(r.distill, DistillConfig)
    default, paper = get_recipe("default"), get_recipe("paper")
    assert (default.distill.lr, default.distill.lr_mode, default.distill.calibration) == (3e-2, "relative", "self")
    assert (paper.distill.lr, paper.distill.lr_mode, paper.distill.calibration) == (1e-4, "absolute", None)
    assert [get_recipe(n).compress.scale for n in ("row", "col", "auto")] == ["row", "col", "auto"]
    assert all(get_recipe(n).distill == default.distill for n in ("row", "col", "auto", "auto-2bit"))
    assert get_recipe("auto-2bit").compress == CompressConfig(scale="auto", bits=2)
    ref = get_recipe("reference")
    assert ref.compress.dense_embeddings and ref.compress.dtype == "float16" and ref.distill.train_dense
    assert dataclasses.replace(ref.distill, train_dense=False) == paper.distill
    with pytest.raises(ConfigError, match="unknown recipe 'fast'; choose one of default, paper, row"):
        get_recipe("fast")
    # the flat view the pipeline has always offered agrees with the recipes
    from bitdelta.pipeline import recipe_settings

    assert recipe_settings("auto-2bit")["scale"] == "auto" and recipe_settings("col", lr=1.0)["lr"] == 1.0


# ---------------------------------------------------------------------------------- DeltaInfo


def test_delta_info_types_the_metadata_and_reads_like_a_dict():
    info = DeltaInfo.from_dict({"base_model_name_or_path": "b", "distillation": None, "vocab_size": 5})
    assert info.base_model_name_or_path == "b" and info["vocab_size"] == 5 and info.get("model_type", "?") == "?"
    assert info.to_dict() == {"base_model_name_or_path": "b", "distillation": None, "vocab_size": 5}  # unset: absent
    assert dict(info) == info.to_dict() and info == info.to_dict() and len(info) == 3
    info["compression"] = {"scale": "row"}
    info.setdefault("distillation", {})  # set (to None): left as it is, as a dict would
    assert info.compression == {"scale": "row"} and info.distillation is None
    with pytest.raises(KeyError, match="valid keys"):
        info["comprssion"] = {}
    with pytest.raises(KeyError, match="not delta_config.json keys: bogus"):
        DeltaInfo.from_dict({"bogus": 1})
    # the artifact path is an attribute, never a key of the file
    info.artifact_path = "/x/ft.bitdelta"
    assert "artifact_path" not in info.to_dict() and "artifact_path" not in list(info)
    assert info.get("artifact_path") == "/x/ft.bitdelta"  # the old dict's name still reads it
    copy = info.copy()
    copy.compression["scale"] = "col"
    assert info.compression["scale"] == "row" and copy.artifact_path == info.artifact_path


def test_loaded_info_has_the_path_as_attribute_and_saves_byte_identical(pair, tmp_path):
    base_dir, ft_dir = pair
    bitdelta.compress(base_dir, ft_dir, scale="row", bits=2, progress=False).save_pretrained(tmp_path / "a")
    loaded = bitdelta.Delta.from_pretrained(tmp_path / "a")
    assert loaded.artifact_path == str(tmp_path / "a") and isinstance(loaded.info, DeltaInfo)
    cfg = json.loads((tmp_path / "a" / "delta_config.json").read_text())
    assert "artifact_path" not in cfg and loaded.info.to_dict() == {k: cfg[k] for k in DeltaInfo.schema_keys()
                                                                    if k in cfg}
    loaded.save_pretrained(tmp_path / "b")
    for f in ("delta_config.json", "delta.safetensors", "README.md"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.parametrize("version", range(1, FORMAT_VERSION + 1))
def test_every_format_version_up_to_this_one_reads(pair, tmp_path, version):
    base_dir, ft_dir = pair
    out = tmp_path / "a"
    bitdelta.compress(base_dir, ft_dir, progress=False).save_pretrained(out)
    cfg = json.loads((out / "delta_config.json").read_text())
    cfg["format_version"] = version
    (out / "delta_config.json").write_text(json.dumps(cfg))
    info = bitdelta.Delta.from_pretrained(out).info
    assert info.base_model_name_or_path == cfg["base_model_name_or_path"]


def test_migrations_run_in_order_from_each_older_version(monkeypatch, caplog):
    # The format is at version 1, the first: the chain is exercised on versions a future format adds.
    monkeypatch.setattr(artifact_info, "FORMAT_VERSION", 3)
    monkeypatch.setattr(artifact_info, "MIGRATIONS", {
        1: lambda c: {**{k: v for k, v in c.items() if k != "old_model_type"}, "model_type": c["old_model_type"]},
        2: lambda c: {**c, "vocab_size": c["vocab_size"] * 2},
    })
    v1 = {"format_version": 1, "old_model_type": "llama", "vocab_size": 5}
    with caplog.at_level(logging.INFO, logger="bitdelta.artifact_info"):
        info = DeltaInfo.from_dict(v1)
    assert (info.model_type, info.vocab_size) == ("llama", 10) and "old_model_type" in v1  # input left as it was
    assert "from format_version 1 to 2" in caplog.text and "from format_version 2 to 3" in caplog.text
    assert DeltaInfo.from_dict({"format_version": 2, "model_type": "qwen2", "vocab_size": 5}).vocab_size == 10
    assert migrate({"format_version": 3, "vocab_size": 5})["vocab_size"] == 5
    with pytest.raises(FormatError, match="upgrade"):
        migrate({"format_version": 4})
    monkeypatch.setattr(artifact_info, "MIGRATIONS", {})
    with pytest.raises(FormatError, match="no migration to 2"):
        migrate({"format_version": 1})


# ---------------------------------------------------------------------------------- copies and aliasing


def test_copies_share_tensors_not_containers(pair):
    base_dir, ft_dir = pair
    delta = bitdelta.compress(base_dir, ft_dir, CompressConfig(scale="row"), progress=False)
    twin = delta.copy()
    name = next(iter(delta.modules))
    assert twin.modules is not delta.modules and twin.info is not delta.info and twin.fingerprint is delta.fingerprint
    assert twin.modules[name] is delta.modules[name]
    twin.modules[name] = twin.modules[name].copy(scale=delta.modules[name].scale * 2)
    twin.info["distillation"] = {"steps": 1}
    assert torch.equal(delta.modules[name].scale * 2, twin.modules[name].scale) and delta.info["distillation"] is None
    assert twin.modules[name].sign is delta.modules[name].sign
    assert delta.modules[name].to("cpu") is delta.modules[name]  # already there: no copy
    # the third argument was the scale before configs: a string there still is
    assert {m.mode for m in bitdelta.compress(base_dir, ft_dir, "col", progress=False).modules.values()
            if not m.vocab} == {"col"}
    with pytest.raises(TypeError, match="CompressConfig"):
        bitdelta.compress(base_dir, ft_dir, 2, progress=False)


def test_apply_shares_the_deltas_modules_which_distillation_trains(pair):
    """The contract between apply and distill_scales: on the model's device, apply installs the delta's own
    PackedModule objects, so scales trained through the model are the returned delta's."""
    base_dir, ft_dir = pair
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", progress=False)
    model = load(base_dir)
    bitdelta.apply(model, delta)
    try:
        holders = applied_holders(model)
        assert holders and all(h.packed is delta.modules[n] for n, h in holders.items())
    finally:
        bitdelta.unapply(model)
    from bitdelta.calibration import TokenBatches
    from bitdelta.distill import distill_scales

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (8, 12), generator=g)
    before = {n: m.scale.clone() for n, m in delta.modules.items()}
    out = distill_scales(delta, model, load(ft_dir), TokenBatches(ids, torch.ones_like(ids)),
                         DistillConfig(steps=3, lr=1e-2, lr_mode="relative"), progress=False)
    assert all(torch.equal(delta.modules[n].scale, s) for n, s in before.items())  # the input is untouched
    assert any(not torch.equal(out.modules[n].scale, s) for n, s in before.items())  # training reached the copy
    assert out.info["distillation"]["steps"] == 3 and out.info["distillation"]["lr_mode"] == "relative"
