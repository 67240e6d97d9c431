"""Gemma, Gemma-2 and Gemma-3 text models.

Shared: RMSNorm scaling by ``(1 + w)`` in float32, GELU-tanh gated MLP, embeddings times
``sqrt(hidden)``, queries scaled by ``query_pre_attn_scalar ** -0.5``. Gemma-2 and -3 add the four-norm
"sandwich" layer, alternating sliding-window and global layers (``layer_types``) and final-logit
soft-capping; Gemma-2 soft-caps attention scores; Gemma-3 adds per-head q/k norms and its own
rotary base for the sliding layers (one rotary table per layer type).
"""

from __future__ import annotations

from .common import ACTIVATIONS, Arch, layer_windows, refuse

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


def arch(cfg) -> Arch:
    kind, n = cfg.model_type, cfg.num_hidden_layers
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act not in ACTIVATIONS or act == "silu":
        raise refuse(cfg, f"hidden_activation {act!r} (supported here: gelu_pytorch_tanh)")
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    a = Arch(kind, act=act, norm_offset=1.0, embed_scale=cfg.hidden_size ** 0.5,
             attn_scale=None if scalar is None else scalar ** -0.5, rope_keys=["default"] * n, windows=[None] * n)
    if kind == "gemma":
        return a
    a.sandwich_norms = True
    a.windows = layer_windows(cfg)
    a.final_softcap = getattr(cfg, "final_logit_softcapping", None)
    if kind == "gemma2":
        a.attn_softcap = getattr(cfg, "attn_logit_softcapping", None)
        return a
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        # Gemma-3's own forward ignores it; refusing beats guessing which behaviour a fine-tune expects.
        raise refuse(cfg, "attn_logit_softcapping on a Gemma-3 model")
    a.qk_norm = True
    a.rope_keys = list(cfg.layer_types)
    return a
