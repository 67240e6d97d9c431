"""Base-model fingerprints: tell the right base from a wrong one before a delta touches it.

At compression time we sample a few values of every compressed module's base weight (at fixed
positions of the out × in matrix) and hash the names, shapes and samples. At apply/merge time
the same positions are read from the live model and compared in the model's own dtype, so a
base loaded as fp16 or bf16 from an fp32 checkpoint still matches, while a different model
(or the fine-tune itself) does not.

A server checks many deltas against one frozen base, so it reads the samples once
(:class:`BaseSamples`) and verifies against them with the same rule and errors, touching no weight.

    fp = Fingerprint.from_weights({name: w_base_out_in, ...})
    fp.verify({name: live_weight_out_in, ...}, delta_name=..., model_name=...)  # raises WrongBaseError
    fp.verify(BaseSamples.of(live_weights), delta_name=..., model_name=...)     # same verdicts
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import ShapeMismatchError, WrongBaseError

SAMPLES_PER_MODULE = 16
MATCH_FRACTION = 0.95  # tolerate rare double-rounding (e.g. fp32 -> fp16 -> bf16 casts)


def sample_positions(numel: int) -> torch.Tensor:
    """SAMPLES_PER_MODULE evenly spread flat indices in [0, numel), rounded half up.

    Integer arithmetic: a float32 linspace rounds the last index of a matrix with more than
    2**24 elements (a 7B embedding) up to ``numel``, out of bounds."""
    last = max(numel - 1, 0)
    i = torch.arange(SAMPLES_PER_MODULE, dtype=torch.int64)
    span = SAMPLES_PER_MODULE - 1
    return (2 * i * last + span) // (2 * span)


def sample_weight(weight: torch.Tensor) -> torch.Tensor:
    """The fixed-position sample of an out × in weight, in its own dtype, on the CPU."""
    flat = weight.detach().reshape(-1)
    return flat[sample_positions(flat.numel()).to(flat.device)].cpu()


class BaseSamples:
    """The fixed-position samples and shapes of a base's weights, read once (in each weight's own
    dtype, on the CPU): what :meth:`Fingerprint.verify` compares when given this instead of weights.
    The positions depend only on a weight's size, so one read serves every delta's fingerprint."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.samples: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, weights: Mapping[str, torch.Tensor]) -> "BaseSamples":
        """Samples every weight of ``weights`` (read one at a time, so a lazily dequantizing mapping
        holds one dense matrix at once)."""
        out = cls()
        for name in weights:
            out.add(name, weights[name])
        return out

    def add(self, name: str, weight: torch.Tensor) -> None:
        self.shapes[name] = tuple(weight.shape)
        self.samples[name] = sample_weight(weight)

    def alias(self, name: str, same_as: str) -> None:
        """``name`` reads as ``same_as`` (a tied output head is the embedding matrix)."""
        self.shapes[name], self.samples[name] = self.shapes[same_as], self.samples[same_as]

    def __contains__(self, name: str) -> bool:
        return name in self.samples

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def sample(self, name: str) -> torch.Tensor:
        return self.samples[name]


class _LiveSamples:
    """The :class:`BaseSamples` interface over live weights, each sampled when asked for."""

    def __init__(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.weights = weights

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.weights[name].shape)

    def sample(self, name: str) -> torch.Tensor:
        return sample_weight(self.weights[name])


@dataclass
class Fingerprint:
    names: list[str]  # sorted module names
    shapes: list[tuple[int, int]]  # base out × in per module
    samples: torch.Tensor  # float32 [len(names), SAMPLES_PER_MODULE]

    @classmethod
    def from_samples(cls, entries: dict[str, tuple[tuple[int, int], torch.Tensor]]) -> "Fingerprint":
        names = sorted(entries)
        shapes = [tuple(int(s) for s in entries[n][0]) for n in names]
        if names:
            samples = torch.stack([entries[n][1].float() for n in names])
        else:
            samples = torch.zeros(0, SAMPLES_PER_MODULE)
        return cls(names, shapes, samples)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for name, shape, row in zip(self.names, self.shapes, self.samples):
            h.update(f"{name}:{shape[0]}x{shape[1]};".encode())
            h.update(row.contiguous().numpy().tobytes())
        return h.hexdigest()

    def verify(self, live: Mapping[str, torch.Tensor] | BaseSamples, delta_name: str, base_name: str,
               model_name: str) -> None:
        """Checks live out × in base weights (or their :class:`BaseSamples`, read beforehand) against
        the fingerprint; raises a clear error."""
        if not isinstance(live, BaseSamples):
            live = _LiveSamples(live)
        missing = [n for n in self.names if n not in live]
        if missing:
            raise WrongBaseError(
                f"delta {delta_name!r} was made for base {base_name!r}, but model {model_name!r} "
                f"has no module {missing[0]!r} ({len(missing)} of {len(self.names)} missing). "
                "Load the base model the delta was compressed against."
            )
        for name, shape in zip(self.names, self.shapes):
            got = live.shape(name)
            if got != shape:
                raise ShapeMismatchError(
                    f"delta {delta_name!r} was made for base {base_name!r}, where {name} is "
                    f"{shape[0]}x{shape[1]}, but model {model_name!r} has {got[0]}x{got[1]}. "
                    "Load the base model the delta was compressed against."
                )
        total = matched = 0
        worst = None
        for name, row in zip(self.names, self.samples):
            got = live.sample(name)
            want = row.to(got.dtype)
            eq = int((got == want).sum())
            matched += eq
            total += got.numel()
            if eq < got.numel() and worst is None:
                worst = name
        if total and matched < MATCH_FRACTION * total:
            raise WrongBaseError(
                f"delta {delta_name!r} was made for base {base_name!r}, but model {model_name!r} "
                f"has different weights ({total - matched} of {total} sampled values differ, first in "
                f"{worst}). Applying it would produce garbage: load {base_name!r} as the base."
            )
