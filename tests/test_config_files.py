"""Settings files on the command line: `compress --config` (YAML or TOML; explicit flags win; unknown keys name
the valid ones), `inspect --settings` printing what `--config` repeats, `--recipe` from bitdelta.recipes, and
`serve --config` filling EngineConfig."""

import json
from pathlib import Path

import pytest

from bitdelta.cli import build_parser, main
from bitdelta.recipes import RECIPES
from bitdelta.serving.config import EngineConfig

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny"
STDLIB = str(TINY / "heldout" / "stdlib.txt")


def _compress(out, *extra) -> int:
    return main(["compress", "--base", str(TINY / "base"), "--finetuned", str(TINY / "gsm8k"), "--out", str(out),
                 "--device", "cpu", "-q", *extra])


def _config(out) -> dict:
    return json.loads((Path(out) / "delta_config.json").read_text())


def test_compress_reads_yaml_and_toml_and_flags_given_win(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("compress:\n  scale: col\n  bits: 2\n  exclude: [lm_head]\n")
    assert _compress(tmp_path / "a", "--config", str(tmp_path / "s.yaml")) == 0
    comp = _config(tmp_path / "a")["compression"]
    assert (comp["scale"], comp["bits"], comp["exclude"]) == ("col", 2, ["lm_head"])
    # --bits 1 is the flag's default value, but given explicitly it still beats the file
    (tmp_path / "s.toml").write_text('[compress]\nscale = "row"\nbits = 2\n')
    assert _compress(tmp_path / "b", "--config", str(tmp_path / "s.toml"), "--bits", "1") == 0
    comp = _config(tmp_path / "b")["compression"]
    assert (comp["scale"], comp["bits"]) == ("row", 1)
    assert _config(tmp_path / "b")["modules"]["model.layers.0.mlp.up_proj"]["scale"] == "row"
    capsys.readouterr()


def test_unknown_keys_and_bad_values_are_one_line_errors_before_any_work(tmp_path, capsys):
    cases = [("recipe: default\ncompres:\n  bits: 2\n", "unknown key compres; valid keys: recipe, compress, distill"),
             ("compress:\n  bitz: 2\n  scael: row\n",
              "compress: unknown keys bitz, scael; valid keys: scale, bits, target, exclude"),
             ("distill:\n  stepz: 2\n", "distill: unknown key stepz; valid keys: steps, lr, lr_mode"),
             ("compress:\n  bits: 9\n", "bits must be an integer from 1 to 8"),
             ("recipe: fastest\n", "unknown recipe 'fastest'; choose one of default, paper")]
    for i, (text, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        assert _compress(tmp_path / f"o{i}", "--config", str(path)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / f"o{i}").exists()
    assert _compress(tmp_path / "o", "--config", str(tmp_path / "missing.yaml")) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_inspect_settings_repeat_the_same_artifact(tmp_path, capsys):
    assert _compress(tmp_path / "a", "--scale", "row", "--bits", "2", "--exclude", "model.layers.0.*",
                     "--dtype", "bfloat16") == 0
    out = capsys.readouterr().out
    assert "settings (bitdelta compress --config FILE repeats them" in out and "    scale: row" in out
    assert main(["inspect", str(tmp_path / "a"), "--settings"]) == 0
    settings = capsys.readouterr().out
    assert settings.startswith("compress:\n  scale: row\n  bits: 2\n") and "distill" not in settings
    (tmp_path / "a.yaml").write_text(settings)
    assert _compress(tmp_path / "b", "--config", str(tmp_path / "a.yaml")) == 0
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_a_distilled_delta_repeats_from_its_settings(tmp_path, capsys):
    assert _compress(tmp_path / "a", "--recipe", "paper", "--calibration", STDLIB, "--distill-steps", "2",
                     "--num-samples", "4", "--seq-len", "16", "--distill-lr", "1e-3") == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "a"), "--settings"]) == 0
    settings = capsys.readouterr().out
    assert settings.startswith("recipe: paper\ncompress:\n") and "  lr: 0.001\n" in settings
    assert f"  calibration: {STDLIB}\n" in settings and "  lr_mode: absolute\n" in settings
    (tmp_path / "a.yaml").write_text(settings)
    assert _compress(tmp_path / "b", "--config", str(tmp_path / "a.yaml")) == 0
    assert (tmp_path / "a" / "delta.safetensors").read_bytes() == (tmp_path / "b" / "delta.safetensors").read_bytes()
    a, b = _config(tmp_path / "a"), _config(tmp_path / "b")
    for cfg in (a, b):
        cfg["distillation"].pop("seconds")  # the only thing a repeat may change: how long it took
    assert a == b and a["distillation"]["recipe"] == "paper" and a["distillation"]["steps"] == 2


def test_recipe_choices_come_from_the_recipes(tmp_path, capsys):
    parser = build_parser()
    for name in RECIPES:
        assert parser.parse_args(["compress", "--base", "b", "--finetuned", "f", "--out", "o", "--recipe",
                                  name]).recipe == name
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "--base", "b", "--finetuned", "f", "--out", "o", "--recipe", "fast"])
    assert "auto-2bit" in capsys.readouterr().err
    # a recipe's compression settings apply unless a flag is given: --recipe row makes row scales
    assert _compress(tmp_path / "r", "--recipe", "row", "--calibration", STDLIB, "--distill-steps", "1",
                     "--num-samples", "2", "--seq-len", "8", "--heldout-samples", "1") == 0
    cfg = _config(tmp_path / "r")
    assert cfg["compression"]["scale"] == "row" and cfg["distillation"]["recipe"] == "row"
    assert cfg["distillation"]["lr_mode"] == "relative"


@pytest.fixture()
def serve_args(monkeypatch):
    """Runs `bitdelta serve` up to building the app and returns the EngineConfig it would build with."""
    import bitdelta.serving.cli as serve_cli
    from bitdelta.errors import BitDeltaError

    seen = {}

    def build_app(args):
        seen["config"] = EngineConfig.from_args(args)
        raise BitDeltaError("stopped before loading the base")

    monkeypatch.setattr(serve_cli, "build_app", build_app)

    def run(*argv):
        code = main(["serve", "--base", str(TINY / "base"), "--port", "0", *argv])
        return code, seen.pop("config", None)

    return run


def test_serve_config_fills_engine_config_and_flags_win(tmp_path, serve_args, capsys):
    (tmp_path / "engine.yaml").write_text("max_batch: 8\nkv_cache_mb: 16\ncuda_graphs: false\ndevice: cpu\n")
    code, cfg = serve_args("--config", str(tmp_path / "engine.yaml"))
    assert code == 2 and (cfg.max_batch, cfg.kv_cache_mb, cfg.cuda_graphs, cfg.device) == (8, 16.0, False, "cpu")
    assert cfg.max_queue == EngineConfig().max_queue  # not in the file: the default
    (tmp_path / "engine.toml").write_text("max_batch = 8\nmax_queue = 9\n")
    code, cfg = serve_args("--config", str(tmp_path / "engine.toml"), "--max-batch", "64")  # 64 is also the default
    assert (cfg.max_batch, cfg.max_queue) == (64, 9)
    capsys.readouterr()


def test_serve_config_unknown_keys_and_bad_values(tmp_path, serve_args, capsys):
    (tmp_path / "a.yaml").write_text("max_batchs: 8\nport: 1\n")
    code, cfg = serve_args("--config", str(tmp_path / "a.yaml"))
    err = capsys.readouterr().err
    assert code == 2 and cfg is None
    assert "unknown keys max_batchs, port; valid keys: max_gpu_deltas, max_cpu_deltas" in err
    (tmp_path / "b.yaml").write_text("max_batch: 0\n")
    assert serve_args("--config", str(tmp_path / "b.yaml"))[0] == 2
    assert "b.yaml: max_batch: must be an integer >= 1 (got 0)" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("cuda_graphs: maybe\n")
    assert serve_args("--config", str(tmp_path / "c.yaml"))[0] == 2
    assert "cuda_graphs: must be true or false" in capsys.readouterr().err
