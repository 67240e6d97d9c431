"""Settings of a compression, declared once: :class:`CompressConfig` (what ``compress`` does to each
matrix) and :class:`DistillConfig` (how distillation trains the scales), and settings files.

The CLI builds these from its flags, a settings file and a named recipe (``recipes.py``); the library
(``compress``, ``distill_scales``, ``compress_distilled``) takes them. Both are frozen: a variant is
``dataclasses.replace(config, bits=2)``. Every field is checked when the object is made, so a wrong
value fails before any model is read, naming the field.

A settings file (YAML ``.yaml``/``.yml`` or TOML ``.toml``) has the recipe's name and a section per
dataclass; a key that is not a field is an error naming the valid keys::

    recipe: default          # the named recipe the sections start from (recipes.py)
    compress: {scale: row, bits: 2}
    distill: {steps: 100, calibration: self}

    cfg = CompressConfig(scale="row", bits=2)
    settings = read_settings_file("recipe.yaml")       # {"recipe": ..., "compress": {...}, "distill": {...}}
    cfg = fill(cfg, settings["compress"], "compress")  # the file's values over cfg's
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .scale_modes import MATRIX_MODES, ScaleMode

LR_MODES = ("absolute", "relative")
LOSSES = ("mse", "kl")
BASE_QUANT_SCHEMES = ("int8", "fp8")
SELF_CALIBRATION = "self"
MAX_BITS = 8
MAX_LOWRANK_RANK = 4096
MAX_LOWRANK_BUDGET = 64.0  # extra bytes as a multiple of one sign plane (8 is already a float16 delta's size)


def _int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bounds = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name} must be an integer {bounds}, got {value!r}")
    return value


def _float(name: str, value, positive: bool = True) -> float:
    # YAML reads 3e-2 (no dot) as a string: accept any spelling float() accepts
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or (positive and number <= 0):
        raise ConfigError(f"{name} must be a {'positive ' if positive else ''}number, got {value!r}")
    return number


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


def _optional_str(name: str, value) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _patterns(name: str, value) -> tuple[str, ...] | None:
    """Module-name patterns: a list, or one comma-separated string (as the CLI flags take them)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise ConfigError(f"{name} must be a list of module-name patterns, got {value!r}")
    return tuple(p for p in items if p)


@dataclass(frozen=True)
class CompressConfig:
    """What compression does to each matrix.

    Attributes:
        scale: ``scalar`` (one scale per matrix, the paper), ``row``, ``col``, or ``auto`` (distillation
            picks one per matrix; needs a :class:`DistillConfig`). Vocabulary matrices always use row.
        bits: residual sign planes per matrix (1 to 8).
        target, exclude: module-name patterns (globs or regexes) of what is compressed / kept dense.
        dense_embeddings: keep embeddings and the output head dense (the reference implementation's way).
        dtype: dtype of the dense extras (default: the fine-tune's own).
        base_quant: ``int8``/``fp8``: compress against the base quantized per output channel.
        lowrank_budget: add a low-rank correction of the sign planes' residual (``lowrank.py``) with
            this many extra bytes, as a multiple of one sign plane of every compressed matrix (1.0: as
            many bytes as one more plane), ranks chosen per matrix by residual energy per byte.
        lowrank_rank: instead, the same rank for every matrix (at most ``MAX_LOWRANK_RANK``).
    """

    scale: ScaleMode = ScaleMode.SCALAR
    bits: int = 1
    target: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    dense_embeddings: bool = False
    dtype: str | None = None
    base_quant: str | None = None
    lowrank_budget: float | None = None
    lowrank_rank: int | None = None

    def __post_init__(self):
        try:
            scale = ScaleMode(self.scale)
        except ValueError:
            raise ConfigError(f"scale must be one of {[m.value for m in ScaleMode]}, got {self.scale!r}") from None
        _set(self, "scale", scale)
        _int("bits", self.bits, 1, MAX_BITS)
        _set(self, "target", _patterns("target", self.target))
        _set(self, "exclude", _patterns("exclude", self.exclude))
        _bool("dense_embeddings", self.dense_embeddings)
        if self.dtype is not None and not isinstance(self.dtype, str) and str(self.dtype).startswith("torch."):
            _set(self, "dtype", str(self.dtype).removeprefix("torch."))  # a torch.dtype, kept by name
        _optional_str("dtype", self.dtype)
        if self.base_quant is not None:
            _choice("base_quant", self.base_quant, BASE_QUANT_SCHEMES)
        self._check_lowrank()

    def _check_lowrank(self) -> None:
        if self.lowrank_budget is not None:
            _set(self, "lowrank_budget", _float("lowrank_budget", self.lowrank_budget))
            if self.lowrank_budget > MAX_LOWRANK_BUDGET:
                raise ConfigError(f"lowrank_budget must be at most {MAX_LOWRANK_BUDGET:g} (times the sign bytes), "
                                  f"got {self.lowrank_budget!r}")
        if self.lowrank_rank is not None:
            _int("lowrank_rank", self.lowrank_rank, 1, MAX_LOWRANK_RANK)
        if self.lowrank_budget is not None and self.lowrank_rank is not None:
            raise ConfigError("give lowrank_budget or lowrank_rank, not both")
        if self.lowrank and self.scale is ScaleMode.AUTO:
            raise ConfigError("a low-rank correction needs a fixed scale mode (scalar, row or col), not auto: "
                              "its residual depends on the mode")

    @property
    def lowrank(self) -> bool:
        """A low-rank correction is added (by budget or by rank)."""
        return self.lowrank_budget is not None or self.lowrank_rank is not None

    @property
    def needs_distillation(self) -> bool:
        """``auto`` picks each matrix's mode by distilling every candidate mode."""
        return self.scale is ScaleMode.AUTO

    def matrix_modes(self) -> tuple[ScaleMode, ...]:
        """The modes compression runs: the one asked for, or every candidate for ``auto``."""
        return MATRIX_MODES if self.needs_distillation else (self.scale,)


@dataclass(frozen=True)
class DistillConfig:
    """How scale distillation trains a delta's scales, and on what text.

    Field defaults are the BitDelta paper's numbers (what ``distill_scales`` has always defaulted to);
    the recommended settings are the ``default`` recipe (``recipes.get_recipe("default").distill``).

    Attributes:
        steps, lr, batch_size: AdamW steps, learning rate and samples per step.
        lr_mode: ``absolute`` (AdamW on the scales, the paper) or ``relative`` (on a multiplier of each
            initial scale: each step is about ``lr`` times the scale).
        loss: ``mse`` on logits (the paper) or ``kl``.
        num_samples, seq_len, heldout: calibration samples for training, tokens per sample, held-out
            samples (the guard below and ``auto``'s choice).
        calibration: ``self`` (text the fine-tune samples itself), a ``.jsonl``/``.txt`` file or a
            datasets name; None: the caller must give one.
        self_prompts: with ``self``: a text file whose documents' first sentences are the prompts.
        seed: seeds sampling, the held-out split and the batch order.
        keep_better: keep the initial scales when training made the held-out loss worse.
        train_dense: also train the dense embeddings, output head and norms (the reference code's recipe).
    """

    steps: int = 200
    lr: float = 1e-4
    lr_mode: str = "absolute"
    loss: str = "mse"
    batch_size: int = 4
    num_samples: int = 800
    seq_len: int = 128
    heldout: int = 32
    calibration: str | None = None
    self_prompts: str | None = None
    seed: int = 0
    keep_better: bool = True
    train_dense: bool = False

    def __post_init__(self):
        _int("steps", self.steps, 1)
        _set(self, "lr", _float("lr", self.lr))
        if self.lr_mode not in LR_MODES:  # worded as distill_scales has always worded it
            raise ConfigError(f"unknown lr mode {self.lr_mode!r}; expected one of {', '.join(LR_MODES)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be 'mse' or 'kl', got {self.loss!r}")
        _int("batch_size", self.batch_size, 1)
        _int("num_samples", self.num_samples, 1)
        _int("seq_len", self.seq_len, 1)
        _int("heldout", self.heldout, 0)
        _optional_str("calibration", self.calibration)
        _optional_str("self_prompts", self.self_prompts)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        _bool("keep_better", self.keep_better)
        _bool("train_dense", self.train_dense)

    @property
    def self_calibrated(self) -> bool:
        return self.calibration == SELF_CALIBRATION


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass's own field in __post_init__


# ---------------------------------------------------------------------------------- plain values


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def to_plain(config) -> dict:
    """A config's fields as plain YAML/JSON/TOML values (enums as strings, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, ScaleMode):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def changed_fields(config, reference) -> dict:
    """The fields of ``config`` whose values differ from ``reference``'s, as plain values."""
    mine, theirs = to_plain(config), to_plain(reference)
    return {k: v for k, v in mine.items() if theirs[k] != v}


def check_keys(cls, mapping, where: str) -> None:
    """``ConfigError`` naming every key of ``mapping`` that is not a field of ``cls``, and the valid keys."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {type(mapping).__name__}")
    unknown = sorted(str(k) for k in mapping if k not in field_names(cls))
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"valid keys: {', '.join(field_names(cls))}")


def fill(config, mapping: dict | None, where: str):
    """``config`` with the values of ``mapping`` put over it (keys checked, values validated)."""
    if not mapping:
        return config
    check_keys(type(config), mapping, where)
    return dataclasses.replace(config, **mapping)


def build(cls, mapping: dict | None, where: str):
    """A ``cls`` from the keys of ``mapping`` (defaults for the rest)."""
    check_keys(cls, mapping or {}, where)
    return cls(**(mapping or {}))


# ---------------------------------------------------------------------------------- settings files

SETTINGS_SUFFIXES = (".yaml", ".yml", ".toml")


def read_settings_file(path) -> dict:
    """The mapping a YAML (``.yaml``/``.yml``) or TOML (``.toml``) settings file holds."""
    path = Path(path)
    if path.suffix.lower() not in SETTINGS_SUFFIXES:
        raise ConfigError(f"--config {path}: name a .yaml, .yml or .toml file")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ImportError as e:
        raise ConfigError(f"--config {path}: cannot read it here ({e}); use a .yaml file") from None
    except Exception as e:  # the parsers' own error types: say where the file is malformed
        raise ConfigError(f"--config {path} is not valid {path.suffix.lstrip('.').upper()}: "
                          f"{' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings, not a {type(data).__name__}")
    return data


def check_sections(data: dict, sections: tuple[str, ...], where: str) -> None:
    """``ConfigError`` for a top-level key of a settings file that is not one of ``sections``."""
    unknown = sorted(str(k) for k in data if k not in sections)
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"valid keys: {', '.join(sections)}")


def settings_yaml(data: dict) -> str:
    """``data`` as the YAML block a settings file holds (keys in the order given)."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------- flags over files


def explicit_options(parser, argv) -> frozenset[str]:
    """The destinations that ``argv`` sets explicitly on ``parser``'s command line, as opposed to
    defaults: ``argv`` is parsed again with every default (subcommands' too) suppressed."""
    import argparse

    saved_defaults, saved_parsers, seen = [], [], set()

    def suppress(p) -> None:
        if id(p) in seen:
            return
        seen.add(id(p))
        saved_parsers.append((p, dict(p._defaults)))
        p._defaults.clear()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    suppress(sub)
            elif id(action) not in seen:
                seen.add(id(action))
                saved_defaults.append((action, action.default))
                action.default = argparse.SUPPRESS

    suppress(parser)
    try:
        namespace = parser.parse_args(argv)
    finally:
        for action, default in saved_defaults:
            action.default = default
        for p, defaults in saved_parsers:
            p._defaults.update(defaults)
    return frozenset(vars(namespace))


def settings_into_args(args, settings: dict, readers: dict, given, where: str) -> None:
    """Puts each setting of a file into the parsed ``args`` unless its flag was given explicitly.

    ``readers`` maps every valid key (an ``args`` attribute) to a function checking a file value
    (raising ``ValueError``/``argparse.ArgumentTypeError`` with the reason), or to None to take it as
    it is; a key it lacks is an error naming the valid keys."""
    import argparse

    unknown = sorted(str(k) for k in settings if k not in readers)
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"valid keys: {', '.join(readers)}")
    for key, value in settings.items():
        if key in given:
            continue
        reader = readers[key]
        if reader is not None and value is not None:
            try:
                value = reader(value)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                raise ConfigError(f"{where}: {key}: {e}") from None
        setattr(args, key, value)


def flag_reader(flag_type=None, is_bool: bool = False):
    """A file value's checker for ``settings_into_args`` from what a flag declares: its argparse
    ``type`` (which takes the value as text, as the command line gives it), or true/false."""
    if is_bool:
        def read_bool(value):
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value

        return read_bool
    if flag_type is None:
        return None

    def read(value):
        if isinstance(value, (bool, list, dict)):
            raise ValueError(f"must be a single value, got {value!r}")
        return flag_type(str(value))

    return read
