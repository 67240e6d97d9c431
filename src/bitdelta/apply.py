"""Putting a delta onto a base model: ``apply`` (on the fly) and ``merge`` (dense weights).

Both first check the base fingerprint, so a delta applied to the wrong model is a clear
:class:`WrongBaseError` naming both models, never garbage text.

- ``apply(model, delta)`` swaps each compressed module for a :class:`DeltaWrapper` computing
  ``x W_baseᵀ + Δ̂ x`` and points changed dense parameters (norms, biases) at the fine-tune's
  values, without writing into any base tensor; ``unapply(model)`` restores the base exactly.
- ``merge(model, delta)`` writes ``W_base + Δ̂`` into the weights (Δ̂ computed in float32, cast to
  the weight dtype, then added, as the reference implementation does) and returns the model,
  ready for ``save_pretrained``. A delta of a model against itself merges to the base exactly.

    model = bitdelta.apply(base_model, delta)      # or: merged = bitdelta.merge(base_model, delta)
"""

from __future__ import annotations

import torch
from torch import nn

from .delta import Delta, PackedModule
from .errors import BitDeltaError
from .layers import DeltaWrapper
from .targets import CONV1D

_RESTORE_ATTR = "_bitdelta_restore"


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", "") or type(model).__name__


def _canonical_weight(module: nn.Module, packed: PackedModule) -> torch.Tensor:
    w = module.weight
    return w.t() if packed.kind == CONV1D else w


def verify_base(model: nn.Module, delta: Delta) -> None:
    """Raises :class:`WrongBaseError`/:class:`ShapeMismatchError` unless ``model`` is the delta's base."""
    live = {}
    for name, packed in delta.modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # reported as missing by verify
        if getattr(module, "weight", None) is not None:
            live[name] = _canonical_weight(module, packed).detach()
    delta.fingerprint.verify(
        live,
        delta_name=delta.info.get("artifact_path") or delta.finetuned_model_name_or_path,
        base_name=delta.base_model_name_or_path,
        model_name=_model_name(model),
    )


def _modules_sharing_weight(model: nn.Module, weight: nn.Parameter) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "weight", None) is weight]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _param_owner(model: nn.Module, pname: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = pname.rpartition(".")
    try:
        return (model.get_submodule(mod_name) if mod_name else model), attr
    except AttributeError:
        raise BitDeltaError(f"the model has no parameter {pname!r} that the delta sets") from None


def _set_vocab_size(model: nn.Module, delta: Delta) -> None:
    vocab = delta.info.get("vocab_size")
    cfg = getattr(model, "config", None)
    if vocab and cfg is not None:
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        text_cfg.vocab_size = vocab


def apply(model: nn.Module, delta: Delta, check_base: bool = True) -> nn.Module:
    """Makes ``model`` compute the fine-tune on the fly (in place; returns ``model``).

    The base's weight tensors are never written; ``unapply(model)`` undoes everything.
    """
    if hasattr(model, _RESTORE_ATTR):
        raise BitDeltaError("a delta is already applied to this model; call bitdelta.unapply(model) first")
    if check_base:
        verify_base(model, delta)
    device = next(model.parameters()).device
    if any(m.sign.device != device for m in delta.modules.values()):
        delta = Delta(dict(delta.modules), dict(delta.dense), delta.fingerprint, delta.info, delta.files)
        delta.modules = {k: _moved(m, device) for k, m in delta.modules.items()}
    restore = {"modules": {}, "params": [], "config_vocab": _current_vocab(model)}
    # Dense parameters first, so the wrappers below pick up the fine-tune values too.
    for pname, value in delta.dense.items():
        owner, attr = _param_owner(model, pname)
        old = getattr(owner, attr)
        new = nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)
        for user_name, user in model.named_modules():
            for a, p in list(user.named_parameters(recurse=False)):
                if p is old:
                    restore["params"].append((user, a, old))
                    setattr(user, a, new)
        if new.dim() >= 1 and old.dim() >= 1 and new.shape[0] != old.shape[0]:
            for attr_name in ("num_embeddings", "out_features"):
                if hasattr(owner, attr_name):
                    setattr(owner, attr_name, new.shape[0])
    for name, packed in delta.modules.items():
        module = model.get_submodule(name)
        # Tied matrices (embeddings shared with lm_head) get the same delta in every user.
        for user in _modules_sharing_weight(model, module.weight):
            original = model.get_submodule(user)
            kind = "embedding" if isinstance(original, nn.Embedding) else ("conv1d" if packed.kind == CONV1D else "linear")
            restore["modules"][user] = original
            _set_module(model, user, DeltaWrapper(original, packed, kind))
    _set_vocab_size(model, delta)
    object.__setattr__(model, _RESTORE_ATTR, restore)
    return model


def unapply(model: nn.Module) -> nn.Module:
    """Removes an applied delta, restoring the exact base modules and parameters."""
    restore = getattr(model, _RESTORE_ATTR, None)
    if restore is None:
        raise BitDeltaError("no delta is applied to this model")
    for user, attr, old in reversed(restore["params"]):
        setattr(user, attr, old)
    for name, original in restore["modules"].items():
        _set_module(model, name, original)
    if restore["config_vocab"] is not None:
        cfg = model.config
        (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).vocab_size = restore["config_vocab"]
    object.__delattr__(model, _RESTORE_ATTR)
    return model


def _current_vocab(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    return getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "vocab_size", None)


def _moved(m: PackedModule, device) -> PackedModule:
    extra = None if m.extra_rows is None else m.extra_rows.to(device)
    return PackedModule(m.kind, m.mode, m.sign.to(device), m.scale.to(device), m.in_features, m.vocab, extra)


@torch.no_grad()
def merge(model: nn.Module, delta: Delta, check_base: bool = True, safe: bool = True) -> nn.Module:
    """Writes ``W_base + Δ̂`` into ``model``'s weights (in place) and returns it.

    Args:
        safe: check every merged tensor for NaN/inf before committing any change.
    """
    if hasattr(model, _RESTORE_ATTR):
        raise BitDeltaError("this model has a delta applied on the fly; call bitdelta.unapply(model) before merging")
    if check_base:
        verify_base(model, delta)
    updates: list[tuple[nn.Parameter, torch.Tensor, nn.Module]] = []
    for name, packed in delta.modules.items():
        module = model.get_submodule(name)
        weight = module.weight
        dhat = packed.dense().to(weight.device)
        if packed.kind == CONV1D:
            merged = weight + dhat.t().to(weight.dtype)
        else:
            merged = weight + dhat.to(weight.dtype)
            if packed.extra_rows is not None:
                merged = torch.cat([merged, packed.extra_rows.to(weight.device, weight.dtype)], dim=0)
        updates.append((weight, merged, module))
    for pname, value in delta.dense.items():
        owner, attr = _param_owner(model, pname)
        old = getattr(owner, attr)
        updates.append((old, value.to(old.device, old.dtype), owner))
    if safe:
        for param, value, _ in updates:
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise BitDeltaError("merging would produce NaN/inf weights; the delta or base is corrupt. Nothing was changed.")
    for param, value, owner in updates:
        if param.shape == value.shape:
            param.data.copy_(value)
        else:
            param.data = value  # vocabulary grew: every module tied to this parameter sees it
            for m in model.modules():
                if getattr(m, "weight", None) is param:
                    for attr_name in ("num_embeddings", "out_features"):
                        if hasattr(m, attr_name):
                            setattr(m, attr_name, value.shape[0])
    _set_vocab_size(model, delta)
    return model
