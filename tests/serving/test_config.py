"""EngineConfig: one declaration makes the serve flags, builds the engine and reaches Ray replicas."""

from __future__ import annotations

import dataclasses

from bitdelta.cli import build_parser
from bitdelta.serving.cli import ray_settings
from bitdelta.serving.config import EngineConfig
from bitdelta.serving.ray_serve import RaySettings


def test_every_setting_is_a_serve_flag_with_its_default():
    args = build_parser().parse_args(["serve", "--base", "b"])
    cfg = EngineConfig.from_args(args)
    for f in dataclasses.fields(EngineConfig):
        assert getattr(cfg, f.name) == f.default, f.name
    args = build_parser().parse_args(["serve", "--base", "b", "--max-batch", "3", "--kv-cache-mb", "8",
                                      "--no-cuda-graphs", "--no-engine-restart", "--max-bits", "2"])
    cfg = EngineConfig.from_args(args)
    got = (cfg.max_batch, cfg.kv_cache_mb, cfg.cuda_graphs, cfg.engine_restart, cfg.max_bits)
    assert got == (3, 8.0, False, False, 2)


def test_ray_settings_carry_every_engine_setting(tmp_path):
    args = build_parser().parse_args(["serve", "--ray", "--base", "b", "--delta-store", str(tmp_path),
                                      "--no-cuda-graphs", "--no-engine-restart", "--max-queue", "7"])
    s = ray_settings(args)
    assert s.engine_settings() == EngineConfig.from_args(args)
    assert (s.cuda_graphs, s.engine_restart, s.max_queue) == (False, False, 7)
    # and through the dict a replica is built from (values may arrive as strings from `serve run`)
    back = RaySettings.from_dict({**s.to_dict(), "cuda_graphs": "true", "max_batch": "5"})
    assert back.cuda_graphs is True and back.max_batch == 5 and back.engine_restart is False


def test_base_dtype_defaults_to_the_checkpoints_on_cuda_and_float32_on_cpu(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from bitdelta.hf import load_model
    from bitdelta.serving.runtime import build_runtime

    cfg = EngineConfig()
    assert cfg.load_dtype("cpu") == "float32"
    assert cfg.load_dtype("cuda") is None and cfg.load_dtype("cuda:1") is None  # None: as the checkpoint stores it
    assert EngineConfig(dtype="float16").load_dtype("cuda") == "float16"
    # a bf16 checkpoint: "as stored" really is bf16, and the CPU default still serves it in float32
    from transformers import AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(tiny_models["base"]).save_pretrained(tmp_path / "bf16")
    assert next(load_model(tmp_path / "bf16", dtype=None, device="cpu").parameters()).dtype == torch.bfloat16
    rt = build_runtime(tmp_path / "bf16", {}, device="cpu", kv_cache_mb=16, start=False)
    try:
        assert rt.model.dtype == torch.float32
    finally:
        rt.shutdown()


def test_kv_block_size_reaches_the_engine_and_bad_values_fail_in_one_line(tiny_models, tmp_path, capsys):
    from bitdelta.cli import main
    from bitdelta.serving.runtime import build_runtime

    args = build_parser().parse_args(["serve", "--base", "b", "--kv-block-size", "8"])
    cfg = EngineConfig.from_args(args)
    assert cfg.kv_block_size == 8
    rt = build_runtime(tiny_models["base"], {}, config=cfg, device="cpu", kv_cache_mb=4, start=False)
    try:
        assert rt.engine.kv.block_size == 8 and rt.engine.kv.k.shape[2] == 8
    finally:
        rt.shutdown()
    # the same check for a settings file, before the base loads
    (tmp_path / "s.yaml").write_text("kv_block_size: 48\n")
    capsys.readouterr()
    assert main(["serve", "--base", str(tmp_path / "no-base"), "--config", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kv_block_size: must be a power of two from 1 to 256 (got 48)" in err[0], err
