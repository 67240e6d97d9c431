"""Tiny random Hugging Face models of several architectures, built locally (nothing downloaded).

    base, ft = make_pair("llama", tmp_path)            # two model dirs on disk
    base, ft = make_pair("gpt2", tmp_path, extra_vocab=3)  # fine-tune with added tokens
"""

from __future__ import annotations

import copy
import warnings

import torch
import transformers

VOCAB = 97  # odd on purpose


def tiny_config(arch: str, tie: bool | None = None):
    common = dict(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=56, max_position_embeddings=64)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True if tie is None else tie)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, tie_word_embeddings=False if tie is None else tie)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie)
    elif arch == "gemma":
        cfg = transformers.GemmaConfig(**common, head_dim=10, tie_word_embeddings=True if tie is None else tie)
    elif arch == "phi3":
        cfg = transformers.Phi3Config(**{**common, "num_key_value_heads": 4}, pad_token_id=0,
                                      tie_word_embeddings=False if tie is None else tie)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=40, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0,
                                      tie_word_embeddings=True if tie is None else tie)
    else:
        raise ValueError(arch)
    return cfg


ARCHS = ["llama", "mistral", "qwen2", "gemma", "gpt2", "phi3"]


def make_model(arch: str, seed: int = 0, tie: bool | None = None):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, tie))
    return model.eval()


@torch.no_grad()
def finetune_like(base, seed: int = 1, scale: float = 0.02, extra_vocab: int = 0):
    """A 'fine-tune': every parameter moved by small random noise (relative to its spread)."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for p in ft.parameters():
        spread = p.float().std() if p.numel() > 1 else p.float().abs()
        p.add_(torch.randn(p.shape, generator=g) * scale * (spread + 1e-3))
    if extra_vocab:
        ft.resize_token_embeddings(base.config.vocab_size + extra_vocab, mean_resizing=False)
        emb = ft.get_input_embeddings().weight
        emb[-extra_vocab:] = torch.randn(extra_vocab, emb.shape[1], generator=g) * 0.02
        head = ft.get_output_embeddings()
        if head is not None and head.weight is not emb:
            head.weight[-extra_vocab:] = torch.randn(extra_vocab, head.weight.shape[1], generator=g) * 0.02
    return ft.eval()


def make_pair(arch: str, tmp_path, extra_vocab: int = 0, tie: bool | None = None, seed: int = 0):
    base = make_model(arch, seed, tie)
    ft = finetune_like(base, seed + 1, extra_vocab=extra_vocab)
    base_dir, ft_dir = tmp_path / f"{arch}-base", tmp_path / f"{arch}-ft"
    base.save_pretrained(base_dir)
    ft.save_pretrained(ft_dir)
    return base_dir, ft_dir


def load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()
