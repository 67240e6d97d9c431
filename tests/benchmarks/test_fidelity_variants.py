"""The fidelity benchmark's variants are the library's named recipes (not names parsed for
settings): each recipe-based variant compresses as its recipe does, ``auto``'s candidates are the
modes the library's ``auto`` recipe distils, and distillation takes the benchmark's flags over the
recipe's settings."""

from __future__ import annotations

import dataclasses

from benchmarks.fidelity.settings import MODELS, parse_args
from benchmarks.fidelity.variants import BUILDS, COST, VARIANTS, distill_config
from bitdelta.recipes import get_recipe


def test_recipe_variants_compress_as_their_recipe():
    for v in BUILDS.values():
        if v.recipe:
            assert v.compress == get_recipe(v.recipe).compress, v.name
    assert BUILDS["reference"].compress.dense_embeddings and BUILDS["reference"].compress.dtype == "float16"
    assert BUILDS["scalar-2bit"].compress.bits == 2 and BUILDS["scalar-initial"].distill is False
    assert set(VARIANTS) <= set(BUILDS) and set(COST) == set(MODELS)


def test_auto_candidates_are_the_library_auto_modes():
    for name in ("auto", "auto-2bit"):
        auto = get_recipe(name).compress
        want = [dataclasses.replace(auto, scale=mode) for mode in auto.matrix_modes()]
        assert [BUILDS[c].compress for c in BUILDS[name].candidates] == want, name
    assert [BUILDS[c].compress.scale for c in BUILDS["auto-old"].candidates] == ["row", "col"]
    assert BUILDS["auto-old"].choose == "mse" and BUILDS["auto"].choose == "kl"
    # a candidate is built before the choice that needs it, so no variant chooses among choices
    assert all(not BUILDS[c].candidates for v in BUILDS.values() for c in v.candidates)


def test_distill_config_puts_the_flags_over_the_recipe():
    args = parse_args(["--phase", "eval", "--distill-steps", "7", "--distill-lr", "3e-2", "--distill-lr-mode",
                       "relative", "--distill-batch", "2", "--seed", "5"])
    row = distill_config(args, BUILDS["row"])
    assert (row.steps, row.lr, row.lr_mode, row.batch_size, row.seed, row.loss) == (7, 3e-2, "relative", 2, 5, "mse")
    assert not row.train_dense and row.keep_better
    ref = distill_config(args, BUILDS["reference"])
    assert ref.train_dense and ref.lr_mode == "absolute" and ref.steps == 7  # the reference trains absolute
    assert distill_config(args, BUILDS["auto-old"]) == dataclasses.replace(row, calibration=None)


def test_quantized_base_variants_are_scalars_recipe_on_a_quantized_base():
    args = parse_args(["--phase", "eval", "--distill-steps", "7"])
    for s in ("int8", "fp8"):
        v, merged = BUILDS[f"{s}-base"], BUILDS[f"{s}-merged"]
        assert v.compress == dataclasses.replace(BUILDS["scalar"].compress, base_quant=s) and v.distill
        assert v.base_quant == s and not v.start_from and not v.candidates
        assert distill_config(args, v) == distill_config(args, BUILDS["scalar"])  # same distillation, same flags
        assert merged.quantized_finetune == s and merged.base_quant is None and COST[merged.name] == 1.0
    # reported after every float-base variant, bases before merged
    assert VARIANTS[-4:] == ("int8-base", "fp8-base", "int8-merged", "fp8-merged")
