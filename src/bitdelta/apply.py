"""Putting a delta onto a base model: ``apply`` (on the fly) and ``merge`` (dense weights).

Both first check the base fingerprint, so a delta applied to the wrong model is a clear
:class:`WrongBaseError` naming both models, never garbage text (a delta compressed against a
quantized base matches only that base, loaded dequantized, and the error says so), and then the delta's values
against the base (:func:`bitdelta.validate.check_delta_values`: finite, no absurd scales, dense
shapes as the base's), so a corrupt delta changes nothing.

- ``apply(model, delta)`` swaps each compressed module for a :class:`DeltaWrapper` computing
  ``x W_baseᵀ + Δ̂ x`` and points changed dense parameters (norms, biases) at the fine-tune's
  values, without writing into any base tensor; ``unapply(model)`` restores the base exactly.
  Matrices that are not a module's own weight (each expert's slice of fused mixture-of-experts
  parameters, MoE routers) get a :class:`DeltaParametrization`: the parameter reads as
  ``W_base + Δ̂``, so every routed token meets its expert's fine-tuned matrix.
- Aliasing: when the delta's tensors are already on the model's device, ``apply`` installs the
  delta's own :class:`PackedModule` objects (no copies): a scale written to an applied module
  (``applied_holders(model)[name].packed.scale = ...``) is the delta's scale. ``distill_scales``
  trains scales this way and returns the delta it applied; ``choose_modes`` swaps modules with
  :func:`set_applied_packed`. On another device ``apply`` works on moved copies and the caller's
  delta is never changed.
- A module with a low-rank correction (``lowrank.py``) adds ``(x Aᵀ) Bᵀ`` in its wrapper, and its
  parametrization reads as ``W_base + Δ̂ + B·A``; the factors are fixed (distillation trains the scales
  around them).
- ``merge(model, delta)`` writes ``W_base + Δ̂`` (with ``B·A`` when present: ``PackedModule.dense``)
  into the weights (Δ̂ computed in float32, cast to the weight dtype, then added, as the reference
  implementation does) and returns the model, ready for ``save_pretrained``. A delta of a model
  against itself merges to the base exactly.

    model = bitdelta.apply(base_model, delta)      # or: merged = bitdelta.merge(base_model, delta)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .delta import Delta, PackedModule
from .errors import BitDeltaError, WrongBaseError
from .layers import DeltaParametrization, DeltaWrapper
from .naming import split_entry
from .targets import CONV1D, module_kind
from .validate import check_delta_values

_RESTORE_ATTR = "_bitdelta_restore"


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", "") or type(model).__name__


def locate(model: nn.Module, name: str) -> tuple[nn.Module, str, int | None]:
    """Where delta entry ``name`` lives: ``(owner module, parameter attribute, expert index)``.

    A module name means its ``weight``; ``"<param>[<e>]"`` is expert ``e`` of a fused parameter."""
    pname, index = split_entry(name)
    if index is None:
        try:
            module = model.get_submodule(pname)
            if getattr(module, "weight", None) is not None:
                return module, "weight", None
        except AttributeError:
            pass
    owner_name, _, attr = pname.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        raise AttributeError(f"the model has no module {owner_name!r} for delta entry {name!r}") from None
    if not isinstance(getattr(owner, attr, None), torch.Tensor):
        raise AttributeError(f"the model has no parameter {pname!r} for delta entry {name!r}")
    return owner, attr, index


def _canonical_weight(model: nn.Module, name: str, packed: PackedModule) -> torch.Tensor:
    """The base matrix of entry ``name`` as out × in."""
    owner, attr, index = locate(model, name)
    w = getattr(owner, attr)
    if index is not None:
        w = w[index]
    return w.t() if packed.kind == CONV1D else w


def verify_base(model: nn.Module, delta: Delta) -> None:
    """Raises :class:`WrongBaseError`/:class:`ShapeMismatchError` unless ``model`` is the delta's base."""
    live = {}
    for name, packed in delta.modules.items():
        try:
            live[name] = _canonical_weight(model, name, packed).detach()
        except (AttributeError, IndexError):
            continue  # reported as missing by verify
    experts_missing = [n for n in delta.modules if n not in live and split_entry(n)[1] is not None]
    if experts_missing:
        made_with = (delta.info.get("compression") or {}).get("transformers_version") or "?"
        raise WrongBaseError(
            f"delta {delta.artifact_path or delta.finetuned_model_name_or_path!r} holds expert "
            f"matrices such as {experts_missing[0]!r} (fused experts, as transformers {made_with} builds the "
            f"model), but model {_model_name(model)!r} has no such parameter. Load the base "
            f"{delta.base_model_name_or_path!r} with a transformers version that fuses experts (5.x).")
    try:
        delta.fingerprint.verify(
            live,
            delta_name=delta.artifact_path or delta.finetuned_model_name_or_path,
            base_name=delta.base_model_name_or_path,
            model_name=_model_name(model),
        )
    except WrongBaseError as e:
        from .quant import mismatch_hint

        hint = mismatch_hint(delta.info, model)  # a quantized base on one side only: say which to load
        if not hint:
            raise
        # the generic advice ("load <base name>") would name the unquantized directory: replaced by the hint
        raise WrongBaseError(str(e).split(" Applying it would produce garbage")[0].rstrip(".") + "." + hint) from None


def _modules_sharing_weight(model: nn.Module, weight: nn.Parameter) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "weight", None) is weight]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _param_owner(model: nn.Module, pname: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = pname.rpartition(".")
    try:
        owner = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        owner = None
    if owner is None or not isinstance(getattr(owner, attr, None), torch.Tensor):
        raise BitDeltaError(f"the model has no parameter {pname!r} that the delta sets")
    return owner, attr


def check_values(model: nn.Module, delta: Delta) -> None:
    """The delta's values against ``model``'s (see :mod:`bitdelta.validate`); raises before any change."""
    base = {}
    for name, packed in delta.modules.items():
        try:  # expert entries ("<param>[<e>]") are checked against their own expert's matrix
            base[name] = _canonical_weight(model, name, packed)
        except (AttributeError, IndexError):
            continue  # a missing module is reported by verify_base / apply itself
    for pname in delta.dense:
        owner, attr = _param_owner(model, pname)
        base[pname] = getattr(owner, attr)
    check_delta_values(delta, base)


def _set_vocab_size(model: nn.Module, delta: Delta) -> None:
    vocab = delta.info.get("vocab_size")
    cfg = getattr(model, "config", None)
    if vocab and cfg is not None:
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        text_cfg.vocab_size = vocab


def apply(model: nn.Module, delta: Delta, check_base: bool = True) -> nn.Module:
    """Makes ``model`` compute the fine-tune on the fly (in place; returns ``model``).

    The base's weight tensors are never written; ``unapply(model)`` undoes everything. A delta on the
    model's device is applied as it is, its PackedModule objects shared with the model (see the module
    docstring, "Aliasing"); one elsewhere is applied as a moved copy.
    """
    if hasattr(model, _RESTORE_ATTR):
        raise BitDeltaError("a delta is already applied to this model; call bitdelta.unapply(model) first")
    if check_base:
        verify_base(model, delta)
    check_values(model, delta)
    device = next(model.parameters()).device
    # PackedModule.to returns the module itself when it is already on ``device``: the aliasing contract
    delta = delta.copy(modules={k: m.to(device) for k, m in delta.modules.items()}, info=delta.info)
    restore = {"modules": {}, "params": [], "buffers": [], "config_vocab": _current_vocab(model)}
    # Dense parameters first, so the wrappers below pick up the fine-tune values too.
    for pname, value in delta.dense.items():
        owner, attr = _param_owner(model, pname)
        old = getattr(owner, attr)
        if attr in owner._buffers:  # a persistent buffer the fine-tune changed (e.g. a router bias)
            restore["buffers"].append((owner, attr, old))
            owner._buffers[attr] = value.to(device=old.device, dtype=old.dtype)
            continue
        new = nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)
        for user in model.modules():
            for a, p in list(user.named_parameters(recurse=False)):
                if p is old:
                    restore["params"].append((user, a, old))
                    setattr(user, a, new)
        if new.dim() >= 1 and old.dim() >= 1 and new.shape[0] != old.shape[0]:
            for attr_name in ("num_embeddings", "out_features"):
                if hasattr(owner, attr_name):
                    setattr(owner, attr_name, new.shape[0])
    by_param: dict[tuple[int, str], tuple[nn.Module, str, dict]] = {}
    restore["holders"] = {}
    for name, packed in delta.modules.items():
        owner, attr, index = locate(model, name)
        if index is not None or module_kind(owner) is None:
            by_param.setdefault((id(owner), attr), (owner, attr, {}))[2][name] = (index, packed)
            continue
        module = owner
        # Tied matrices (embeddings shared with lm_head) get the same delta in every user.
        for user in _modules_sharing_weight(model, module.weight):
            original = model.get_submodule(user)
            if isinstance(original, nn.Embedding):
                kind = "embedding"
            else:
                kind = "conv1d" if packed.kind == CONV1D else "linear"
            restore["modules"][user] = original
            wrapper = DeltaWrapper(original, packed, kind)
            restore["holders"].setdefault(name, wrapper)
            _set_module(model, user, wrapper)
    restore["parametrized"] = []
    for owner, attr, entries in by_param.values():
        holder = DeltaParametrization(entries)
        parametrize.register_parametrization(owner, attr, holder, unsafe=True)
        restore["parametrized"].append((owner, attr))
        for name in entries:
            restore["holders"][name] = holder
    _set_vocab_size(model, delta)
    object.__setattr__(model, _RESTORE_ATTR, restore)
    return model


def unapply(model: nn.Module) -> nn.Module:
    """Removes an applied delta, restoring the exact base modules and parameters."""
    restore = getattr(model, _RESTORE_ATTR, None)
    if restore is None:
        raise BitDeltaError("no delta is applied to this model")
    for owner, attr in reversed(restore.get("parametrized", [])):
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
    for user, attr, old in reversed(restore["params"]):
        setattr(user, attr, old)
    for owner, attr, old in reversed(restore.get("buffers", [])):
        owner._buffers[attr] = old
    for name, original in restore["modules"].items():
        _set_module(model, name, original)
    if restore["config_vocab"] is not None:
        cfg = model.config
        (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).vocab_size = restore["config_vocab"]
    object.__delattr__(model, _RESTORE_ATTR)
    return model


def applied_holders(model: nn.Module) -> dict:
    """Entry name -> the :class:`DeltaWrapper` or :class:`DeltaParametrization` applying it."""
    restore = getattr(model, _RESTORE_ATTR, None)
    if restore is None:
        raise BitDeltaError("no delta is applied to this model")
    return restore["holders"]


def set_applied_packed(model: nn.Module, name: str, packed: PackedModule) -> None:
    """Swaps the packed delta of one applied entry (``--scale auto`` tries row and col per entry)."""
    holder = applied_holders(model)[name]
    if isinstance(holder, DeltaParametrization):
        holder.set_packed(name, packed)
    else:
        holder.packed = packed


def _current_vocab(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    return getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "vocab_size", None)


@torch.no_grad()
def merge(model: nn.Module, delta: Delta, check_base: bool = True, safe: bool = True,
          progress: bool = False) -> nn.Module:
    """Writes ``W_base + Δ̂`` into ``model``'s weights (in place) and returns it.

    Args:
        safe: check every merged tensor for NaN/inf before committing any change.
        progress: show a bar over the modules (a 7B model takes minutes).
    """
    if hasattr(model, _RESTORE_ATTR):
        raise BitDeltaError("this model has a delta applied on the fly; call bitdelta.unapply(model) before merging")
    if check_base:
        verify_base(model, delta)
    check_values(model, delta)
    updates: list[tuple[nn.Parameter, torch.Tensor, nn.Module]] = []
    fused: dict[int, tuple[nn.Parameter, torch.Tensor, nn.Module]] = {}
    for name, packed in tqdm(delta.modules.items(), desc="merge", unit="module", disable=not progress):
        owner, attr, index = locate(model, name)
        weight = getattr(owner, attr)
        dhat = packed.dense().to(weight.device)
        if packed.kind == CONV1D:
            dhat = dhat.t()
        if index is not None:
            # every expert of a fused parameter lands in one copy of it, committed once
            if id(weight) not in fused:
                fused[id(weight)] = (weight, weight.detach().clone(), owner)
            value = fused[id(weight)][1]
            value[index] = value[index] + dhat.to(weight.dtype)
            continue
        merged = weight + dhat.to(weight.dtype)
        if packed.extra_rows is not None and packed.kind != CONV1D:
            merged = torch.cat([merged, packed.extra_rows.to(weight.device, weight.dtype)], dim=0)
        updates.append((weight, merged, owner))
    updates += list(fused.values())
    for pname, value in delta.dense.items():
        owner, attr = _param_owner(model, pname)
        old = getattr(owner, attr)
        updates.append((old, value.to(old.device, old.dtype), owner))
    if safe:
        for _, value, _ in updates:
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise BitDeltaError("merging would produce NaN/inf weights; the delta or base is corrupt. "
                                    "Nothing was changed.")
    for param, value, _ in updates:
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
