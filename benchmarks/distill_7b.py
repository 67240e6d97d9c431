"""Compress + 200-step scale distillation of a Llama-2-7B-shaped pair on one GPU: wall time of each
phase and peak GPU memory, against design.md's goal (<= 5 min, <= 40 GB).

The pair is random: a bf16 base (std 0.02 matrices, unit norms) built on the GPU and a fine-tune
= base + N(0, (rel * std(W))^2) per matrix (rel = 1e-2 by default: smaller deltas vanish in bf16
rounding, where one ulp is 0.4-0.8% of a weight). Both are saved as safetensors and compressed by
``bitdelta.compress`` streaming from those files; distillation uses random token ids (the timing
and memory do not depend on the text).

    python benchmarks/distill_7b.py --work /tmp/7b --out $OUT/distill_7b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script: the benchmarks package and the library

import torch  # noqa: E402

import bitdelta  # noqa: E402
from benchmarks._common import dir_bytes  # noqa: E402
from bitdelta.calibration import Calibration, TokenBatches  # noqa: E402
from bitdelta.distill import distill_scales  # noqa: E402
from bitdelta.hf import load_model  # noqa: E402

GB = 1e9
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: smoke tests with --layers 1


def llama2_7b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16")


@torch.no_grad()
def build_pair(work: Path, layers: int, rel: float, seed: int) -> dict:
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    cfg = llama2_7b_config(layers)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "base", max_shard_size="5GB")
    t_base = time.perf_counter() - t0
    for p in model.parameters():
        if p.dim() == 2:
            p.add_(torch.randn_like(p, dtype=torch.float32).mul_(rel * float(p.float().std())).to(p.dtype))
    model.save_pretrained(work / "ft", max_shard_size="5GB")
    del model
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {"params": n_params, "build_and_save_s": round(time.perf_counter() - t0, 1), "save_base_s": round(t_base, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/7b")
    ap.add_argument("--out", default="distill_7b.json")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rel", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--scale", default="scalar")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    res = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
           "args": vars(args), "goal": {"seconds": 300, "peak_gb": 40}}

    def save():
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2), flush=True)

    res["build"] = build_pair(work, args.layers, args.rel, args.seed)
    res["checkpoint_gb_each"] = round(dir_bytes(work / "base") / GB, 2)
    save()

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    delta = bitdelta.compress(str(work / "base"), str(work / "ft"), scale=args.scale, progress=False)
    res["compress_s"] = round(time.perf_counter() - t0, 1)
    res["delta_gb"] = round(delta.nbytes() / GB, 3)
    save()

    t0 = time.perf_counter()
    base = load_model(str(work / "base"), dtype="bfloat16", device=DEVICE)
    ft = load_model(str(work / "ft"), dtype="bfloat16", device=DEVICE)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    res["load_both_models_s"] = round(time.perf_counter() - t0, 1)
    res["gpu_gb_after_load"] = round((torch.cuda.memory_allocated() if DEVICE == 'cuda' else 0) / GB, 2)

    g = torch.Generator().manual_seed(args.seed)
    n = args.steps * args.batch_size
    ids = torch.randint(0, 32000, (n + 32, args.seq_len), generator=g)
    mask = torch.ones_like(ids)
    cal = Calibration(TokenBatches(ids[:n], mask[:n]), TokenBatches(ids[n:], mask[n:]), "random-token-ids")
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = distill_scales(delta, base, ft, cal, steps=args.steps, batch_size=args.batch_size, lr=1e-4, progress=False)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    res["distill_s"] = round(time.perf_counter() - t0, 1)
    res["distill_loop_s"] = out.info["distillation"]["seconds"]
    res["distillation"] = out.info["distillation"]
    res["peak_gpu_gb_distill"] = round((torch.cuda.max_memory_allocated() if DEVICE == 'cuda' else 0) / GB, 2)
    res["peak_gpu_reserved_gb"] = round((torch.cuda.max_memory_reserved() if DEVICE == 'cuda' else 0) / GB, 2)
    res["total_s"] = round(res["compress_s"] + res["load_both_models_s"] + res["distill_s"], 1)
    res["meets_time_goal"] = res["total_s"] <= 300
    res["meets_memory_goal"] = res["peak_gpu_gb_distill"] <= 40
    save()
    if os.environ.get("KEEP_7B") != "1":
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
