"""Llama and Qwen2: pre-norm decoder, SwiGLU, rotary, grouped-query attention, optional biases
(Qwen2's q/k/v, Llama's ``attention_bias``/``mlp_bias``: taken from the checkpoint's tensors) and
Qwen2's optional sliding-window layers (``layer_types``)."""

from __future__ import annotations

from .common import Arch, layer_windows, refuse

MODEL_TYPES = ("llama", "qwen2")


def check_act(cfg, allowed=("silu",)) -> str:
    act = getattr(cfg, "hidden_act", "silu")
    if act not in allowed:
        raise refuse(cfg, f"hidden_act {act!r} (supported here: {', '.join(allowed)})")
    return act


def arch(cfg) -> Arch:
    n = cfg.num_hidden_layers
    return Arch(cfg.model_type, act=check_act(cfg), windows=layer_windows(cfg), rope_keys=["default"] * n)
