"""Exceptions bitdelta raises for bad input: each message says what is wrong and what to do.

    try:
        delta = bitdelta.Delta.from_pretrained("broken.bitdelta")
    except bitdelta.BitDeltaError as e:
        print(e)
"""

from __future__ import annotations


class BitDeltaError(ValueError):
    """Base class of every error bitdelta raises on purpose (a ``ValueError``, so callers that
    already catch bad-argument errors keep working)."""


class FormatError(BitDeltaError):
    """An artifact or checkpoint file is missing, truncated, corrupt, or of an unknown format."""


class WrongBaseError(BitDeltaError):
    """A delta is being applied to a model that is not the base it was compressed against."""


class ShapeMismatchError(BitDeltaError):
    """Base and fine-tune (or delta and model) disagree on a tensor's shape."""


class InvalidDeltaError(FormatError):
    """A delta's values are non-finite or absurd for its base (see :mod:`bitdelta.validate`)."""


class ConfigError(BitDeltaError):
    """A setting (a config field, a settings file, a recipe name) is unknown or out of range."""
