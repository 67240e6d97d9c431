"""Helpers shared by the evaluation functions: device lookup, BOS policy, encoding, padding.

Every evaluation function tokenizes with ``add_special_tokens=False`` and adds the BOS token
itself, so the policy is explicit and identical across perplexity, fidelity and tasks:

    add_bos = resolve_add_bos(tokenizer, None)   # True iff the tokenizer adds BOS by default
    ids = encode(tokenizer, "some text", add_bos)
"""

from __future__ import annotations

import torch

# Used when neither the model config nor the tokenizer states a usable context length.
DEFAULT_MAX_LENGTH = 2048


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_max_length(model: torch.nn.Module, tokenizer=None) -> int:
    """The longest sequence the model takes: the config's position limit, else the tokenizer's."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return DEFAULT_MAX_LENGTH


def resolve_add_bos(tokenizer, add_bos: bool | None) -> bool:
    """Whether to prepend BOS. ``None`` means: do what the tokenizer does by default.

    A tokenizer without a BOS token never gets one.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        if add_bos:
            raise ValueError("add_bos=True but the tokenizer has no bos_token; pass add_bos=False")
        return False
    if add_bos is not None:
        return bool(add_bos)
    probe = tokenizer("a")["input_ids"]
    return len(probe) > 0 and probe[0] == bos


def encode(tokenizer, text: str, add_bos: bool) -> list[int]:
    """Token ids of ``text`` without special tokens, with BOS prepended if ``add_bos``."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_bos:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def pad_right(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask``, both ``[B, L]`` long.

    The pad id is 0; padded positions are masked out and never scored by any caller.
    """
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """``model(input_ids, attention_mask).logits`` (``[B, L, V]``), without a KV cache."""
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except TypeError:  # a plain nn.Module that does not take use_cache
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out[0]
