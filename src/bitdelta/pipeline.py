"""Compression with scale distillation, end to end: what ``bitdelta compress --distill-steps`` runs.

Loads the base (the student's frozen body) and the fine-tune (the teacher) once, compresses,
distils the scales on calibration text, and for ``scale="auto"`` distils scalar, row and col
scales and keeps, per module, the one with the lowest held-out KL (``distill.choose_modes``).

Settings are a :class:`~bitdelta.configs.CompressConfig` and a :class:`~bitdelta.configs.DistillConfig`,
by default those of a named recipe (``recipes.py``: ``default``, ``paper``, ``row``, ``col``, ``auto``,
``auto-2bit``, ``reference``); keyword settings given explicitly (not None) override them.

The calibration text is a file (``.jsonl``/``.txt``/a datasets name) or ``"self"``: samples the
fine-tune generates itself (``calibration.self_calibration``), which needs no data from the user.
The recipe's name and the calibration used are recorded in the distillation record.

    delta = compress_distilled("base", "ft", "calibration.jsonl", scale="auto")
    delta = compress_distilled("base", "ft", "self")                      # no calibration data needed
    delta = compress_distilled("base", "ft", "c4.jsonl", recipe="paper")  # the paper's numbers
    r = get_recipe("auto-2bit")
    delta = compress_distilled("base", "ft", compress_config=r.compress, distill_config=r.distill, recipe=r.name)
"""

from __future__ import annotations

import dataclasses

import torch

from .calibration import load_calibration, self_calibration
from .compress import compress
from .configs import SELF_CALIBRATION, CompressConfig, DistillConfig, field_names, to_plain
from .delta import Delta
from .distill import TeacherLogits, choose_modes, distill_scales, precompute_teacher_logits
from .errors import BitDeltaError, ConfigError
from .hf import default_device, load_model, load_tokenizer
from .recipes import RECIPES as NAMED_RECIPES
from .recipes import get_recipe
from .scale_modes import MATRIX_MODES

SELF = SELF_CALIBRATION
AUTO_CANDIDATES = tuple(m.value for m in MATRIX_MODES)
# The flat form of each recipe's distillation settings (what recipe_settings returns), by name.
_FLAT_KEYS = ("steps", "lr", "lr_mode", "loss", "scale", "batch_size", "num_samples", "seq_len", "calibration")


def recipe_settings(recipe: str = "default", **given) -> dict:
    """The recipe's distillation settings as one flat dict (``scale`` included) with every argument
    that is not None in ``given`` put over them."""
    r = get_recipe(recipe)
    merged = {**to_plain(r.distill), **to_plain(r.compress)}
    out = {k: merged[k] for k in _FLAT_KEYS}
    out.update({k: v for k, v in given.items() if v is not None})
    return out


RECIPES: dict[str, dict] = {name: recipe_settings(name) for name in NAMED_RECIPES}


def split_settings(settings: dict) -> tuple[dict, dict]:
    """Keyword settings split into CompressConfig and DistillConfig fields (None values dropped: not
    given); a key of neither is an error naming both sets of keys."""
    compress_keys, distill_keys = set(field_names(CompressConfig)), set(field_names(DistillConfig))
    unknown = sorted(k for k in settings if k not in compress_keys | distill_keys)
    if unknown:
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; compression "
                          f"settings: {', '.join(field_names(CompressConfig))}; distillation settings: "
                          f"{', '.join(field_names(DistillConfig))}")
    given = {k: v for k, v in settings.items() if v is not None}
    return ({k: v for k, v in given.items() if k in compress_keys},
            {k: v for k, v in given.items() if k in distill_keys})


def compress_distilled(
    base: str,
    finetuned: str,
    calibration: str | None = None,
    *,
    compress_config: CompressConfig | None = None,
    distill_config: DistillConfig | None = None,
    recipe: str = "default",
    model_dtype=None,
    device: str | None = None,
    teacher_cache: str | None = None,
    progress: bool = True,
    base_revision: str | None = None,
    finetuned_revision: str | None = None,
    **settings,
) -> Delta:
    """Compress ``finetuned`` against ``base`` and distil the scales; see the module docstring.

    Args:
        calibration: a text source or ``"self"``, over the settings' (None: the recipe's: ``self``
            for ``default``; ``paper`` needs a file).
        compress_config, distill_config: the settings (default: the recipe's).
        recipe: the named recipe the settings come from, recorded in the artifact.
        model_dtype, device: how the two models are loaded for distillation.
        teacher_cache: precompute the fine-tune's logits to this file and free the fine-tune.
        settings: fields of either config as keywords (``scale="auto"``, ``lr=1e-3``, ``heldout=64``,
            ``self_prompts="prompts.txt"``...); those not None override the configs.
    """
    named = get_recipe(recipe)
    compress_given, distill_given = split_settings({**settings, "calibration": calibration})
    ccfg = dataclasses.replace(compress_config or named.compress, **compress_given)
    dcfg = dataclasses.replace(distill_config or named.distill, **distill_given)
    if not dcfg.calibration:
        raise BitDeltaError(f"the {recipe!r} recipe distils on calibration text you give: pass a file (.jsonl, .txt "
                            "or a datasets name), or 'self' to sample it from the fine-tune")
    device = device or default_device()
    torch.manual_seed(dcfg.seed)
    tokenizer = load_tokenizer(finetuned, base)
    base_model = load_model(base, dtype=model_dtype, device=device, base_quant=ccfg.base_quant)
    ft_model = load_model(finetuned, dtype=model_dtype, device=device)
    if dcfg.self_calibrated:
        cal = self_calibration(ft_model, tokenizer, dcfg.self_prompts, num_samples=dcfg.num_samples,
                               seq_len=dcfg.seq_len, heldout=dcfg.heldout, seed=dcfg.seed, progress=progress)
    else:
        cal = load_calibration(dcfg.calibration, tokenizer, num_samples=dcfg.num_samples, seq_len=dcfg.seq_len,
                               heldout=dcfg.heldout, seed=dcfg.seed)
    teacher = TeacherLogits(model=ft_model)
    if teacher_cache:
        teacher = precompute_teacher_logits(ft_model, cal.train, teacher_cache, progress=progress)
        del ft_model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    distilled = {}
    for mode in ccfg.matrix_modes():
        delta = compress(base, finetuned, dataclasses.replace(ccfg, scale=mode), base_revision=base_revision,
                         finetuned_revision=finetuned_revision, progress=progress)
        distilled[mode.value] = distill_scales(delta, base_model, None, cal, dcfg, teacher=teacher, progress=progress)
    if ccfg.needs_distillation:
        held_teacher = teacher if teacher.model is not None else TeacherLogits(
            model=load_model(finetuned, dtype=model_dtype, device=device))
        out = choose_modes(distilled, base_model, held_teacher, cal.heldout, progress=progress).to("cpu")
    else:
        out = distilled[ccfg.scale.value]
    record = out.info.setdefault("distillation", {})
    record["recipe"] = recipe
    record["calibration"] = SELF if dcfg.self_calibrated else "file"
    if dcfg.self_calibrated:
        record["self_prompts"] = str(dcfg.self_prompts) if dcfg.self_prompts else "built-in"
    return out
