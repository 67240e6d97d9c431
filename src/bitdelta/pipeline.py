"""Compression with scale distillation, end to end: what ``bitdelta compress --distill-steps`` runs.

Loads the base (the student's frozen body) and the fine-tune (the teacher) once, compresses,
distils the scales on calibration text, and for ``scale="auto"`` distils scalar, row and col
scales and keeps, per module, the one with the lowest held-out KL (``distill.choose_modes``).

Settings come from a named recipe (``RECIPES``); any argument given explicitly overrides it:

* ``default``: relative lr 3e-2 (AdamW on a multiplier of each initial scale), MSE on logits,
  scalar scales, 200 steps of batch 4 x 128 tokens on 800 samples, calibration text sampled from the
  fine-tune itself unless a file is given. The relative lr raised recovery on every real fine-tune
  measured (docs/benchmarks.md, "Fidelity"); the paper's absolute lr is a 15-30% jump per step for
  the scales of real deltas (3e-4 to 9e-4) and same-seed runs end far apart. Self-generated text beat
  generic text on both bundled tiny fine-tunes (docs/distillation.md, "Settings compared").
* ``paper``: the BitDelta paper exactly: absolute lr 1e-4, MSE, scalar scales, 200 steps of
  batch 4 x 128 tokens on 800 samples of generic calibration text (a file must be given).

The calibration text is a file (``.jsonl``/``.txt``/a datasets name) or ``"self"``: samples the
fine-tune generates itself (``calibration.self_calibration``), which needs no data from the user.
The recipe's name and the calibration used are recorded in the distillation record.

    delta = compress_distilled("base", "ft", "calibration.jsonl", scale="auto")
    delta = compress_distilled("base", "ft", "self")                      # no calibration data needed
    delta = compress_distilled("base", "ft", "c4.jsonl", recipe="paper")  # the paper's numbers
"""

from __future__ import annotations

import torch

from .calibration import load_calibration, self_calibration
from .compress import compress
from .delta import Delta
from .distill import TeacherLogits, choose_modes, distill_scales, precompute_teacher_logits
from .errors import BitDeltaError
from .hf import default_device, load_model, load_tokenizer

SELF = "self"
AUTO_CANDIDATES = ("scalar", "row", "col")

# Every distillation setting of each recipe. "calibration": None means the user's file is required.
RECIPES: dict[str, dict] = {
    "default": {"steps": 200, "lr": 3e-2, "lr_mode": "relative", "loss": "mse", "scale": "scalar",
                "batch_size": 4, "num_samples": 800, "seq_len": 128, "calibration": SELF},
    "paper": {"steps": 200, "lr": 1e-4, "lr_mode": "absolute", "loss": "mse", "scale": "scalar",
              "batch_size": 4, "num_samples": 800, "seq_len": 128, "calibration": None},
}


def recipe_settings(recipe: str = "default", **given) -> dict:
    """The recipe's settings with every argument that is not None in ``given`` put over them."""
    if recipe not in RECIPES:
        raise BitDeltaError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    out = dict(RECIPES[recipe])
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def compress_distilled(
    base: str,
    finetuned: str,
    calibration: str | None = None,
    scale: str | None = None,
    bits: int = 1,
    steps: int | None = None,
    lr: float | None = None,
    lr_mode: str | None = None,
    batch_size: int | None = None,
    num_samples: int | None = None,
    seq_len: int | None = None,
    heldout: int = 32,
    loss: str | None = None,
    seed: int = 0,
    model_dtype=None,
    device: str | None = None,
    teacher_cache: str | None = None,
    progress: bool = True,
    recipe: str = "default",
    self_prompts: str | None = None,
    **compress_kwargs,
) -> Delta:
    """Compress ``finetuned`` against ``base`` and distil the scales; see the module docstring.

    ``calibration`` is a text source or ``"self"`` (None: the recipe's: ``self`` for ``default``;
    ``paper`` needs a file). ``self_prompts`` is the prompt source for ``"self"`` (a text file whose documents' first
    sentences become prompts; default: bitdelta's built-in generic prompts)."""
    cfg = recipe_settings(recipe, steps=steps, lr=lr, lr_mode=lr_mode, batch_size=batch_size,
                          num_samples=num_samples, seq_len=seq_len, loss=loss, scale=scale, calibration=calibration)
    if not cfg["calibration"]:
        raise BitDeltaError(f"the {recipe!r} recipe distils on calibration text you give: pass a file (.jsonl, .txt "
                            "or a datasets name), or 'self' to sample it from the fine-tune")
    device = device or default_device()
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(finetuned, base)
    base_model = load_model(base, dtype=model_dtype, device=device, base_quant=compress_kwargs.get("base_quant"))
    ft_model = load_model(finetuned, dtype=model_dtype, device=device)
    if cfg["calibration"] == SELF:
        cal = self_calibration(ft_model, tokenizer, self_prompts, num_samples=cfg["num_samples"],
                               seq_len=cfg["seq_len"], heldout=heldout, seed=seed, progress=progress)
    else:
        cal = load_calibration(cfg["calibration"], tokenizer, num_samples=cfg["num_samples"], seq_len=cfg["seq_len"],
                               heldout=heldout, seed=seed)
    teacher = TeacherLogits(model=ft_model)
    if teacher_cache:
        teacher = precompute_teacher_logits(ft_model, cal.train, teacher_cache, progress=progress)
        del ft_model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    scale = cfg["scale"]
    modes = list(AUTO_CANDIDATES) if scale == "auto" else [scale]
    distilled = {}
    for mode in modes:
        delta = compress(base, finetuned, scale=mode, bits=bits, progress=progress, **compress_kwargs)
        distilled[mode] = distill_scales(delta, base_model, None, cal, steps=cfg["steps"], lr=cfg["lr"],
                                         lr_mode=cfg["lr_mode"], batch_size=cfg["batch_size"], loss=cfg["loss"],
                                         seed=seed, teacher=teacher, progress=progress)
    if scale == "auto":
        held_teacher = teacher if teacher.model is not None else TeacherLogits(
            model=load_model(finetuned, dtype=model_dtype, device=device))
        out = choose_modes(distilled, base_model, held_teacher, cal.heldout, progress=progress).to("cpu")
    else:
        out = distilled[scale]
    record = out.info.setdefault("distillation", {})
    record["recipe"] = recipe
    record["calibration"] = SELF if cfg["calibration"] == SELF else "file"
    if cfg["calibration"] == SELF:
        record["self_prompts"] = str(self_prompts) if self_prompts else "built-in"
    return out
