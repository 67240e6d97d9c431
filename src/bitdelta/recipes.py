"""Named recipes: a compression setting and a distillation setting that go together, by name.

``bitdelta compress --recipe NAME`` (and a settings file's ``recipe:``) starts from one of these;
flags and file keys given explicitly override its fields. The recipe's name is recorded in the
artifact's distillation record.

- ``default``: scalar scales; relative lr 3e-2 (AdamW on a multiplier of each initial scale), MSE on
  logits, 200 steps of batch 4 x 128 tokens on 800 samples of text the fine-tune samples itself.
  The relative lr raised recovery on every real fine-tune measured (docs/benchmarks.md, "Fidelity");
  self-generated text beat generic text on both bundled tiny fine-tunes (docs/distillation.md).
- ``paper``: the BitDelta paper exactly: absolute lr 1e-4, otherwise as ``default``, on calibration
  text the user gives.
- ``row``, ``col``, ``auto``: ``default`` with per-row, per-column, or per-matrix chosen scales.
- ``auto-2bit``: ``auto`` with two residual sign planes.
- ``reference``: the reference implementation's: ``paper`` plus embeddings and output head kept
  dense (float16) and trained together with the norms.

    recipe = get_recipe("auto-2bit")
    delta = compress_distilled(base, ft, recipe.compress, recipe.distill, recipe=recipe.name)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .configs import SELF_CALIBRATION, CompressConfig, DistillConfig
from .errors import ConfigError
from .scale_modes import ScaleMode


@dataclass(frozen=True)
class Recipe:
    """A named pair of settings, with one line saying what it is for."""

    name: str
    description: str
    compress: CompressConfig
    distill: DistillConfig


_PAPER = DistillConfig()  # the field defaults are the paper's numbers
_DEFAULT = dataclasses.replace(_PAPER, lr=3e-2, lr_mode="relative", calibration=SELF_CALIBRATION)


def _variant(name: str, description: str, **compress) -> Recipe:
    return Recipe(name, description, CompressConfig(**compress), _DEFAULT)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("default", "scalar scales, relative lr 3e-2, MSE, 200 steps x 4 x 128 tokens, text sampled from the "
                      "fine-tune itself", CompressConfig(), _DEFAULT),
    Recipe("paper", "the BitDelta paper exactly: scalar scales, absolute lr 1e-4, MSE, 200 steps x 4 x 128 tokens, "
                    "on calibration text you give", CompressConfig(), _PAPER),
    _variant("row", "default with one scale per output row", scale=ScaleMode.ROW),
    _variant("col", "default with one scale per input column", scale=ScaleMode.COL),
    _variant("auto", "default distilled as scalar, row and col; each matrix keeps the mode with the lowest "
                     "held-out KL", scale=ScaleMode.AUTO),
    _variant("auto-2bit", "auto with two residual sign planes per matrix", scale=ScaleMode.AUTO, bits=2),
    Recipe("reference", "the reference implementation's: paper, with embeddings and lm_head kept dense (float16) "
                        "and trained together with the norms",
           CompressConfig(dense_embeddings=True, dtype="float16"), dataclasses.replace(_PAPER, train_dense=True)),
)}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ``ConfigError`` listing the names otherwise."""
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
