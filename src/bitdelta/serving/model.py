"""The served model: where the engine gets it (:class:`DeltaModel`, a module tree per family).

The model itself lives in :mod:`bitdelta.serving.models` (shared blocks in ``models/common.py``, one
file per family); a step's metadata in :mod:`bitdelta.serving.mapping`, the paged KV cache in
:mod:`bitdelta.serving.kv_cache`. This module keeps the names
callers built on: :class:`DeltaLlama` builds a Llama-layout model straight from tensors (what the
serving benchmark does, with random weights made on the device), and ``DeltaLlama.from_hf`` serves
any supported family.

    model = DeltaModel.from_hf(hf_model, device="cpu")
    kv = KVCache(model.num_layers, max_batch, max_len, model.kv_heads, model.head_dim, model.dtype, device)
    batch = BatchMapping.build([(kv_slot, start_pos, new_token_ids, delta_slot), ...], device, kv)
    logits = model.forward(batch, kv, deltas)   # [num_sequences, vocab (+ extra rows)]
"""

from __future__ import annotations

import torch

from .mapping import AttentionPlan, BatchMapping, KVCache
from .models import SUPPORTED, DeltaModel, UnsupportedModel
from .models.common import SDPA_BACKENDS, Arch


class DeltaLlama(DeltaModel):
    """A Llama-layout :class:`DeltaModel` from raw tensors: ``weights`` (module name -> matrix),
    ``params1d`` (parameter name -> 1-D tensor), one rotary table."""

    def __init__(self, cfg, weights: dict[str, torch.Tensor], params1d: dict[str, torch.Tensor],
                 inv_freq: torch.Tensor, attention_scaling: float, tied: bool, dtype, device):
        tensors = {f"{n}.weight": w for n, w in weights.items()}
        tensors.update(params1d)
        if tied:
            tensors.pop("lm_head.weight", None)
        n = cfg.num_hidden_layers
        arch = Arch("llama", windows=[None] * n, rope_keys=["default"] * n)
        super().__init__(cfg, arch, tensors, {"default": (inv_freq, attention_scaling)}, dtype, device)


__all__ = ["AttentionPlan", "BatchMapping", "DeltaLlama", "DeltaModel", "KVCache", "SDPA_BACKENDS", "SUPPORTED",
           "UnsupportedModel"]
