"""Phi-3 and Phi-4 (``model_type`` phi3): fused ``qkv_proj`` and ``gate_up_proj`` matrices, each one
matrix with one delta (the artifact compresses the fused module as one matrix), split after the
multi-tenant call; partial rotary dimensions (``partial_rotary_factor``); an optional sliding window
on every layer."""

from __future__ import annotations

from .common import Arch, layer_windows
from .llama import check_act

MODEL_TYPES = ("phi3",)


def arch(cfg) -> Arch:
    return Arch("phi3", act=check_act(cfg), fused_qkv=True, fused_gate_up=True, windows=layer_windows(cfg),
                rope_keys=["default"] * cfg.num_hidden_layers)
