"""Mistral: the Llama layout with a sliding window on every layer (``sliding_window``), applied as
an attention mask: a token sees itself and the ``window - 1`` positions before it."""

from __future__ import annotations

from .common import Arch, layer_windows
from .llama import check_act

MODEL_TYPES = ("mistral",)


def arch(cfg) -> Arch:
    return Arch("mistral", act=check_act(cfg), windows=layer_windows(cfg),
                rope_keys=["default"] * cfg.num_hidden_layers)
