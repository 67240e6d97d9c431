"""Compression with scale distillation, end to end: what ``bitdelta compress --distill-steps`` runs.

Loads the base (the student's frozen body) and the fine-tune (the teacher) once, compresses,
distils the scales on calibration text, and for ``scale="auto"`` distils row and col scales and
keeps, per module, the one with the lower held-out loss.

    delta = compress_distilled("base", "ft", "calibration.jsonl", scale="auto", steps=200)
"""

from __future__ import annotations

import torch

from .calibration import load_calibration
from .compress import compress
from .delta import Delta
from .distill import TeacherLogits, choose_auto, distill_scales, precompute_teacher_logits
from .hf import default_device, load_model, load_tokenizer


def compress_distilled(
    base: str,
    finetuned: str,
    calibration: str,
    scale: str = "scalar",
    bits: int = 1,
    steps: int = 200,
    lr: float = 1e-4,
    lr_mode: str = "absolute",
    batch_size: int = 4,
    num_samples: int = 800,
    seq_len: int = 128,
    heldout: int = 32,
    loss: str = "mse",
    seed: int = 0,
    model_dtype=None,
    device: str | None = None,
    teacher_cache: str | None = None,
    progress: bool = True,
    **compress_kwargs,
) -> Delta:
    device = device or default_device()
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(finetuned, base)
    cal = load_calibration(calibration, tokenizer, num_samples=num_samples, seq_len=seq_len, heldout=heldout, seed=seed)
    base_model = load_model(base, dtype=model_dtype, device=device, base_quant=compress_kwargs.get("base_quant"))
    ft_model = load_model(finetuned, dtype=model_dtype, device=device)
    teacher = TeacherLogits(model=ft_model)
    if teacher_cache:
        teacher = precompute_teacher_logits(ft_model, cal.train, teacher_cache, progress=progress)
        del ft_model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    modes = ["row", "col"] if scale == "auto" else [scale]
    distilled = {}
    for mode in modes:
        delta = compress(base, finetuned, scale=mode, bits=bits, progress=progress, **compress_kwargs)
        distilled[mode] = distill_scales(delta, base_model, None, cal, steps=steps, lr=lr, lr_mode=lr_mode,
                                         batch_size=batch_size, loss=loss, seed=seed, teacher=teacher,
                                         progress=progress)
    if scale != "auto":
        return distilled[scale]
    held_teacher = teacher if teacher.model is not None else TeacherLogits(model=load_model(finetuned, dtype=model_dtype, device=device))
    return choose_auto(distilled["row"], distilled["col"], base_model, held_teacher, cal.heldout, loss=loss,
                       progress=progress).to("cpu")
