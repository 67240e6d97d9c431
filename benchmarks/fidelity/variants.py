"""The deltas the benchmark builds per domain, each a named variant with its settings stated here
once: the library recipe it is built from (``bitdelta.recipes``), or, for the benchmark's own
comparisons that no recipe covers, its :class:`~bitdelta.configs.CompressConfig` spelled out.

How a variant is built (``artifacts.Artifacts.build``) follows from its fields: compressed with
``compress`` (or reusing another variant's compression, ``start_from``), distilled unless
``distill`` is False, or, with ``candidates``, chosen per module among those variants' distilled
deltas (``choose="kl"``: ``distill.choose_modes``, what the library's ``auto`` recipe does with the
candidates its ``CompressConfig.matrix_modes`` names; ``"mse"``: ``distill.choose_auto``, the
earlier row/col choice). The candidates are variants of their own, so ``auto`` reuses the
scalar/row/col deltas the table reports rather than distilling them again. Distillation takes the recipe's
:class:`~bitdelta.configs.DistillConfig` with the benchmark's ``--distill-*`` flags put over it.

Quantized bases (``bitdelta.quant``): a variant whose ``compress.base_quant`` names a scheme is
compressed against the base quantized with it (Δ = W_ft − Q(W_base)) and distilled and evaluated on
that base, dequantized, as the engine runs it; a variant with ``quantized_finetune`` has no delta at
all: it is the fine-tune quantized with that scheme (merge, then quantize), the alternative to it.

    VARIANTS                               # the names --variants accepts, in report order
    BUILDS["auto-2bit"].candidates         # ("scalar-2bit", "row-2bit", "col-2bit")
    distill_config(args, BUILDS["row"])    # DistillConfig for distilling the row variant
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bitdelta.configs import CompressConfig, DistillConfig
from bitdelta.quant import SCHEMES
from bitdelta.recipes import get_recipe


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    compress: CompressConfig
    recipe: str | None = None  # the bitdelta recipe it is built from; None: a benchmark-only comparison
    distill: bool = True  # False: the initial scales (mean |Δ|)
    start_from: str | None = None  # distil this variant's compression instead of compressing again
    candidates: tuple[str, ...] = ()  # variants whose distilled deltas are chosen among, per module
    choose: str = "kl"  # with candidates: "kl" (choose_modes) or "mse" (choose_auto, row/col only)
    cost: float = 1.6  # wall time of building + evaluating it, relative to evaluating the base
    quantized_finetune: str | None = None  # a scheme: no delta, the fine-tune quantized with it

    @property
    def base_quant(self) -> str | None:
        """The scheme of the quantized base the delta is made against and applied to (None: the base)."""
        return self.compress.base_quant


def _recipe(name: str, description: str, recipe: str, **fields) -> Variant:
    return Variant(name, description, get_recipe(recipe).compress, recipe, **fields)


_TWO_BITS = dataclasses.replace(get_recipe("paper").compress, bits=2)
# One sign plane plus a low-rank correction of its residual at the bytes of a second plane (bitdelta.lowrank):
# compared at equal bytes with scalar-2bit.
_LOWRANK = dataclasses.replace(get_recipe("paper").compress, lowrank_budget=1.0)

_PAPER = get_recipe("paper").compress

_ALL = (
    _recipe("scalar-initial", "scalar scales, mean|Δ|, no distillation", "paper", distill=False, cost=1.2),
    _recipe("scalar", "scalar scales, distilled", "paper", start_from="scalar-initial"),
    _recipe("row", "per-row scales, distilled", "row"),
    _recipe("col", "per-column scales, distilled", "col"),
    _recipe("auto", "per module scalar, row or col by held-out KL", "auto",
            candidates=("scalar", "row", "col"), cost=1.8),
    Variant("auto-old", "per module row or col by the held-out distillation loss (MSE), the earlier auto",
            CompressConfig(), candidates=("row", "col"), choose="mse", cost=1.4),
    Variant("scalar-2bit", "two residual sign planes, scalar scales, distilled", _TWO_BITS, cost=2.0),
    Variant("row-2bit", "two residual sign planes, per-row scales, distilled (a candidate of auto-2bit)",
            dataclasses.replace(get_recipe("row").compress, bits=2)),
    Variant("col-2bit", "two residual sign planes, per-column scales, distilled (a candidate of auto-2bit)",
            dataclasses.replace(get_recipe("col").compress, bits=2)),
    _recipe("auto-2bit", "two residual sign planes, auto", "auto-2bit",
            candidates=("scalar-2bit", "row-2bit", "col-2bit"), cost=4.0),
    Variant("scalar-lowrank", "one sign plane, scalar scales, plus a low-rank correction of the residual with "
                              "the bytes of a second plane (--lowrank-budget 1.0, fixed while the scales are "
                              "distilled)", _LOWRANK, cost=2.0),
    _recipe("reference", "the reference implementation's recipe: scalar scales, embeddings/lm_head dense "
                         "(float16) and trained with the norms", "reference"),
    # scalar's recipe (compression and distillation) against the quantized base; no recipe of their own
    *(Variant(f"{s}-base", f"scalar scales, distilled as scalar, against the {s.upper()}-quantized base",
              dataclasses.replace(_PAPER, base_quant=s)) for s in SCHEMES),
    # what a user would otherwise serve: merge the fine-tune, then quantize it (no delta, nothing distilled)
    *(Variant(f"{s}-merged", f"no delta: the fine-tune quantized to {s.upper()} (merge, then quantize)",
              CompressConfig(), distill=False, quantized_finetune=s, cost=1.0) for s in SCHEMES),
)
BUILDS: dict[str, Variant] = {v.name: v for v in _ALL}
# The variants --variants names (and the report's order); row-2bit and col-2bit are built only as
# auto-2bit's candidates.
VARIANTS = ("scalar-initial", "scalar", "row", "col", "auto", "auto-old", "scalar-2bit", "auto-2bit", "scalar-lowrank",
            "reference", *(f"{s}-base" for s in SCHEMES), *(f"{s}-merged" for s in SCHEMES))
# The rows on a quantized model (quantized base + Δ, quantized fine-tune): not in the float-base goals.
QUANTIZED = tuple(n for n in VARIANTS if BUILDS[n].base_quant or BUILDS[n].quantized_finetune)
# Relative wall time of each model's turn in ``eval`` (build + evaluate), for the --budget-s guard:
# auto-2bit distils two 2-bit deltas and runs the held-out choice before it is evaluated.
COST = {"base": 1.0, "finetune": 1.0, **{name: BUILDS[name].cost for name in VARIANTS}}


def distill_config(args, variant: Variant) -> DistillConfig:
    """The variant's recipe's distillation settings with the benchmark's flags put over them; a recipe
    that trains the dense parts (``reference``) keeps its absolute lr, as the original code."""
    recipe = get_recipe(variant.recipe or "paper").distill
    lr_mode = "absolute" if recipe.train_dense else args.distill_lr_mode
    return dataclasses.replace(recipe, steps=args.distill_steps, lr=args.distill_lr, lr_mode=lr_mode,
                               batch_size=args.distill_batch, loss="mse", seed=args.seed)
