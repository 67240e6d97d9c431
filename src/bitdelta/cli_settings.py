"""``bitdelta compress`` settings: flags, a settings file and a named recipe made into configs, and
the settings a delta records written back in the settings-file form (``bitdelta inspect``).

Precedence, lowest first: the recipe (``--recipe`` or the file's ``recipe:``; ``default`` when
distilling without one), the file's ``compress:``/``distill:`` sections, then flags given explicitly
on the command line. Distillation runs when a recipe is named, the file has a ``distill:`` section,
``--distill-steps`` is above 0, or the scale is ``auto``. Without a named recipe the calibration text
must be said (``--calibration``), as the ``default`` recipe's own (``self``) is not assumed.

    settings = compress_settings(args)                   # CompressSettings(recipe, compress, distill)
    print(settings_yaml(recorded_settings(cfg)))         # cfg: a delta_config.json; the same form
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .configs import (
    BASE_QUANT_SCHEMES,
    SELF_CALIBRATION,
    CompressConfig,
    DistillConfig,
    check_sections,
    fill,
    read_settings_file,
)
from .errors import BitDeltaError
from .recipes import get_recipe

SECTIONS = ("recipe", "compress", "distill")
# compress flag destination -> CompressConfig field, and the same for distillation. The dense extras'
# dtype is --extras-dtype; --dtype (the load dtype) sets it too for one release, as it did alone before.
COMPRESS_FLAGS = {"scale": "scale", "bits": "bits", "target": "target", "exclude": "exclude",
                  "dense_embeddings": "dense_embeddings", "extras_dtype": "dtype", "base_quant": "base_quant",
                  "lowrank_budget": "lowrank_budget", "lowrank_rank": "lowrank_rank"}
DISTILL_FLAGS = {"distill_steps": "steps", "distill_lr": "lr", "distill_lr_mode": "lr_mode",
                 "distill_batch_size": "batch_size", "num_samples": "num_samples", "seq_len": "seq_len",
                 "heldout_samples": "heldout", "distill_loss": "loss", "calibration": "calibration",
                 "self_prompts": "self_prompts", "seed": "seed"}


@dataclass(frozen=True)
class CompressSettings:
    """What one ``bitdelta compress`` run does: ``distill`` is None when it does not distil."""

    recipe: str
    compress: CompressConfig
    distill: DistillConfig | None


def _flag_patterns(values):
    """``--target a,b --target c`` -> ("a", "b", "c")."""
    return tuple(p for v in values for p in v.split(",") if p)


def _given_flags(args, flags: dict, given) -> dict:
    out = {}
    for dest, name in flags.items():
        value = getattr(args, dest, None)
        if dest not in given or value is None:
            continue
        if dest == "distill_steps" and value == 0:
            continue  # 0: no distillation of its own; a recipe's steps still apply
        out[name] = _flag_patterns(value) if dest in ("target", "exclude") else value
    return out


def compress_settings(args, given) -> CompressSettings:
    """The settings of parsed ``compress`` arguments; ``given``: the flags set explicitly."""
    data = read_settings_file(args.config) if getattr(args, "config", None) else {}
    where = f"--config {args.config}" if data else "settings"
    check_sections(data, SECTIONS, where)
    recipe = args.recipe if "recipe" in given and args.recipe else data.get("recipe")
    if recipe is not None:
        get_recipe(recipe)  # an unknown name fails here, listing the names
    compress_flags = _given_flags(args, COMPRESS_FLAGS, given)
    if "dtype" not in compress_flags and "dtype" in given and getattr(args, "dtype", None):
        compress_flags["dtype"] = args.dtype  # --dtype without --extras-dtype: the extras too, for one release
    distill_flags = _given_flags(args, DISTILL_FLAGS, given)
    named = get_recipe(recipe or "default")
    ccfg = fill(fill(named.compress if recipe else CompressConfig(), data.get("compress"), f"{where}: compress"),
                compress_flags, "flags")
    distils = bool(recipe) or "distill" in data or "steps" in distill_flags or ccfg.needs_distillation
    if not distils:
        return CompressSettings("default", ccfg, None)
    # without a named recipe the calibration text must be said: the default recipe's "self" is not assumed
    start = named.distill if recipe else dataclasses.replace(named.distill, calibration=None)
    dcfg = fill(fill(start, data.get("distill"), f"{where}: distill"), distill_flags, "flags")
    if not dcfg.calibration:
        if recipe:
            raise BitDeltaError(f"--recipe {recipe} distils on calibration text you give: pass --calibration "
                                "FILE (.jsonl, .txt or a datasets name), or --calibration self")
        raise BitDeltaError("scale distillation needs --calibration FILE (.jsonl, .txt or a datasets name), or "
                            "--calibration self (or --recipe default) to sample the text from the fine-tune")
    if dcfg.self_prompts and not dcfg.self_calibrated:
        raise BitDeltaError("--self-prompts is for --calibration self; drop it or add --calibration self")
    if ccfg.needs_distillation and dcfg.heldout == 0:
        raise BitDeltaError("--scale auto chooses each module's scales on held-out samples: --heldout-samples must "
                            "be at least 1")
    return CompressSettings(recipe or "default", ccfg, dcfg)


# ---------------------------------------------------------------------------------- what a delta records


def recorded_settings(cfg: dict) -> dict:
    """The settings a ``delta_config.json`` records, in the settings-file form: a file that
    ``bitdelta compress --config`` reads to repeat the compression (the held-out sample count and
    the distillation guard are not recorded: a repeat uses the recipe's)."""
    comp = cfg.get("compression") or {}
    compress = {"scale": comp.get("scale", "scalar"), "bits": comp.get("bits", 1)}
    for key in ("target", "exclude"):
        if comp.get(key) is not None:
            compress[key] = list(comp[key])
    if comp.get("dense_embeddings"):
        compress["dense_embeddings"] = True
    if comp.get("dense_dtype"):
        compress["dtype"] = comp["dense_dtype"]
    scheme = (comp.get("base_quantization") or {}).get("scheme")
    if scheme in BASE_QUANT_SCHEMES:
        compress["base_quant"] = scheme
    for key in ("lowrank_budget", "lowrank_rank"):
        if (comp.get("lowrank") or {}).get(key.removeprefix("lowrank_")) is not None:
            compress[key] = comp["lowrank"][key.removeprefix("lowrank_")]
    out = {}
    record = cfg.get("distillation")
    if record:
        if record.get("recipe"):
            out["recipe"] = record["recipe"]
        out["compress"] = compress
        out["distill"] = _recorded_distill(record)
    else:
        out["compress"] = compress
    CompressConfig(**compress)  # what is printed must read back
    return out


def _recorded_distill(record: dict) -> dict:
    distill = {k: record[k] for k in ("steps", "lr", "lr_mode", "loss", "batch_size", "num_samples", "seq_len",
                                      "seed") if record.get(k) is not None}
    # records from before the relative lr trained absolute steps
    distill.setdefault("lr_mode", "absolute")
    if record.get("calibration") == SELF_CALIBRATION:
        distill["calibration"] = SELF_CALIBRATION
        prompts = record.get("self_prompts")
        if prompts and prompts != "built-in":
            distill["self_prompts"] = prompts
    elif record.get("dataset"):
        distill["calibration"] = record["dataset"]
    heldout = (record.get("auto") or {}).get("heldout_samples")
    if heldout:
        distill["heldout"] = heldout
    if record.get("train_dense"):
        distill["train_dense"] = True
    fill(DistillConfig(), distill, "recorded distillation")  # what is printed must read back
    return distill
