"""Compression factor of 1-bit artifacts at the real shapes of Llama-2-7B, Mistral-7B, Llama-3.1-8B,
and of the mixture-of-experts models Mixtral-8x7B and Qwen3-30B-A3B (each expert's matrix its own
sign plane and scales, routers compressed, as `bitdelta.compress` does).

Speed and size do not depend on weight values, so for each architecture we build the exact set of
tensors `bitdelta.compress` would write (random sign bits for every linear, embedding and head,
per-row scales for vocabulary matrices, the chosen scale mode elsewhere, fp16 norms kept dense,
the base fingerprint), save it with the real artifact writer, and compare the bytes on disk with
the fine-tune's fp16 bytes (decimal GB on both sides). Runs on a CPU in about a minute.

    python benchmarks/compression_factor.py [--out /tmp/cf] [--scale scalar] [--bits 1] [--models Mixtral-8x7B]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script: the benchmarks package and the library

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks._common import random_packed_module  # noqa: E402
from bitdelta import __version__  # noqa: E402
from bitdelta.delta import Delta  # noqa: E402
from bitdelta.fingerprint import SAMPLES_PER_MODULE, Fingerprint  # noqa: E402
from bitdelta.sources import meta_model  # noqa: E402
from bitdelta.targets import plan_targets  # noqa: E402

CONFIGS = {
    "Llama-2-7B": transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                           tie_word_embeddings=False),
    "Mistral-7B": transformers.MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                             tie_word_embeddings=False),
    "Llama-3.1-8B": transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                             tie_word_embeddings=False),
    "Mixtral-8x7B": transformers.MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                               num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
    "Qwen3-30B-A3B": transformers.Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                                 moe_intermediate_size=768, num_hidden_layers=48,
                                                 num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                                 num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False),
}


MOE = ("Mixtral-8x7B", "Qwen3-30B-A3B")


def synthetic_delta(config, scale: str, bits: int, dense_embeddings: bool) -> tuple[Delta, int]:
    model = meta_model(config)
    plan = plan_targets(model, dense_embeddings=dense_embeddings)
    params = dict(model.named_parameters())
    stored = dict(model.state_dict(keep_vars=True))  # parameters and persistent buffers
    g = torch.Generator().manual_seed(0)
    modules, samples = {}, {}
    for t in plan.targets:
        shape = tuple(params[t.param].shape)
        if t.index is not None:  # one expert of a fused [E, a, b] parameter
            shape = shape[1:]
        out_f, in_f = reversed(shape) if t.kind == "conv1d" else shape
        modules[t.name] = random_packed_module(t.kind, "row" if t.vocab else scale, out_f, in_f, bits, g, t.vocab)
        samples[t.name] = ((out_f, in_f), torch.randn(SAMPLES_PER_MODULE, generator=g))
    dense = {n: torch.randn(stored[n].shape, generator=g).half() for n in plan.other_params}
    num_params = sum(p.numel() for p in params.values())
    info = {"bitdelta_version": __version__, "base_model_name_or_path": "synthetic-base",
            "finetuned_model_name_or_path": "synthetic-finetune", "finetuned_num_parameters": num_params,
            "model_type": config.model_type, "vocab_size": config.vocab_size,
            "compression": {"scale": scale, "bits": bits, "dense_embeddings": dense_embeddings}}
    return Delta(modules, dense, Fingerprint.from_samples(samples), info), num_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--scale", default="scalar", choices=["scalar", "row", "col"])
    ap.add_argument("--bits", type=int, default=1)
    ap.add_argument("--models", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    scratch = args.out or Path(tempfile.mkdtemp())
    rows = []
    try:
        for name in args.models:
            cfg = CONFIGS[name]
            # the reference rows (embeddings/lm_head dense) only for dense models: the reference
            # compresses nn.Linear modules only, which would leave fused MoE experts out entirely
            for dense_embeddings in ((False,) if name in MOE else (False, True)):
                started = time.perf_counter()
                delta, n = synthetic_delta(cfg, args.scale, args.bits, dense_embeddings)
                path = scratch / f"{name}-{'dense-emb' if dense_embeddings else 'ours'}"
                delta.save_pretrained(path)
                size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                rows.append((name, "dense embeddings (reference)" if dense_embeddings else "bitdelta", n, size,
                             time.perf_counter() - started))
                shutil.rmtree(path)
                del delta
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nscale={args.scale} bits={args.bits}")
    print("| model | embeddings/lm_head | parameters | fp16 fine-tune GB | artifact GB | factor |")
    print("|---|---|---|---|---|---|")
    for name, how, n, size, _ in rows:
        print(f"| {name} | {how} | {n / 1e9:.2f} B | {2 * n / 1e9:.2f} | {size / 1e9:.3f} | {2 * n / size:.1f}x |")


if __name__ == "__main__":
    main()
