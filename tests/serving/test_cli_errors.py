"""CLI misuse: every user error is one ``error: ...`` line with exit code 2 and no traceback, found
before any work starts; a bug is one ``error: internal error: ...`` line with exit code 1; ``-v``
shows the traceback. Also: ``compress`` refuses an existing ``--out`` without ``--overwrite``, and a
bad artifact in ``serve --delta-dir`` is logged and skipped while the good ones are served.

Runs in-process through ``bitdelta.cli.main`` (and twice as a real ``python -m bitdelta`` process)
on the bundled tiny models (tests/serving/conftest.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitdelta.cli import build_parser, main
from bitdelta.errors import BitDeltaError


def one_error_line(err: str) -> str:
    """The single line of ``err``; fails unless stderr is exactly one ``error: ...`` line, no traceback."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def run_main(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def user_error(capsys, argv, *fragments) -> str:
    rc, err = run_main(capsys, argv)
    line = one_error_line(err)
    assert rc == 2, err
    assert "internal error" not in line
    for f in fragments:
        assert f in line, line
    return line


def argparse_error(capsys, argv, option: str) -> str:
    """argparse misuse: exit 2 while parsing, usage lines then one error line naming ``option``."""
    capsys.readouterr()
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines[0].startswith("usage: bitdelta")
    assert all(line.startswith(" ") for line in lines[1:-1]), err  # the rest of the usage block
    assert ": error: argument " + option in lines[-1], err
    assert elapsed < 5, f"rejecting {option} took {elapsed:.1f}s: it must not load anything"
    return lines[-1]


@pytest.fixture
def no_work(monkeypatch):
    """Loading or compressing a model fails the test: the command must stop before any work."""

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded although the arguments are wrong")  # exit 1, not 2

    import transformers
    import uvicorn

    # modules that bind these functions at import time are imported first, so that they keep the
    # real ones once the patches are undone
    for module in ("bitdelta.pipeline", "bitdelta.reference_import", "bitdelta.evaluate", "bitdelta.serving.ray_serve"):
        importlib.import_module(module)
    # modules by name: the package exports a function called ``compress`` too
    for module, name in (("bitdelta.compress", "compress"), ("bitdelta.hf", "load_model"),
                         ("bitdelta.serving.runtime", "build_runtime")):
        monkeypatch.setattr(importlib.import_module(module), name, forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(uvicorn, "run", forbidden)


@pytest.fixture
def quiet_loading():
    """No transformers progress bars on stderr, which must hold only the error line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def artifact(tiny_models, tmp_path_factory) -> Path:
    """A small good artifact of the bundled Shakespeare fine-tune (scalar scales)."""
    out = tmp_path_factory.mktemp("cli-errors") / "shakespeare.bitdelta"
    assert main(["compress", "--base", str(tiny_models["base"]), "--finetuned", str(tiny_models["shakespeare"]),
                 "--out", str(out), "-q"]) == 0
    return out


def broken_copy(artifact: Path, dest: Path, modules) -> Path:
    shutil.copytree(artifact, dest)
    cfg = json.loads((dest / "delta_config.json").read_text())
    cfg["modules"] = modules
    (dest / "delta_config.json").write_text(json.dumps(cfg))
    return dest


def truncated_copy(artifact: Path, dest: Path) -> Path:
    shutil.copytree(artifact, dest)
    for f in dest.glob("*.safetensors"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    return dest


# ---------------------------------------------------------------------------------- argument parsing

BASE = "/nonexistent/base"  # never reached: parsing must fail first

BAD_ARGUMENTS = [
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--bits", "0"], "--bits"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--bits", "9"], "--bits"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--bits", "two"], "--bits"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--max-shard-size", "abc"], "--max-shard-size"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--max-shard-size", "1.2.3GB"],
     "--max-shard-size"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--max-shard-size", "0"], "--max-shard-size"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--dtype", "int8"], "--dtype"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--dtype", "float33"], "--dtype"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--model-dtype", "bf17"], "--model-dtype"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--device", "gpu0"], "--device"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--distill-steps", "-1"], "--distill-steps"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--num-samples", "0"], "--num-samples"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--seq-len", "0"], "--seq-len"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--distill-batch-size", "0"],
     "--distill-batch-size"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--distill-lr", "0"], "--distill-lr"),
    (["compress", "--base", BASE, "--finetuned", BASE, "--out", "o", "--distill-lr", "nan"], "--distill-lr"),
    (["merge", "--base", BASE, "--delta", BASE, "--out", "o", "--dtype", "int32"], "--dtype"),
    (["generate", "--base", BASE, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--base", BASE, "--prompt", "x", "--temperature", "-0.5"], "--temperature"),
    (["eval", "ppl", "--model", BASE, "--data", "d.txt", "--window", "0"], "--window"),
    (["eval", "ppl", "--model", BASE, "--data", "d.txt", "--stride", "0"], "--stride"),
    (["eval", "ppl", "--model", BASE, "--data", "d.txt", "--batch-size", "0"], "--batch-size"),
    (["eval", "fidelity", "--base", BASE, "--finetuned", BASE, "--data", "d.txt", "--limit", "0"], "--limit"),
    (["eval", "tasks", "--model", BASE, "--tasks", "piqa", "--data-dir", "d", "--limit", "-3"], "--limit"),
    (["serve", "--base", BASE, "--max-batch", "0"], "--max-batch"),
    (["serve", "--base", BASE, "--kv-cache-mb", "0"], "--kv-cache-mb"),
    (["serve", "--base", BASE, "--kv-cache-mb", "inf"], "--kv-cache-mb"),
    (["serve", "--base", BASE, "--max-gpu-deltas", "0"], "--max-gpu-deltas"),
    (["serve", "--base", BASE, "--max-cpu-deltas", "0"], "--max-cpu-deltas"),
    (["serve", "--base", BASE, "--max-queue", "0"], "--max-queue"),
    (["serve", "--base", BASE, "--max-model-len", "0"], "--max-model-len"),
    (["serve", "--base", BASE, "--max-bits", "9"], "--max-bits"),
    (["serve", "--base", BASE, "--max-extra-vocab", "-1"], "--max-extra-vocab"),
    (["serve", "--base", BASE, "--kv-block-size", "0"], "--kv-block-size"),
    (["serve", "--base", BASE, "--kv-block-size", "24"], "--kv-block-size"),
    (["serve", "--base", BASE, "--kv-block-size", "512"], "--kv-block-size"),
    (["serve", "--base", BASE, "--kv-block-size", "16.0"], "--kv-block-size"),
    (["serve", "--base", BASE, "--port", "65536"], "--port"),
    (["serve", "--base", BASE, "--port", "http"], "--port"),
    (["serve", "--base", BASE, "--dtype", "int8"], "--dtype"),
    (["serve", "--base", BASE, "--ray", "--replicas", "0"], "--replicas"),
    (["serve", "--base", BASE, "--ray", "--gpus-per-replica", "2"], "--gpus-per-replica"),
]


@pytest.mark.parametrize("argv,option", BAD_ARGUMENTS, ids=[f"{a[0]} {o} {a[-1]}" for a, o in BAD_ARGUMENTS])
def test_bad_numbers_sizes_and_dtypes_fail_while_parsing(capsys, no_work, argv, option):
    argparse_error(capsys, argv, option)


def test_good_values_parse_to_what_the_commands_use():
    args = build_parser().parse_args(["compress", "--base", "b", "--finetuned", "f", "--out", "o",
                                      "--max-shard-size", "2GiB", "--bits", "8", "--dtype", "bf16"])
    assert (args.max_shard_size, args.bits, args.dtype, args.overwrite) == (2 * 2**30, 8, "bf16", False)
    args = build_parser().parse_args(["compress", "--base", "b", "--finetuned", "f", "--out", "o"])
    assert args.max_shard_size == 5 * 10**9
    args = build_parser().parse_args(["serve", "--base", "b", "--kv-cache-mb", "0.5", "--port", "0",
                                      "--max-extra-vocab", "0"])
    assert (args.kv_cache_mb, args.port, args.max_extra_vocab, args.engine_restart) == (0.5, 0, 0, True)
    assert build_parser().parse_args(["serve", "--base", "b", "--no-engine-restart"]).engine_restart is False


# ---------------------------------------------------------------------------------- compress / merge / others


def test_compress_refuses_an_existing_out_unless_overwrite(tiny_models, artifact, tmp_path, capsys):
    out = tmp_path / "d.bitdelta"
    shutil.copytree(artifact, out)
    before = (out / "delta_config.json").read_text()
    base, ft = tiny_models["base"], tiny_models["shakespeare"]
    line = user_error(capsys, ["compress", "--base", base, "--finetuned", ft, "--out", out, "--scale", "row", "-q"],
                      "already exists", "--overwrite")
    assert line == f"error: {out} already exists; pass --overwrite to replace it"
    assert (out / "delta_config.json").read_text() == before
    # with --overwrite the artifact is replaced (row scales are recorded now)
    assert main(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(out), "--scale", "row", "-q",
                 "--overwrite"]) == 0
    assert json.loads((out / "delta_config.json").read_text())["compression"]["scale"] == "row"
    # an empty directory holds nothing to lose: allowed without --overwrite, as merge allows it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(empty), "-q"]) == 0
    assert (empty / "delta_config.json").is_file()


def test_compress_path_errors_are_found_before_the_work(tiny_models, tmp_path, capsys, no_work):
    base, ft = tiny_models["base"], tiny_models["shakespeare"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    # a directory that is not an artifact is never replaced, even with --overwrite
    user_error(capsys, ["compress", "--base", base, "--finetuned", ft, "--out", other, "--overwrite"],
               "not a bitdelta artifact")
    assert (other / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    user_error(capsys, ["compress", "--base", base, "--finetuned", ft, "--out", a_file], "not a directory")
    # under a regular file: fails for every user, root included
    user_error(capsys, ["compress", "--base", base, "--finetuned", ft, "--out", a_file / "sub" / "d.bitdelta"],
               "cannot create", "is not a directory")
    user_error(capsys, ["compress", "--base", base, "--finetuned", ft, "--out", tmp_path / "d", "--distill-steps", "5"],
               "--calibration")
    user_error(capsys, ["compress", "--base", base, "--finetuned", ft, "--out", tmp_path / "d", "--distill-steps", "5",
                        "--calibration", tmp_path / "missing.jsonl"], "--calibration", "no such file")
    user_error(capsys, ["compress", "--base", base, "--finetuned", ft, "--out", tmp_path / "d", "--scale", "auto",
                        "--calibration", a_file, "--heldout-samples", "0"], "--heldout-samples")
    assert not (tmp_path / "d").exists()


def test_compress_into_a_read_only_directory(tiny_models, tmp_path, capsys, no_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            # root ignores the mode bits; a path under a regular file fails for every user instead
            out, fragments = write(tmp_path / "file", "x") / "sub" / "d.bitdelta", ("is not a directory",)
        else:
            out, fragments = ro / "sub" / "d.bitdelta", ("cannot write", "not writable", str(ro))
        user_error(capsys, ["compress", "--base", tiny_models["base"], "--finetuned", tiny_models["shakespeare"],
                            "--out", out, "-q"], *fragments)
        assert not out.exists()
    finally:
        ro.chmod(0o700)


def test_compress_model_errors_are_one_line(tiny_models, tmp_path, capsys, quiet_loading):
    ft = tiny_models["shakespeare"]
    user_error(capsys, ["compress", "--base", tmp_path / "nope", "--finetuned", ft, "--out", tmp_path / "d", "-q"],
               str(tmp_path / "nope"))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_models["base"] / "config.json", no_weights)
    user_error(capsys, ["compress", "--base", no_weights, "--finetuned", ft, "--out", tmp_path / "d", "-q"],
               str(no_weights))
    assert not (tmp_path / "d").exists()


def test_inspect_merge_import_eval_errors(tiny_models, artifact, tmp_path, capsys, no_work):
    for i, modules in enumerate((None, [], ["q_proj"])):
        bad = broken_copy(artifact, tmp_path / f"bad{i}", modules)
        user_error(capsys, ["inspect", bad], "modules")
    base = tiny_models["base"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    user_error(capsys, ["merge", "--base", base, "--delta", artifact, "--out", taken], "already exists", "--overwrite")
    (tmp_path / "f").write_text("x")
    user_error(capsys, ["merge", "--base", base, "--delta", artifact, "--out", tmp_path / "f" / "m"], "not a directory")
    user_error(capsys, ["import-reference", "--base", base, "--diff", tmp_path / "diff.pt", "--out", tmp_path / "r"],
               "--diff", "no such file")
    user_error(capsys, ["import-reference", "--base", base, "--diff", tmp_path / "f", "--out", artifact],
               "already exists", "--overwrite")
    user_error(capsys, ["eval", "ppl", "--model", base, "--data", tmp_path / "missing.txt"], "--data", "no such file")
    user_error(capsys, ["eval", "ppl", "--model", base, "--data", tmp_path], "--data", "a directory")
    user_error(capsys, ["eval", "tasks", "--model", base, "--tasks", "piqa", "--data-dir", tmp_path / "none"],
               "--data-dir")
    user_error(capsys, ["generate", "--base", base, "--prompt", "x", "--device", "cuda:99"], "cuda:99")


def test_generate_with_a_corrupt_delta_fails_before_loading_the_base(artifact, tiny_models, tmp_path, capsys, no_work):
    bad = truncated_copy(artifact, tmp_path / "truncated")
    user_error(capsys, ["generate", "--base", tiny_models["base"], "--delta", bad, "--prompt", "x"], str(bad))


# ---------------------------------------------------------------------------------- internal errors and -v


def test_internal_errors_are_one_line_with_exit_1(artifact, capsys, monkeypatch):
    import bitdelta.report

    def bug(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(bitdelta.report, "describe_artifact", bug)
    rc, err = run_main(capsys, ["inspect", artifact])
    assert rc == 1
    assert one_error_line(err) == ("error: internal error: RuntimeError: boom second line "
                                   "(run with -v for the traceback)")


def test_verbose_shows_the_traceback(tmp_path, capsys):
    for argv in (["-v", "inspect", tmp_path], ["inspect", tmp_path, "-v"]):
        rc, err = run_main(capsys, argv)
        assert rc == 2
        assert "Traceback" in err
        assert err.splitlines()[-1].startswith("error: ") and "delta_config.json" in err.splitlines()[-1]
    # without -v: just the line
    user_error(capsys, ["inspect", tmp_path], "delta_config.json")


def test_os_errors_name_the_file(tmp_path, capsys, monkeypatch):
    import bitdelta.report

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bitdelta.report, "describe_artifact", denied)
    line = user_error(capsys, ["inspect", tmp_path / "x"])
    assert line == f"error: {tmp_path / 'x'}: Permission denied"


# ---------------------------------------------------------------------------------- serve


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_KEY_FILES = {
    "malformed.toml": ('[keys\n"sk-a" = ["x"]\n', "not valid TOML"),
    "number.toml": ('[keys]\n"sk-abcdefgh" = 5\n', "list of model names"),
    "mixed.toml": ('[keys]\n"sk-abcdefgh" = ["x", 3]\n', "list of model names"),
    "empty-list.toml": ('[keys]\n"sk-abcdefgh" = []\n', "non-empty list"),
    "empty-key.toml": ('[keys]\n"" = ["x"]\n', "empty"),
    "no-table.toml": ('keys = "sk-a"\n', "[keys] table"),
    "binary.toml": ("", "UTF-8"),
}


def test_load_api_keys_says_which_file_and_what_to_fix(tmp_path):
    from bitdelta.serving.api import load_api_keys

    for name, (text, fragment) in BAD_KEY_FILES.items():
        path = tmp_path / name
        if name == "binary.toml":
            path.write_bytes(b"\xff\xfe[keys]\n")
        else:
            path.write_text(text)
        with pytest.raises(BitDeltaError) as e:
            load_api_keys(path)
        assert str(path) in str(e.value) and fragment in str(e.value), str(e.value)
    with pytest.raises(BitDeltaError, match="no such file"):
        load_api_keys(tmp_path / "missing.toml")
    with pytest.raises(BitDeltaError, match="cannot read"):
        load_api_keys(tmp_path)  # a directory
    ok = write(tmp_path / "ok.toml", '[keys]\n"sk-a" = ["x", "y"]\n"sk-b" = "*"\n')
    assert load_api_keys(ok) == {"sk-a": {"x", "y"}, "sk-b": {"*"}}


def test_serve_checks_keys_and_deltas_before_loading_the_base(tiny_models, artifact, tmp_path, capsys, no_work):
    base = tiny_models["base"]
    for name, (text, fragment) in BAD_KEY_FILES.items():
        if name == "binary.toml":
            continue
        keys = write(tmp_path / name, text)
        user_error(capsys, ["serve", "--base", base, "--api-keys", keys], str(keys), fragment)
    user_error(capsys, ["serve", "--base", base, "--api-keys", tmp_path / "nokeys.toml"], "no such file")
    user_error(capsys, ["serve", "--base", base, "--delta", f"a={tmp_path / 'missing'}"], "--delta a=", "no such")
    user_error(capsys, ["serve", "--base", base, "--delta", "a=./missing"], "no such")
    user_error(capsys, ["serve", "--base", base, "--delta", "a=no-such-org/no-such-delta"], "no such", "hub")
    user_error(capsys, ["serve", "--base", base, "--delta", f"a={write(tmp_path / 'plain', 'x')}"], "not a directory")
    null = broken_copy(artifact, tmp_path / "null-modules", None)
    user_error(capsys, ["serve", "--base", base, "--delta", f"a={null}"], "modules")
    user_error(capsys, ["serve", "--base", base, "--delta", "just-a-name"], "NAME=PATH")
    user_error(capsys, ["serve", "--base", base, "--delta-dir", tmp_path / "none"], "--delta-dir")
    user_error(capsys, ["serve", "--base", base, "--device", "cuda:99"], "cuda:99")
    user_error(capsys, ["serve", "--ray", "--base", base, "--delta-store", tmp_path, "--api-keys",
                        tmp_path / "malformed.toml"], "not valid TOML")


def test_serve_on_a_busy_port_fails_before_loading_the_base(tiny_models, capsys, no_work):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        user_error(capsys, ["serve", "--base", tiny_models["base"], "--port", port], f"127.0.0.1:{port}", "--port")


def test_serve_with_a_corrupt_startup_delta_is_one_line(tiny_models, artifact, tmp_path, capsys, monkeypatch,
                                                       quiet_loading):
    import uvicorn

    def never(*a, **k):
        raise AssertionError("the server started with a corrupt --delta")

    monkeypatch.setattr(uvicorn, "run", never)
    bad = truncated_copy(artifact, tmp_path / "truncated")
    user_error(capsys, ["serve", "--base", tiny_models["base"], "--delta", f"bad={bad}", "--kv-cache-mb", "8"],
               str(bad))


def test_delta_dir_skips_bad_artifacts_and_serves_the_good_ones(tiny_models, delta_dir, corrupt_delta, tmp_path,
                                                                caplog, monkeypatch):
    from fastapi.testclient import TestClient

    from bitdelta.serving.cli import build_app
    from bitdelta.serving.runtime import ServingRuntime

    root = tmp_path / "deltas"
    root.mkdir()
    shutil.copytree(delta_dir / "shakespeare", root / "shakespeare")
    shutil.copytree(corrupt_delta, root / "truncated")
    broken_copy(delta_dir / "gsm8k", root / "null-modules", None)
    broken_copy(delta_dir / "gsm8k", root / "list-modules", ["model.layers.0.mlp.up_proj"])
    # an artifact whose loading hits an error that is not one of bitdelta's (a bug, a library error)
    shutil.copytree(delta_dir / "gsm8k", root / "unexpected")
    register = ServingRuntime.register

    def flaky_register(self, name, path, *args, **kwargs):
        if name == "unexpected":
            raise RuntimeError("loader crashed\nwith two lines")
        return register(self, name, path, *args, **kwargs)

    monkeypatch.setattr(ServingRuntime, "register", flaky_register)
    args = build_parser().parse_args(["serve", "--base", str(tiny_models["base"]), "--base-name", "base",
                                      "--delta-dir", str(root), "--kv-cache-mb", "16", "--max-batch", "2"])
    with caplog.at_level(logging.ERROR, logger="bitdelta.serve"):
        rt, app = build_app(args)
    try:
        assert rt.models() == ["base", "shakespeare"]
        skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping ")]
        assert len(skipped) == 4 and all("\n" not in m for m in skipped), skipped
        for name in ("truncated", "null-modules", "list-modules", "unexpected"):
            assert sum(str(root / name) in m for m in skipped) == 1, skipped
        assert any("RuntimeError: loader crashed with two lines" in m for m in skipped), skipped
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"model": "shakespeare", "prompt": "ROMEO:", "max_tokens": 3})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
            assert client.post("/v1/completions", json={"model": "truncated", "prompt": "x", "max_tokens": 1}
                               ).status_code == 404
    finally:
        rt.shutdown()


# ---------------------------------------------------------------------------------- real processes


def run_cli(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "bitdelta", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow  # real processes
def test_a_real_process_prints_one_line(tiny_models, tmp_path):
    keys = write(tmp_path / "keys.toml", '[keys]\n"sk-a" = [1, 2]\n')
    r = run_cli("serve", "--base", tiny_models["base"], "--api-keys", keys)
    assert r.returncode == 2, r.stderr
    assert str(keys) in one_error_line(r.stderr)
    a_file = write(tmp_path / "file", "x")
    r = run_cli("compress", "--base", tiny_models["base"], "--finetuned", tiny_models["shakespeare"],
                "--out", a_file / "sub", "-q")
    assert r.returncode == 2, r.stderr
    assert "is not a directory" in one_error_line(r.stderr)
