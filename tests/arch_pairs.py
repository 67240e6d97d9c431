"""Tiny random base/fine-tune pairs of every architecture family bitdelta must handle, on disk.

Dense families and mixture-of-experts families (fused 3-D expert weights in the model, stored per
expert or fused in the checkpoint). The fine-tune moves every parameter, so any tensor a delta
failed to carry shows up as a difference.

    base_dir, ft_dir = make_arch_pair("mixtral", tmp_path)
"""

from __future__ import annotations

import copy
import warnings

import torch
import transformers

VOCAB = 61
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=40, max_position_embeddings=64)
_MOE = dict(num_experts_per_tok=2)


def arch_config(arch: str):
    c = _COMMON
    if arch == "llama":
        return transformers.LlamaConfig(**c)
    if arch == "mistral":
        return transformers.MistralConfig(**c)
    if arch == "qwen2":
        return transformers.Qwen2Config(**c)
    if arch == "qwen3":
        return transformers.Qwen3Config(**c, head_dim=8)
    if arch == "gemma2":
        return transformers.Gemma2Config(**c, head_dim=8)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(**c, head_dim=8)
    if arch == "phi3":
        return transformers.Phi3Config(**{**c, "num_key_value_heads": 4}, pad_token_id=0)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    if arch == "olmo2":
        return transformers.Olmo2Config(**c, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":
        return transformers.MixtralConfig(**c, num_local_experts=4, **_MOE)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**c, head_dim=8, moe_intermediate_size=24, num_experts=4, **_MOE)
    if arch == "gpt_oss":
        return transformers.GptOssConfig(**{**c, "intermediate_size": 32}, head_dim=8, num_local_experts=4, **_MOE)
    if arch == "olmoe":
        return transformers.OlmoeConfig(**c, num_experts=4, **_MOE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**c, "num_key_value_heads": 4}, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
            n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **_MOE)
    raise ValueError(arch)


DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "olmo2"]
MOE = ["mixtral", "qwen3_moe", "gpt_oss", "olmoe", "deepseek_v3"]
ARCHS = DENSE + MOE


def make_arch_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = arch_config(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        # random init leaves some tensors (expert weights, norms) constant or empty: give every
        # parameter a spread so that base and fine-tune differ everywhere
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@torch.no_grad()
def finetune_of(base, seed: int = 1, scale: float = 0.05):
    """Every parameter and stored buffer moved by small noise relative to its spread."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    persistent = set(ft.state_dict())
    tensors = list(ft.parameters()) + [b for n, b in ft.named_buffers() if n in persistent and b.is_floating_point()]
    for p in tensors:  # parameters and stored buffers (e.g. a router's score-correction bias)
        spread = p.float().std() if p.numel() > 1 else p.float().abs()
        p.add_(torch.randn(p.shape, generator=g) * scale * (spread + 1e-3))
    return ft.eval()


def make_arch_pair(arch: str, tmp_path, seed: int = 0, **overrides):
    base = make_arch_model(arch, seed, **overrides)
    ft = finetune_of(base, seed + 1)
    base_dir, ft_dir = tmp_path / f"{arch}-base", tmp_path / f"{arch}-ft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(base_dir)
        ft.save_pretrained(ft_dir)
    return base_dir, ft_dir


def load_model(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def byte_tokenizer():
    """A byte-level tokenizer (3 specials + 256 bytes) built locally, for CLI runs that tokenize."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(["<s>", "</s>", "<pad>"])}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=64)
