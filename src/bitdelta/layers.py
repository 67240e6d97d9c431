"""Modules that compute ``base(x) + Δ̂ x`` on the fly, leaving the base weights untouched.

:class:`DeltaWrapper` stands in for one ``nn.Linear``, ``Conv1D`` or ``nn.Embedding``. It
re-registers the wrapped module's own ``weight``/``bias`` parameters under the same names (so
``state_dict`` keys and weight tying are unchanged), runs the wrapped module's own forward for
the base term (keeping quirks such as Gemma's scaled embeddings), and adds the delta term:

- linear / Conv1D: ``y = base(x) + x Δ̂ᵀ`` (``delta_matmul.delta_linear``: differentiable, unpacks on the fly),
  plus ``(x Aᵀ) Bᵀ`` when the packed module has a low-rank correction (two thin products, never B·A)
- embedding: ``y = base(ids) + Δ̂[ids]`` with rows the base lacks taken from ``extra_rows``
- output head with added tokens: the extra rows' logits are appended.

Matrices that live elsewhere (fused mixture-of-experts parameters ``[E, a, b]``, MoE routers that
are not ``nn.Linear``) get a :class:`DeltaParametrization` instead: the parameter reads as
``W_base + Δ̂`` (every expert's own Δ̂ in its slice), computed from the packed signs and the current
scales, so each routed token meets its expert's fine-tuned matrix, gradients reach the scales, and
the base tensor itself is never written.

    wrapper = DeltaWrapper(model.model.layers[0].mlp.up_proj, packed, kind="linear")
    register_parametrization(experts, "gate_up_proj", DeltaParametrization({"...[0]": (0, packed0), ...}))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .binarize import expand_scale, reconstruct
from .delta import PackedModule
from .delta_matmul import delta_linear
from .pack import unpack_signs
from .targets import CONV1D, EMBEDDING


def delta_rows(packed: PackedModule, rows: torch.Tensor) -> torch.Tensor:
    """Float32 Δ̂[rows] for a vocabulary matrix (row scales): ``[..., in]``."""
    flat = rows.reshape(-1)
    total = None
    for p in range(packed.bits):
        signs = unpack_signs(packed.sign[p].index_select(0, flat), packed.in_features)
        scale = packed.scale[p]
        if packed.mode == "row":
            term = signs * scale.index_select(0, flat)[:, None]
        else:
            term = signs * expand_scale(scale, packed.mode)
        total = term if total is None else total + term
    return total.reshape(*rows.shape, packed.in_features)


class DeltaWrapper(nn.Module):
    """A compressed layer: the original module's forward plus a packed delta term."""

    def __init__(self, base: nn.Module, packed: PackedModule, kind: str):
        super().__init__()
        # Kept out of the module tree on purpose: its parameters are re-registered below under
        # their original names, so the wrapper is invisible to state_dict and weight tying.
        object.__setattr__(self, "base_module", base)
        self.kind = kind
        self.weight = base.weight
        if getattr(base, "bias", None) is not None:
            self.bias = base.bias
        self.packed = packed
        self.base_rows = packed.out_features
        for attr in ("in_features", "out_features", "num_embeddings", "embedding_dim", "padding_idx", "nf"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def extra_repr(self) -> str:
        p = self.packed
        extra = f", extra_rows={p.extra_rows.shape[0]}" if p.extra_rows is not None else ""
        return f"kind={self.kind}, mode={p.mode}, bits={p.bits}, shape=({p.out_features}, {p.in_features}){extra}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == EMBEDDING:
            return self._embed(x)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        p = self.packed
        if self._fused_ok(x):
            return self._with_lowrank(x, self._fused(x))
        y = self.base_module(x)
        y = y + delta_linear(x, p.sign, p.scale, p.mode, p.in_features).to(y.dtype)
        y = self._with_lowrank(x, y)
        if p.extra_rows is not None:
            y = torch.cat([y, F.linear(x, p.extra_rows.to(x.dtype))], dim=-1)
        return y

    def _with_lowrank(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + (x Aᵀ) Bᵀ`` over the base's rows when the delta has a low-rank correction (fixed: no
        gradient reaches A or B)."""
        p = self.packed
        if p.lowrank_a is None:
            return y
        a, b = p.lowrank_a.to(x.dtype), p.lowrank_b.to(x.dtype)
        return y + F.linear(F.linear(x, a), b).to(y.dtype)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """On CUDA, inference through plain nn.Linear goes to the fused multi-tenant kernels."""
        p = self.packed
        return (x.is_cuda and self.kind == "linear" and type(self.base_module) is nn.Linear
                and p.extra_rows is None and x.dtype in (torch.float16, torch.bfloat16)
                and not (torch.is_grad_enabled() and (p.scale.requires_grad or x.requires_grad)))

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        from .ops import bitdelta_linear, bitdelta_linear_segmented

        p = self.packed
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        signs, scales = p.sign.unsqueeze(0), p.scale.float().unsqueeze(0)
        t = x2.shape[0]
        if t <= 64:  # decode-sized: the batched kernel with every token on tenant 0
            ids = torch.zeros(t, dtype=torch.int32, device=x.device)
            y = bitdelta_linear(x2, self.weight, self.base_module.bias, signs, scales, p.mode, ids)
        else:  # prefill: one segment of one tenant
            starts = torch.tensor([0, t], dtype=torch.int32, device=x.device)
            seg = torch.zeros(1, dtype=torch.int32, device=x.device)
            y = bitdelta_linear_segmented(x2, self.weight, self.base_module.bias, signs, scales, p.mode, starts, seg)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.packed
        in_base = ids < self.base_rows
        safe = torch.where(in_base, ids, torch.zeros_like(ids))
        y = self.base_module(safe)
        # Scaled embeddings (Gemma) multiply inside their forward; scale the delta the same way.
        scale = getattr(self.base_module, "embed_scale", None)
        d = delta_rows(p, safe)
        if scale is not None:
            d = d * (scale.float() if torch.is_tensor(scale) else float(scale))
        y = y + d.to(y.dtype)
        if p.extra_rows is not None:
            extra_ids = (ids - self.base_rows).clamp(min=0, max=p.extra_rows.shape[0] - 1)
            extra = F.embedding(extra_ids, p.extra_rows).to(y.dtype)
            if scale is not None:
                extra = extra * scale
            y = torch.where(in_base[..., None], y, extra)
        return y



class _PackedDelta(torch.autograd.Function):
    """Dense float32 Δ̂ from packed bits, differentiable in the scales. Backward recomputes the signs
    from the bits rather than keeping them unpacked (32 bits per weight) for every expert."""

    @staticmethod
    def forward(ctx, sign, scale, mode, in_features):
        ctx.mode, ctx.in_features = mode, in_features
        ctx.save_for_backward(sign, scale)
        return reconstruct(sign, scale.detach(), in_features, mode)

    @staticmethod
    def backward(ctx, grad):
        sign, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        g = grad.float()
        out = torch.zeros(scale.shape, dtype=torch.float32, device=scale.device)
        for p in range(sign.shape[0]):
            prod = g * unpack_signs(sign[p], ctx.in_features)
            out[p] = prod.sum() if ctx.mode == "scalar" else prod.sum(1) if ctx.mode == "row" else prod.sum(0)
        return None, out.to(scale.dtype), None, None


def packed_delta(sign: torch.Tensor, scale: torch.Tensor, mode: str, in_features: int) -> torch.Tensor:
    """Float32 Δ̂ (out × in) of one packed matrix; gradients reach ``scale``."""
    return _PackedDelta.apply(sign, scale, mode, in_features)


class DeltaParametrization(nn.Module):
    """``W -> W + Δ̂`` for one parameter holding one matrix (index None) or one per expert.

    ``entries`` maps each delta entry name to ``(expert index or None, PackedModule)``; a packed
    module of kind ``conv1d`` is stored in × out in the parameter, so its Δ̂ is transposed. Without
    gradients the result is cached until the base tensor or a scale changes (an experts forward may
    read the parameter once per expert).
    """

    def __init__(self, entries: dict[str, tuple[int | None, PackedModule]]):
        super().__init__()
        self.entries = dict(entries)
        self._cache = None

    def set_packed(self, name: str, packed: PackedModule) -> None:
        index, _ = self.entries[name]
        self.entries[name] = (index, packed)
        self._cache = None

    @property
    def packed(self) -> list[PackedModule]:
        return [p for _, p in self.entries.values()]

    def _key(self, w: torch.Tensor):
        return [(w, w._version)] + [(t, t._version) for p in self.packed
                                    for t in (p.scale, p.lowrank_a) if t is not None]

    def _cached(self, key):
        if self._cache is None or len(self._cache[0]) != len(key):
            return None
        if all(a is b and va == vb for (a, va), (b, vb) in zip(self._cache[0], key)):
            return self._cache[1]
        return None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        if not grad:
            key = self._key(w)
            hit = self._cached(key)
            if hit is not None:
                return hit
        out = w + self._delta(w).to(w.dtype)
        self._cache = None if grad else (key, out)
        return out

    def _delta(self, w: torch.Tensor) -> torch.Tensor:
        def one(p: PackedModule) -> torch.Tensor:
            d = packed_delta(p.sign, p.scale, p.mode, p.in_features)
            if p.lowrank_a is not None:  # the fixed low-rank correction B·A
                d = d + p.lowrank_b.float() @ p.lowrank_a.float()
            return d.t() if p.kind == CONV1D else d

        if len(self.entries) == 1 and next(iter(self.entries.values()))[0] is None:
            return one(next(iter(self.entries.values()))[1])
        by_index = {i: p for i, p in self.entries.values()}
        parts = [one(by_index[e]) if e in by_index else torch.zeros(w.shape[1:], device=w.device)
                 for e in range(w.shape[0])]
        return torch.stack(parts)
