"""One grammar across the `bitdelta` commands: every flag has help, the shared flags (--base, --dtype,
--device, -q, --out/--overwrite, --seq-len) mean the same in every command, former flag names parse into
the new ones and print one note after the command succeeds, -q silences every progress bar, merge draws
one, and building the parser loads neither torch nor transformers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bitdelta.cli as cli
from bitdelta.cli import build_parser, main

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny"
SHAKESPEARE = TINY / "heldout" / "shakespeare.txt"
# the commands that load a base, and those that run long enough to draw progress bars
LOADS_A_BASE = ["compress", "merge", "quantize-base", "import-reference", "generate", "eval ppl", "eval fidelity",
                "eval tasks", "serve"]
LONG = ["compress", "merge", "quantize-base", "import-reference", "generate", "eval ppl", "eval fidelity",
        "eval tasks", "serve"]
WRITES = ["compress", "merge", "quantize-base", "import-reference"]


def commands(parser=None, path=()) -> dict[str, argparse.ArgumentParser]:
    """``"eval ppl"`` -> its parser, for every leaf command of the tree."""
    parser = parser or build_parser()
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, (*path, name)) or {" ".join((*path, name)): sub})
    return found


def flags(parser) -> dict[str, argparse.Action]:
    return dict(parser._option_string_actions)


def test_every_flag_and_argument_has_help():
    missing = []
    for name, parser in {"bitdelta": build_parser(), **commands()}.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.help is None or not str(action.help).strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"flags without help text: {missing}"


def test_the_module_docstring_names_every_command():
    names = {name.split()[0] for name in commands()}
    assert names == {"compress", "inspect", "merge", "quantize-base", "import-reference", "generate", "eval", "serve"}
    for name in commands():
        assert f"bitdelta {name.split()[0]} " in cli.__doc__, name
    assert "ppl|fidelity|tasks" in cli.__doc__


def test_shared_flags_are_declared_alike():
    table = commands()
    for name in LOADS_A_BASE:
        action = flags(table[name])["--base"]
        assert action.option_strings == ["--base"], name
    for name in LONG:
        assert flags(table[name])["-q"] is flags(table[name])["--quiet"], name
    for name in WRITES:
        assert {"--out", "--overwrite"} <= set(flags(table[name])), name
    devices = {name: flags(p)["--device"] for name, p in table.items() if "--device" in flags(p)}
    assert set(devices) >= {"compress", "merge", "generate", "eval ppl", "eval fidelity", "eval tasks", "serve"}
    # one default everywhere: None, which hf.load_model and the engine turn into cuda if available, else cpu
    assert all(a.default is None for a in devices.values()), {n: a.default for n, a in devices.items()}
    dtypes = {name: flags(p)["--dtype"] for name, p in table.items() if "--dtype" in flags(p)}
    assert set(dtypes) >= {"compress", "merge", "generate", "eval ppl", "eval fidelity", "eval tasks", "serve"}
    assert all("load" in a.help or "base weights" in a.help for a in dtypes.values()), dtypes


def test_merge_defaults_to_the_same_device_as_the_other_commands(monkeypatch, tmp_path):
    import bitdelta.hf

    seen = {}

    def fake_load_model(name, dtype=None, device=None, **kwargs):
        seen["device"] = device
        raise bitdelta.errors.BitDeltaError("stop here")

    monkeypatch.setattr(bitdelta.hf, "load_model", fake_load_model)
    monkeypatch.setattr("bitdelta.artifact.load_delta", lambda path: None)
    assert main(["merge", "--base", "b", "--delta", "d", "--out", str(tmp_path / "m")]) == 2
    assert seen["device"] is None  # load_model's default: cuda if available, else cpu


def test_former_names_parse_into_the_new_flags():
    parser = build_parser()
    args = parser.parse_args(["eval", "ppl", "--model", "m", "--data", "d.txt"])
    assert args.base == "m" and args.notes == ["--model is deprecated and will be removed; use --base"]
    args = parser.parse_args(["eval", "tasks", "--base", "m", "--tasks", "piqa", "--data-dir", "d"])
    assert args.base == "m" and not getattr(args, "notes", None)
    args = parser.parse_args(["compress", "--base", "b", "--finetuned", "f", "--out", "o", "--model-dtype", "bf16"])
    assert (args.model_dtype, args.dtype) == ("bf16", None) and "--model-dtype" in args.notes[0]
    assert parser.parse_args(["quantize-base", "B", "--scheme", "fp8", "--out", "o"]).base == "B"
    assert parser.parse_args(["quantize-base", "--base", "B", "--scheme", "fp8", "--out", "o"]).base == "B"
    # one length flag name across commands, the former ones kept
    assert parser.parse_args(["eval", "ppl", "--base", "m", "--data", "d", "--seq-len", "7"]).window == 7
    assert parser.parse_args(["eval", "fidelity", "--base", "m", "--finetuned", "f", "--data", "d",
                              "--max-length", "9"]).seq_len == 9


@pytest.mark.parametrize("argv,message", [
    (["eval", "ppl", "--base", "a", "--model", "b", "--data", "d"], "not allowed with argument --base"),
    (["eval", "ppl", "--data", "d"], "--base is required"),
    (["quantize-base", "--scheme", "fp8", "--out", "o"], "--base is required"),
    (["compress", "--base", "b", "--finetuned", "f", "--out", "o", "--dtype", "bf16", "--model-dtype", "bf16"],
     "not allowed with argument --dtype"),
])
def test_a_flag_and_its_former_name_are_one_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_note_comes_after_the_result_and_not_on_failure(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:400], encoding="utf-8")
    assert main(["eval", "ppl", "--model", str(TINY / "base"), "--data", str(text), "--window", "32",
                 "--device", "cpu", "-q"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ppl"] > 1
    assert err == "note: --model is deprecated and will be removed; use --base\n"
    # a failing command prints its one error line only
    assert main(["eval", "ppl", "--model", str(TINY / "base"), "--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _compress(out, *extra) -> int:
    return main(["compress", "--base", str(TINY / "base"), "--finetuned", str(TINY / "shakespeare"), "--out", str(out),
                 "-q", *extra])


def test_compress_extras_dtype_and_the_dtype_of_one_release(tmp_path, capsys):
    assert _compress(tmp_path / "a", "--extras-dtype", "bfloat16") == 0
    assert "note:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "delta_config.json").read_text())["compression"]["dense_dtype"] == "bfloat16"
    # --dtype, the load dtype, still sets the extras too for now, and says so
    assert _compress(tmp_path / "b", "--dtype", "bfloat16") == 0
    assert "note: compress --dtype is the dtype the models load in" in capsys.readouterr().err
    for f in ("delta.safetensors", "delta_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # both given: each its own meaning
    assert _compress(tmp_path / "c", "--dtype", "bfloat16", "--extras-dtype", "float16") == 0
    assert "note:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "delta_config.json").read_text())["compression"]["dense_dtype"] == "float16"


def test_compress_refuses_an_existing_teacher_cache_without_overwrite(tmp_path, capsys):
    cache = tmp_path / "teacher.bin"
    cache.write_bytes(b"keep")
    assert _compress(tmp_path / "d", "--teacher-cache", str(cache), "--recipe", "default") == 2
    err = capsys.readouterr().err
    assert err == f"error: --teacher-cache {cache} already exists; pass --overwrite to replace it\n"
    assert cache.read_bytes() == b"keep" and not (tmp_path / "d").exists()


def test_merge_draws_a_bar_that_quiet_silences(tmp_path, capsys):
    assert _compress(tmp_path / "d.bitdelta") == 0
    capsys.readouterr()
    assert main(["merge", "--base", str(TINY / "base"), "--delta", str(tmp_path / "d.bitdelta"),
                 "--out", str(tmp_path / "m1")]) == 0
    assert "merge: 100%" in capsys.readouterr().err
    assert main(["merge", "--base", str(TINY / "base"), "--delta", str(tmp_path / "d.bitdelta"),
                 "--out", str(tmp_path / "m2"), "-q"]) == 0
    assert capsys.readouterr().err == ""
    for f in ("config.json", "model.safetensors"):
        assert (tmp_path / "m1" / f).read_bytes() == (tmp_path / "m2" / f).read_bytes()


def test_quiet_silences_the_libraries_bars_for_the_command_only():
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    from bitdelta.cli_options import library_progress_bars

    hf_logging.enable_progress_bar()  # the default; enables the hub's too
    with library_progress_bars(enabled=False):
        assert not hf_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()


def test_building_the_parser_loads_no_torch():
    code = ("import sys; from bitdelta.cli import build_parser; build_parser()\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
