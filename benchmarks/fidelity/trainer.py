"""The fine-tunes: one full fine-tune of the base per domain with one fixed, seeded recipe (every
parameter trained, AdamW, packed blocks, linear warmup + cosine, bf16 autocast over fp32 weights on
a GPU); the hard domains use their own peak lr and epochs (``HARD_RECIPES``).

    record = finetune(args, work / "base", work / "finetunes" / "gsm8k", "gsm8k", tokenizer)
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from bitdelta.atomic import atomic_directory

from .data import domain_docs, pack_blocks
from .settings import HARD_RECIPES, log


def lr_at(step: int, total: int, args, peak: float | None = None) -> float:
    """Linear warmup, then cosine from the peak lr (--ft-lr, or a hard recipe's) down to --ft-min-lr-ratio of it."""
    peak = args.ft_lr if peak is None else peak
    warm = max(1, int(round(total * args.ft_warmup)))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = args.ft_min_lr_ratio
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def finetune(args, base_dir: Path, out_dir: Path, domain: str, tok) -> dict:
    """One full fine-tune with the fixed recipe; returns its record (tokens, steps, losses, time)."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    train_docs, held = domain_docs(args.data, domain)
    hard = HARD_RECIPES.get(domain, {}) if not args.smoke else {}
    epochs, ft_lr = hard.get("epochs", args.ft_epochs), hard.get("lr", args.ft_lr)
    if args.ft_max_docs:
        train_docs = train_docs[: args.ft_max_docs]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(args.device)
    seq_len = min(args.ft_seq_len, int(getattr(model.config, "max_position_embeddings", args.ft_seq_len)))
    blocks = pack_blocks(tok, train_docs, seq_len, args.seed)
    total = math.ceil(len(blocks) / args.ft_batch) * epochs
    if args.ft_max_tokens:
        total = min(total, max(1, args.ft_max_tokens // (args.ft_batch * seq_len)))
    log(f"{domain}: {len(train_docs)} training docs -> {len(blocks)} blocks of {seq_len} tokens "
        f"({blocks.numel():,} tokens per epoch); {total} steps of {args.ft_batch} blocks, "
        f"{epochs} epoch(s), lr {ft_lr:g}")
    losses, tokens, train_s = train(args, model, blocks, total, ft_lr, domain)
    save_finetune(model, base_dir, out_dir, domain)
    cuda = args.dev.on_gpu
    record = {
        "domain": domain, "train_docs": len(train_docs), "heldout_docs_total": len(held), "seq_len": seq_len,
        "batch_blocks": args.ft_batch, "epochs": epochs, "steps": total, "tokens": tokens,
        "tokens_per_epoch": int(blocks.numel()), "lr": ft_lr, "hard": domain in HARD_RECIPES,
        "schedule": "linear warmup + cosine",
        "warmup_fraction": args.ft_warmup, "min_lr_ratio": args.ft_min_lr_ratio, "optimizer":
        "AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0, grad clip 1.0", "precision":
        "bf16 autocast, fp32 weights" if cuda else "fp32", "seed": args.seed, "loss_curve": losses,
        "first_loss": losses[0][1], "last_loss": losses[-1][1], "train_s": round(train_s, 1),
        "tokens_per_s": round(tokens / train_s),
    }
    del model
    if cuda:
        torch.cuda.empty_cache()
    log(f"{domain}: fine-tuned in {train_s:.1f}s ({record['tokens']:,} tokens), loss {record['first_loss']:.3f} -> "
        f"{record['last_loss']:.3f}; saved {out_dir} ({time.perf_counter() - t0:.1f}s with data and saving)")
    return record


def train(args, model, blocks: torch.Tensor, total: int, ft_lr: float, domain: str):
    """``total`` AdamW steps over ``blocks`` in a fresh seeded order each epoch; returns the logged
    (step, mean loss) pairs, the tokens trained on and the seconds taken."""
    torch.manual_seed(args.seed)
    model.train()
    model.config.use_cache = False
    cuda = args.dev.on_gpu
    opt = torch.optim.AdamW(model.parameters(), lr=ft_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            **({"fused": True} if cuda else {}))
    gen = torch.Generator().manual_seed(args.seed)
    losses, step, tokens, window = [], 0, 0, []
    t_train = time.perf_counter()
    while step < total:
        order = torch.randperm(len(blocks), generator=gen)  # a fresh seeded order every epoch
        for start in range(0, len(order), args.ft_batch):
            if step >= total:
                break
            ids = blocks[order[start:start + args.ft_batch]].to(args.device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args, ft_lr)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += ids.numel()
            window.append(loss.detach())
            if step % args.log_every == 0 or step == total or step == 1:
                mean = float(torch.stack(window).float().mean())
                losses.append((step, mean))
                window = []
                rate = tokens / (time.perf_counter() - t_train)
                eta = (total - step) * ids.numel() / rate
                log(f"{domain}: step {step}/{total} loss {mean:.4f} lr {lr_at(step - 1, total, args, ft_lr):.2e} "
                    f"{rate:,.0f} tok/s, eta {eta:.0f}s")
    args.dev.sync()
    return losses, tokens, time.perf_counter() - t_train


def save_finetune(model, base_dir: Path, out_dir: Path, domain: str) -> None:
    """The fine-tune as a model dir beside its base: its weights and config, the base's tokenizer files."""
    model.eval()
    model.config.use_cache = True
    model.config._name_or_path = f"SmolLM2-135M-Instruct-{domain}-ft"
    files = {f.name: f.read_bytes() for f in base_dir.iterdir()
             if f.is_file() and not f.name.endswith(".safetensors")
             and f.name not in ("config.json", "generation_config.json")}
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
