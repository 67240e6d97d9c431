"""Absolute vs relative distillation steps on the tiny test pair (CPU, about 3 minutes).

The pair is ``benchmarks._common.tiny_llama_pair`` (the tests' tiny Llama pair: a fine-tune made
as base + a small random delta; row scales about 3e-4, the size of SmolLM2-135M fine-tunes'
scales). For 1 and 2 bits, every lr and two seeds, it prints the held-out loss after 100
distillation steps relative to before (lower is better), so the lr sensitivity of each mode and
the spread between seeds can be read off:

    python benchmarks/distill_lr_modes.py      # or: python -m benchmarks.distill_lr_modes
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script: the benchmarks package and the library

import transformers  # noqa: E402

import bitdelta  # noqa: E402
from benchmarks._common import random_token_batches, tiny_llama_pair  # noqa: E402
from bitdelta.calibration import Calibration  # noqa: E402
from bitdelta.distill import distill_scales  # noqa: E402

GRID = {"absolute": (1e-5, 1e-4, 1e-3), "relative": (3e-3, 1e-2, 3e-2, 1e-1)}


def load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def main() -> None:
    logging.disable(logging.WARNING)  # the kept-initial warnings would drown the table
    base_dir, ft_dir = tiny_llama_pair(Path(tempfile.mkdtemp()))
    cal = Calibration(random_token_batches(48, 16, 97, 0), random_token_batches(16, 16, 97, 1), "random-ids")
    print("| bits | lr mode | lr | held-out after / before, seed 0 | seed 1 |")
    print("|---|---|---|---|---|")
    for bits in (1, 2):
        delta = bitdelta.compress(base_dir, ft_dir, scale="row", bits=bits, progress=False)
        base, ft = load(base_dir), load(ft_dir)
        for mode, lrs in GRID.items():
            for lr in lrs:
                ratios = []
                for seed in (0, 1):
                    d = distill_scales(delta, base, ft, cal, steps=100, lr=lr, lr_mode=mode, seed=seed,
                                       progress=False, keep_better=False).info["distillation"]
                    ratios.append(d["heldout_loss_after"] / d["heldout_loss_before"])
                print(f"| {bits} | {mode} | {lr:.0e} | {ratios[0]:.3f} | {ratios[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
