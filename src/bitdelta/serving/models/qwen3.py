"""Qwen3 (dense): the Llama layout plus a per-head RMSNorm on queries and keys before rotary
(``self_attn.q_norm`` / ``k_norm``, gathered per tenant like every norm)."""

from __future__ import annotations

from .common import Arch, layer_windows
from .llama import check_act

MODEL_TYPES = ("qwen3",)


def arch(cfg) -> Arch:
    return Arch("qwen3", act=check_act(cfg), qk_norm=True, windows=layer_windows(cfg),
                rope_keys=["default"] * cfg.num_hidden_layers)
