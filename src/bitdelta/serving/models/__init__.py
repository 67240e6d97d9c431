"""Served architectures: one small file per family, sharing the blocks of :mod:`.common`.

A family file names the Hugging Face ``model_type`` s it serves and turns a config into an
:class:`~.common.Arch` (or refuses the config, naming the feature it does not implement).

    model = DeltaModel.from_hf(hf_model)     # picks the family from hf_model.config.model_type
"""

from __future__ import annotations

from . import gemma, llama, mistral, phi3, qwen3
from .common import Arch, DeltaModel, UnsupportedModel, refuse

FAMILIES = (llama, mistral, qwen3, gemma, phi3)
SUPPORTED = tuple(t for f in FAMILIES for t in f.MODEL_TYPES)


def family_of(cfg):
    """The family module serving ``cfg.model_type`` (raises :class:`UnsupportedModel` for any other)."""
    kind = getattr(cfg, "model_type", None)
    for f in FAMILIES:
        if kind in f.MODEL_TYPES:
            return f
    raise UnsupportedModel(f"the serving engine supports {', '.join(SUPPORTED)} models (got {kind!r}); merge the "
                           "delta with `bitdelta merge --base BASE --delta DELTA --out MERGED` and serve the merged "
                           "model with another server (e.g. vLLM)")


__all__ = ["Arch", "DeltaModel", "FAMILIES", "SUPPORTED", "UnsupportedModel", "family_of", "refuse"]
