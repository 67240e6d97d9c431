"""Checks the ``bitdelta`` commands run before any work, so that a wrong path or device costs a second,
not the minutes of loading a model: each raises ``BitDeltaError`` with one line saying what to do.

    replace = check_output_dir(args.out, args.overwrite, artifact=True)   # may an existing --out go?
    check_device(args.device); check_input_file(args.diff, "--diff")
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BitDeltaError


def check_output_dir(out, overwrite: bool, artifact: bool = False) -> bool:
    """Raises ``BitDeltaError`` unless ``out`` can be written: it must not exist (an empty directory
    is fine) unless ``overwrite``; with ``artifact``, a non-empty directory that is not a bitdelta
    artifact is never replaced; its nearest existing parent must be a writable directory. Returns
    whether an existing ``out`` may be replaced. Run before any work, so a bad path costs nothing."""
    out = Path(out)
    existed = out.exists()
    if existed:
        if not out.is_dir():
            raise BitDeltaError(f"{out} exists and is not a directory; choose another --out")
        if any(out.iterdir()):
            if artifact and not (out / "delta_config.json").is_file():
                raise BitDeltaError(f"{out} exists and is not a bitdelta artifact; choose an empty or new --out")
            if not overwrite:
                raise BitDeltaError(f"{out} already exists; pass --overwrite to replace it")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BitDeltaError(f"cannot create {out}: {parent} is not a directory")
    # the output is written into a sibling temporary directory and renamed: the parent must be writable
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BitDeltaError(f"cannot write {out}: {parent} is not writable; choose another --out or fix its "
                            "permissions")
    return existed


def check_device(device: str | None) -> None:
    """A CUDA device that this machine does not have is a one-line error now, not a traceback later."""
    if not device or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise BitDeltaError(f"--device {device}: no CUDA device is available here; use --device cpu")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise BitDeltaError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_input_file(path, option: str) -> None:
    if not Path(path).is_file():
        why = "a directory, not a file" if Path(path).is_dir() else "no such file"
        raise BitDeltaError(f"{option} {path}: {why}")


def check_text_source(source, option: str) -> None:
    """Calibration/evaluation text: a bare name may be a ``datasets`` id, anything that looks like a
    path (a directory part or a .jsonl/.json/.txt suffix) must be an existing file."""
    path = Path(source)
    if not path.exists() and (path.suffix in (".jsonl", ".json", ".txt") or path.parent != Path(".")):
        check_input_file(source, option)


def check_input_dir(path, option: str) -> None:
    if not Path(path).is_dir():
        raise BitDeltaError(f"{option} {path}: no such directory")


def check_output_file(path, overwrite: bool, option: str) -> None:
    """A file the command writes besides ``--out`` (``--teacher-cache``): an existing one is replaced only
    with ``--overwrite``, and never when it is a directory."""
    path = Path(path)
    if path.is_dir():
        raise BitDeltaError(f"{option} {path} is a directory; name a file")
    if path.exists() and not overwrite:
        raise BitDeltaError(f"{option} {path} already exists; pass --overwrite to replace it")
