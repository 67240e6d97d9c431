"""The `bitdelta` command end to end on local model directories (hub ids resolve the same way)."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

from bitdelta.cli import main
from models import load, make_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    base_dir, ft_dir = make_pair("qwen2", tmp, extra_vocab=2)
    # give the fine-tune its own tokenizer files, which must travel with the delta
    (ft_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}",
                                                              "model_max_length": 64}))
    (ft_dir / "special_tokens_map.json").write_text("{}")
    return base_dir, ft_dir


def test_compress_inspect_merge(pair, tmp_path, capsys):
    base_dir, ft_dir = pair
    out = tmp_path / "ft.bitdelta"
    assert main(["compress", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(out),
                 "--scale", "row", "--bits", "2", "--dtype", "bfloat16", "-q"]) == 0
    text = capsys.readouterr().out
    assert "compression" in text and "linear/row/2bit" in text and "added-token rows" in text
    assert (out / "tokenizer_config.json").is_file()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["compression"]["bits"] == 2 and info["compression_factor"] > 0
    assert info["weight_bytes"] < info["finetuned_fp16_bytes"]

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--base", str(base_dir), "--delta", str(out), "--out", str(merged_dir)]) == 0
    # a normal HF directory, loadable by plain transformers, with the fine-tune's tokenizer files
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert (merged_dir / "tokenizer_config.json").read_text() == (ft_dir / "tokenizer_config.json").read_text()
    assert merged.config.vocab_size == load(ft_dir).config.vocab_size
    ids = torch.tensor([[1, 2, 3, 98]])
    with torch.no_grad():
        err = (merged(ids).logits - load(ft_dir)(ids).logits).abs().mean()
        base_logits = load(base_dir)(ids[:, :3]).logits
        base_err = (base_logits - load(ft_dir)(ids[:, :3]).logits[..., :97]).abs().mean()
    assert err < base_err
    # merging again into the same place is refused rather than clobbering it
    assert main(["merge", "--base", str(base_dir), "--delta", str(out), "--out", str(merged_dir)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_code_2(pair, tmp_path, capsys):
    base_dir, ft_dir = pair
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert main(["merge", "--base", str(ft_dir), "--delta", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "m")]) == 2
    bad = tmp_path / "bad.bitdelta"
    main(["compress", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(bad), "-q"])
    capsys.readouterr()
    # a delta merged onto the wrong base names both models
    assert main(["merge", "--base", str(ft_dir), "--delta", str(bad), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert str(base_dir) in err and str(ft_dir) in err and "Traceback" not in err
    assert not (tmp_path / "m2").exists()


@pytest.mark.slow  # a fresh interpreter
def test_entry_point_runs_as_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bitdelta", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "delta_config.json is missing" in r.stderr


@pytest.mark.slow  # distils three scale modes, then chooses per module
def test_compress_with_auto_scales_and_relative_distillation_on_the_bundled_models(tmp_path, capsys):
    """`bitdelta compress --scale auto --distill-steps N --calibration FILE` end to end on the shipped
    tiny base and its Shakespeare fine-tune; the settings and the per-module choice are recorded."""
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "models" / "tiny"
    out = tmp_path / "shakespeare.bitdelta"
    assert main(["compress", "--base", str(tiny / "base"), "--finetuned", str(tiny / "shakespeare"), "--out", str(out),
                 "--scale", "auto", "--distill-steps", "6", "--calibration", str(tiny / "heldout" / "stdlib.txt"),
                 "--distill-lr", "1e-2", "--distill-lr-mode", "relative", "--num-samples", "16", "--seq-len", "32",
                 "--heldout-samples", "8", "--device", "cpu", "-q"]) == 0
    config = json.loads((out / "delta_config.json").read_text())
    d = config["distillation"]
    assert d["steps"] == 6 and d["lr"] == 1e-2 and d["lr_mode"] == "relative" and d["seq_len"] == 32
    assert d["heldout_loss_before"] > 0 and d["kept"] in ("distilled", "initial")
    auto = d["auto"]
    assert auto["row_modules"] + auto["col_modules"] > 0
    assert auto["heldout_loss_chosen"] <= min(auto["heldout_loss_all_row"], auto["heldout_loss_all_col_here"]) + 1e-12
    assert config["compression"]["scale"] == "auto"
    # a mode name that does not exist is refused by the parser, before any model is loaded
    with pytest.raises(SystemExit):
        main(["compress", "--base", str(tiny / "base"), "--finetuned", str(tiny / "shakespeare"), "--out",
              str(tmp_path / "x"), "--distill-steps", "2", "--calibration", str(tiny / "heldout" / "stdlib.txt"),
              "--distill-lr-mode", "sideways"])
    assert not (tmp_path / "x").exists()
