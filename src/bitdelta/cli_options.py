"""The flags the ``bitdelta`` commands share, declared once so that each means the same in every command.

    --base BASE        the base model (local directory or hub id) wherever one is loaded
    --dtype DTYPE      the dtype a model is loaded in
    --device DEVICE    where it runs; default cuda if available, else cpu
    --out / --overwrite  an existing output is replaced only with --overwrite
    -q / --quiet       no progress bars: bitdelta's own and those transformers and the hub draw
    --seq-len TOKENS   tokens per sequence the model sees (calibration samples, evaluated texts)

Also here: the argparse value types of the flags (numbers in range, sizes, dtype and device names:
a bad value is reported by argparse while parsing, before any model loads) and former flag names
kept working (``--model`` for ``--base``): one parses into its new flag, shows in no help, and leaves
a one-line note that ``bitdelta.cli.main`` prints after the command succeeds. Building the parser
imports neither torch nor transformers, so ``--help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager

DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda if available, else cpu)"
QUIET_HELP = "no progress bars (bitdelta's, and transformers' and the hub's while loading)"
NOTES = "notes"  # the namespace attribute old flag names leave their notes in


# ---------------------------------------------------------------------------------- argument types
# Each raises argparse.ArgumentTypeError, so a bad value is reported by argparse (usage + one line,
# exit 2) while parsing, before any model is loaded.


def _bounds(lo, hi, strict_lo: bool = False) -> str:
    low = f"> {lo}" if strict_lo else f">= {lo}"
    return f"between {lo} and {hi}" if hi is not None else low


def int_range(lo: int, hi: int | None = None):
    """An argparse ``type`` accepting integers in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {_bounds(lo, hi)}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_bounds(lo, hi)} (got {value})")
        return value

    return parse


def float_range(lo: float, hi: float | None = None, strict_lo: bool = False):
    """An argparse ``type`` accepting finite numbers ``>= lo`` (``> lo`` when ``strict_lo``), ``<= hi``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {_bounds(lo, hi, strict_lo)}, got {text!r}") from None
        if (not math.isfinite(value) or value < lo or (strict_lo and value == lo)
                or (hi is not None and value > hi)):
            raise argparse.ArgumentTypeError(f"must be a number {_bounds(lo, hi, strict_lo)} (got {text})")
        return value

    return parse


def shard_size(text: str) -> int:
    """``--max-shard-size``: ``5GB`` / ``500MB`` / ``2GiB`` / bytes, parsed now rather than after compressing."""
    from .artifact import parse_size

    try:
        value = parse_size(text)
    except ValueError:  # also float() of a malformed number such as 1.2.3
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 5GB (got {text!r})")
    return value


def dtype_name(text: str) -> str:
    """A floating-point dtype name (float16, bfloat16, float32, fp16, ...); the name itself is kept."""
    from .compress import parse_dtype
    from .errors import BitDeltaError

    try:
        parse_dtype(text)
    except BitDeltaError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device_name(text: str) -> str:
    """A torch device string (cpu, cuda, cuda:1, mps, ...); whether it exists is checked before the run."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    return text


# ---------------------------------------------------------------------------------- former flag names


def note(args, text: str) -> None:
    """Queues a one-line note for after the command (a former flag name was used, a meaning changed)."""
    notes = getattr(args, NOTES, None)
    if notes is None:
        notes = []
        setattr(args, NOTES, notes)
    if text not in notes:
        notes.append(text)


class _FormerName(argparse.Action):
    """A flag's former name: stores into the new flag's destination and notes the rename."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_name = new_name

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        note(namespace, f"{option_string} is deprecated and will be removed; use {self.new_name}")


def add_with_former_name(parser, flag: str, former: str, *, required: bool = False, former_dest: str | None = None,
                         **kwargs) -> argparse.Action:
    """Adds ``flag`` and its hidden former name ``former`` (same type and checks), of which at most one may
    be given; ``required``: one of them must be. ``former`` stores into ``flag``'s destination unless
    ``former_dest`` names its own (where the new flag does more than the old one did). Returns the action
    of ``flag``."""
    group = parser.add_mutually_exclusive_group(required=required)
    action = group.add_argument(flag, **kwargs)
    group.add_argument(former, dest=former_dest or action.dest, type=action.type, choices=action.choices,
                       metavar=action.metavar, default=None if former_dest else argparse.SUPPRESS,
                       help=argparse.SUPPRESS, action=_FormerName, new_name=flag)
    return action


# ---------------------------------------------------------------------------------- the shared flags


def add_base(parser, help: str = "base model: local directory or hub id", former: str | None = None,
             required: bool = True) -> None:
    """``--base``: the model loaded first, to which a delta applies."""
    if former:
        add_with_former_name(parser, "--base", former, required=required, help=help)
    else:
        parser.add_argument("--base", required=required, help=help)


def add_dtype(parser, help: str = "dtype to load the model in: float32, bfloat16, float16 (default: as stored)",
              former: str | None = None, former_dest: str | None = None) -> None:
    """``--dtype``: the dtype models are loaded in."""
    if former:
        add_with_former_name(parser, "--dtype", former, former_dest=former_dest, type=dtype_name, default=None,
                             help=help)
    else:
        parser.add_argument("--dtype", type=dtype_name, default=None, help=help)


def add_device(parser, what: str = "where to run") -> None:
    """``--device``: None means cuda if available, else cpu, in every command (``hf.default_device``)."""
    parser.add_argument("--device", type=device_name, default=None, help=f"{what}: {DEVICE_HELP}")


def add_quiet(parser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)


def add_output(parser, what: str) -> None:
    """``--out`` and ``--overwrite``: an existing output is refused unless ``--overwrite`` is given."""
    parser.add_argument("--out", required=True, help=f"{what} to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} at --out")


# ---------------------------------------------------------------------------------- progress bars


@contextmanager
def library_progress_bars(enabled: bool):
    """With ``enabled`` False (``-q``), transformers and huggingface_hub draw no bars until the block
    ends (loading checkpoint shards, downloads); their previous setting is restored afterwards."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub

    hub_was_enabled = not hub.are_progress_bars_disabled()
    hub.disable_progress_bars()
    # transformers keeps its own switch, read from the hub's when it is imported
    tf_logging = sys.modules.get("transformers.utils.logging")
    tf_was_enabled = tf_logging.is_progress_bar_enabled() if tf_logging is not None else hub_was_enabled
    if tf_logging is not None:
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging = sys.modules.get("transformers.utils.logging")
        if tf_logging is not None and tf_was_enabled:
            tf_logging.enable_progress_bar()  # re-enables the hub's too
        if hub_was_enabled:
            hub.enable_progress_bars()
        else:
            hub.disable_progress_bars()
