"""Named distillation recipes: 'default' (relative lr) and 'paper' (the BitDelta paper exactly), flags
over recipes, the recipe and the calibration recorded in the artifact, `--calibration self` end to end."""

import json
from pathlib import Path

import pytest

from bitdelta.cli import main
from bitdelta.errors import BitDeltaError
from bitdelta.pipeline import RECIPES, recipe_settings

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny"


def test_recipe_values_and_overrides():
    paper = recipe_settings("paper")
    assert (paper["lr"], paper["lr_mode"], paper["loss"], paper["scale"], paper["steps"]) == (1e-4, "absolute", "mse",
                                                                                            "scalar", 200)
    assert (paper["batch_size"], paper["num_samples"], paper["seq_len"]) == (4, 800, 128)
    default = recipe_settings()
    assert (default["lr"], default["lr_mode"], default["calibration"]) == (3e-2, "relative", "self")
    assert recipe_settings("paper", lr=5e-4, scale=None)["lr"] == 5e-4  # given values win, None leaves the recipe's
    assert recipe_settings("paper", scale=None)["scale"] == "scalar"
    assert RECIPES["paper"]["lr"] == 1e-4  # overriding never edits the recipe itself
    with pytest.raises(BitDeltaError, match="unknown recipe"):
        recipe_settings("fast")


def _compress(tmp_path, name, *extra):
    out = tmp_path / name
    argv = ["compress", "--base", str(TINY / "base"), "--finetuned", str(TINY / "gsm8k"), "--out", str(out),
            "--num-samples", "4", "--seq-len", "16", "--heldout-samples", "2", "--device", "cpu", "-q", *extra]
    assert main(argv) == 0
    return json.loads((out / "delta_config.json").read_text())["distillation"]


def test_cli_recipes_and_self_calibration(tmp_path, capsys):
    stdlib = str(TINY / "heldout" / "stdlib.txt")
    # naming the paper's recipe distils with its settings; an explicit flag still wins
    paper = _compress(tmp_path, "paper", "--recipe", "paper", "--calibration", stdlib, "--distill-steps", "2")
    assert (paper["recipe"], paper["lr"], paper["lr_mode"], paper["loss"], paper["calibration"]) == (
        "paper", 1e-4, "absolute", "mse", "file")
    # no recipe named: the default recipe's relative lr
    default = _compress(tmp_path, "default", "--calibration", stdlib, "--distill-steps", "2")
    assert (default["recipe"], default["lr"], default["lr_mode"]) == ("default", 3e-2, "relative")
    # self-calibration: no data given; the fine-tune writes its own calibration samples
    own = _compress(tmp_path, "self", "--calibration", "self", "--distill-steps", "2", "--distill-lr", "1e-2")
    assert own["calibration"] == "self" and own["self_prompts"] == "built-in" and own["lr"] == 1e-2
    assert own["dataset"] == "self (built-in prompts)" and own["heldout_loss_before"] > 0
    # the default recipe named without --calibration: self-calibration, prompts from a file's first sentences
    implicit = _compress(tmp_path, "implicit", "--recipe", "default", "--distill-steps", "1", "--self-prompts", stdlib)
    assert implicit["calibration"] == "self" and implicit["self_prompts"] == stdlib
    assert implicit["dataset"] == f"self (prompts: first sentences of {stdlib})"
    capsys.readouterr()
    # the paper's recipe distils on text the user gives: without --calibration it is a user error
    assert main(["compress", "--base", str(TINY / "base"), "--finetuned", str(TINY / "gsm8k"), "--out",
                 str(tmp_path / "p"), "--recipe", "paper"]) == 2
    assert "--recipe paper distils on calibration text you give" in capsys.readouterr().err
    # no recipe named and no calibration: the user is asked which text to use
    assert main(["compress", "--base", str(TINY / "base"), "--finetuned", str(TINY / "gsm8k"), "--out",
                 str(tmp_path / "p"), "--distill-steps", "3"]) == 2
    assert "--calibration self (or --recipe default)" in capsys.readouterr().err
    # --self-prompts without --calibration self is a user error, before any model loads
    assert main(["compress", "--base", str(TINY / "base"), "--finetuned", str(TINY / "gsm8k"), "--out",
                 str(tmp_path / "x"), "--calibration", stdlib, "--self-prompts", stdlib, "--distill-steps", "1"]) == 2
    assert "--self-prompts is for --calibration self" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
