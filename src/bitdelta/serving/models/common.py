"""The blocks every served architecture is made of, as ``nn.Module`` s whose matrices are multi-tenant.

A served model is a module tree that mirrors its Hugging Face checkpoint's names (``model.layers.3.
self_attn.q_proj.weight`` is that module's ``weight`` here too), so a delta artifact's module names
are the tree's module names. Each family file (:mod:`.llama`, :mod:`.mistral`, :mod:`.qwen3`,
:mod:`.gemma`, :mod:`.phi3`) turns a config into an :class:`Arch`, the list of features its layers
use; this module builds the tree from an ``Arch`` and the checkpoint's tensors:

* :class:`TenantLinear`: a base matrix (and bias) whose output adds each token's own delta, through
  the step's dispatch (``deltas.linear``); fused projections (Phi-3's ``qkv_proj``, ``gate_up_proj``)
  are one matrix with one delta, split after the call; separate q/k/v and gate/up matrices are
  stacked into one when the model is built (:mod:`.stacked`: one GEMM, one grouped delta op) and
  split the same way. A matrix given as a
  :class:`~bitdelta.serving.quant_linear.QuantizedWeight` (an INT8/FP8 base) becomes a
  :class:`~bitdelta.serving.quant_linear.QuantTenantLinear` instead, which adds the same delta;
* :class:`TenantNorm`: RMSNorm whose weight is gathered per token (a tenant may carry its own);
  ``offset=1`` is Gemma's ``(1 + w)`` scaling, computed in float32 before the cast, as Gemma does;
* :class:`Attention`: grouped-query attention on the paged KV cache (keys and values written
  through each token's flat cache row, decode rows read through their block tables by
  :func:`~bitdelta.serving.paged_decode.paged_decode_attention`), optional per-head q/k norms
  (Qwen3, Gemma-3), partial rotary dimensions (Phi-3), a per-layer sliding window applied as a mask
  (Mistral, Gemma-2/3: the cache keeps every position), logit soft-capping (Gemma-2) and a custom
  query scale; :class:`MLP`: gated, SiLU or GELU-tanh;
* :class:`DecoderLayer` (pre-norm, or Gemma's four-norm "sandwich") and :class:`DeltaModel`, the whole
  model: embedding (optionally scaled), layers, final norm, head (tied or not), final soft-capping.

One forward runs a flattened step (:class:`~bitdelta.serving.mapping.BatchMapping`): the new tokens
of every sequence, each with its tenant's delta slot. Attention uses ``scaled_dot_product_attention``
(not cuDNN's, whose per-shape graph build costs tens of ms of host time at every new key length),
except on soft-capped layers, which SDPA cannot express: those compute scores explicitly.

The fused base path (:func:`fused_base_on`, env ``BITDELTA_FUSED_BASE``; on by default on CUDA when
Triton imports) runs the same computation through the kernels of :mod:`bitdelta.ops.fused_norm`:
each residual add is fused with the norm after it (layer i's MLP output is added inside layer i+1's
input norm, the last one inside the final norm; Gemma's sandwich layers normalise a block's output
first, then add it inside the next norm), RoPE with the paged-cache writes of keys and values, and
the gated activation in one kernel; per-head q/k norms (Qwen3, Gemma-3) run inside the RoPE kernel.
The eager ops remain the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...errors import BitDeltaError
from ...ops import fused_norm
from ..kv_cache import KVCache
from ..mapping import AttentionPlan, BatchMapping
from ..paged_decode import decode_attention
from ..quant_linear import QuantizedWeight, QuantTenantLinear
from .stacked import stack_projections

SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
# Rope types whose frequencies are fixed when the model is built (Hugging Face computes them once);
# "dynamic" and "longrope" change them with the sequence length, which a mixed batch does not have.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
FUSED_BASE_ENV = "BITDELTA_FUSED_BASE"
# MLP activations by the name the fused kernel takes
FUSED_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def fused_base_on(device: torch.device) -> bool:
    """Whether a forward on ``device`` takes the fused base kernels: env ``BITDELTA_FUSED_BASE`` ``1``
    (on; raises where the kernels cannot run), ``0`` (off), unset or ``auto`` (on for CUDA tensors
    when Triton imports, off on a CPU, even under the Triton interpreter)."""
    choice = os.environ.get(FUSED_BASE_ENV, "auto").strip().lower() or "auto"
    if choice == "0":
        return False
    if choice == "auto":
        return device.type == "cuda" and fused_norm.kernels_run(device)
    if choice != "1":
        raise ValueError(f"{FUSED_BASE_ENV} must be 1, 0 or auto (got {choice!r})")
    if not fused_norm.kernels_run(device):
        raise RuntimeError(f"{FUSED_BASE_ENV}=1 needs Triton and CUDA tensors (or TRITON_INTERPRET=1); "
                           f"this model is on {device}")
    return True


class UnsupportedModel(BitDeltaError):
    """The base's config uses a feature the serving engine does not implement."""


def refuse(cfg, feature: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"the serving engine does not implement {feature} ({getattr(cfg, 'model_type', None)!r} base); merge the "
        "delta with `bitdelta merge --base BASE --delta DELTA --out MERGED` and serve the merged model with another "
        "server (e.g. vLLM)")


@dataclass
class Arch:
    """What one family's layers do, read from its config by the family file."""

    family: str
    act: str = "silu"  # MLP activation, a key of ACTIVATIONS
    norm_offset: float = 0.0  # 1.0: Gemma's (1 + w) RMSNorm
    sandwich_norms: bool = False  # Gemma: norms after attention and around the MLP
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before rotary (Qwen3, Gemma-3)
    fused_qkv: bool = False  # Phi-3: one qkv_proj matrix
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj matrix, gate first
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma-2: cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma-2: the same on the logits
    windows: list[int | None] = field(default_factory=list)  # per layer: sliding window or None
    rope_keys: list[str] = field(default_factory=list)  # per layer: which rotary table it uses


def layer_windows(cfg) -> list[int | None]:
    """Per layer, its sliding window (None = global), from ``layer_types`` when the config has them,
    else ``sliding_window`` for every layer (Mistral, Phi-3)."""
    n, window = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [window] * n
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise refuse(cfg, f"layer types {unknown}")
    if "sliding_attention" in types and not window:
        raise refuse(cfg, "sliding-attention layers without a sliding_window")
    return [window if t == "sliding_attention" else None for t in types]


def check_common(cfg) -> None:
    """Refusals every family shares: mixture-of-experts, length-dependent rope, non-causal attention."""
    experts = next((getattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) > 0), None)
    if experts:
        raise UnsupportedModel(
            f"the serving engine does not serve mixture-of-experts models ({getattr(cfg, 'model_type', None)!r} "
            f"with {experts} experts per layer); merge the delta into the base with `bitdelta merge --base BASE "
            "--delta DELTA --out MERGED` and serve the merged model with another server (e.g. vLLM)")
    rp = getattr(cfg, "rope_parameters", None) or {}
    for params in (rp.values() if rp and all(isinstance(v, dict) for v in rp.values()) else [rp]):
        kind = (params or {}).get("rope_type", "default")
        if kind not in STATIC_ROPE:
            raise refuse(cfg, f"rope_type {kind!r} (its frequencies depend on the sequence length; supported: "
                              f"{', '.join(STATIC_ROPE)})")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise refuse(cfg, "use_bidirectional_attention (an encoder, not a causal LM)")
    for key in ("attention_chunk_size", "no_rope_layers"):
        if getattr(cfg, key, None):
            raise refuse(cfg, key)


# ---------------------------------------------------------------------------------------- one step


@dataclass
class Step:
    """What every module needs during one forward: the step's mapping, the KV cache, the dispatch
    (``deltas``: ``linear``, ``gather1d``, ``embed``, ``extra_logits``), and rotary tables per key.
    A mapping built without the cache is bound to it here (its flat cache rows and block tables)."""

    batch: BatchMapping
    kv: KVCache
    deltas: object | None
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fused: bool = False  # the fused base kernels (fused_base_on)

    def __post_init__(self):
        if self.kv is not None:
            self.batch = self.batch.bind(self.kv)

    @property
    def per_tenant(self) -> bool:
        return self.deltas is not None and self.batch.any_delta

    def param(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """A 1-D parameter, per token (``[T, dim]``) when some token has a delta, else the base's."""
        return self.deltas.gather1d(name, self.batch) if self.per_tenant else base

    def param_rows(self, name: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A 1-D parameter as ``(weights, rows)`` for a kernel that gathers: with some token's delta
        and a dispatch that exposes its tables, the ``[slots + 1, dim]`` table and each token's row
        of it (``batch.gather``); else :meth:`param`'s tensor and None."""
        table = getattr(self.deltas, "param_table", None) if self.per_tenant else None
        if table is None:
            return self.param(name, base), None
        return table(name), self.batch.gather


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class TenantLinear(nn.Module):
    """``y = x Wᵀ (+ b)`` plus each token's delta; ``name`` is the module's checkpoint name."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.name = name
        self.weight = _frozen(weight)
        self.bias = None if bias is None else _frozen(bias)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        y = step.deltas.linear(self.name, x, self.weight, step.batch) if step.per_tenant else F.linear(x, self.weight)
        if self.bias is not None:
            y = y + step.param(f"{self.name}.bias", self.bias)
        return y


class TenantNorm(nn.Module):
    """RMSNorm over the last dimension, weight gathered per token; ``offset=1``: Gemma's ``(1 + w)``."""

    def __init__(self, name: str, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.name, self.eps, self.offset = name, eps, offset
        self.weight = _frozen(weight)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        w = step.param(f"{self.name}.weight", self.weight)
        if w.dim() == 2 and x.dim() == 3:  # per-token weights over per-head vectors [T, heads, D]
            w = w[:, None, :]
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:  # Gemma: scale in float32, then cast
            return (xf * (self.offset + w.float())).to(x.dtype)
        return w * xf.to(x.dtype)  # Llama: cast, then scale

    def fused(self, x: torch.Tensor, step: Step, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of ``x [T, D]`` in one kernel; with ``residual``: ``residual += x`` in place first,
        and the norm is of the new residual. A weight of another dtype takes the eager ops."""
        w, rows = step.param_rows(f"{self.name}.weight", self.weight)  # per-tenant rows: gathered in the kernel
        if x.dim() != 2 or w.dtype != x.dtype:
            if residual is None:
                return self(x, step)
            return self(residual.add_(x), step)
        if residual is None:
            return fused_norm.rms_norm(x, w, self.eps, self.offset, weight_rows=rows)
        return fused_norm.add_rms_norm(x, residual, w, self.eps, self.offset, weight_rows=rows)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [T, heads, D]`` over its first ``cos.shape[-1]`` dimensions.

    Hugging Face's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` equals
    ``x * cos + roll(x, d/2) * cat(-sin1, sin2)`` exactly (negation is exact); ``sin`` comes signed.
    """
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + torch.roll(x, d // 2, dims=-1) * sin
    rot, rest = x[..., :d], x[..., d:]  # partial rotary (Phi-3 with partial_rotary_factor < 1)
    return torch.cat((rot * cos + torch.roll(rot, d // 2, dims=-1) * sin, rest), dim=-1)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype):
    """cos and signed sin ``[T, 1, rot_dim]`` for the step's positions (once per step and table)."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(dtype)[:, None, :]
    sin = (emb.sin() * scaling).to(dtype)
    h = sin.shape[-1] // 2
    return cos, torch.cat((-sin[:, :h], sin[:, h:]), dim=-1)[:, None, :]


def _attend(q, k, v, mask, scale, softcap, causal=False):
    """``q [B, H, n, D]`` over ``k, v [B, KV, L, D]``; ``mask`` bool (True = attend), broadcastable to
    ``[B, H, n, L]``, or None with ``causal``. Soft-capped scores are computed explicitly (SDPA has no cap)."""
    gqa = k.shape[1] != q.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale, enable_gqa=gqa)
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if causal and mask is None:
        n, total = q.shape[2], k.shape[2]
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), vf).to(q.dtype)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) visibility ``[nq, nk]``: key j for query i iff j <= i and i - j < window."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok &= k_pos[None, :] > q_pos[:, None] - window
    return ok


class Attention(nn.Module):
    def __init__(self, arch: Arch, layer: int, heads: int, kv_heads: int, head_dim: int, projections: dict,
                 q_norm: TenantNorm | None = None, k_norm: TenantNorm | None = None):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, heads, kv_heads, head_dim
        for key, mod in projections.items():  # q_proj/k_proj/v_proj/o_proj, or qkv_proj/o_proj
            setattr(self, key, mod)
        self.fused = arch.fused_qkv
        # q, k and v stacked into one matrix (built by DeltaModel when they can be; see .stacked)
        self.qkv_stack = None
        self.q_norm, self.k_norm = q_norm, k_norm
        self.window = arch.windows[layer]
        self.scale, self.softcap = arch.attn_scale, arch.attn_softcap
        self.rope_key = arch.rope_keys[layer]

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        t, h, kvh, d = x.shape[0], self.heads, self.kv_heads, self.head_dim
        if self.fused:  # one matrix, one delta: split its output (queries, then keys, then values)
            qkv = self.qkv_proj(x, step)
            q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        elif self.qkv_stack is not None:  # three matrices stacked as one: the same split
            q, k, v = self.qkv_stack(x, step).split([h * d, kvh * d, kvh * d], dim=-1)
        else:
            q, k, v = self.q_proj(x, step), self.k_proj(x, step), self.v_proj(x, step)
        q, k, v = q.reshape(t, h, d), k.reshape(t, kvh, d), v.reshape(t, kvh, d)
        cos, sin = step.rope[self.rope_key]
        if step.fused and step.kv.k.dtype == q.dtype:
            return self.o_proj(self._rope_attention_fused(q, k, v, cos, sin, step), step)
        if self.q_norm is not None:
            q, k = self.q_norm(q, step), self.k_norm(k, step)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(self._attention(q, k, v, step), step)

    def _rope_attention_fused(self, q, k, v, cos, sin, step: Step) -> torch.Tensor:
        """One kernel for the q/k norms (when the layer has them), RoPE, and the keys and values into
        the cache; then attention. Returns ``[T, H*D]``."""
        kc, vc = step.kv.k[self.layer], step.kv.v[self.layer]
        norms = {}
        if self.q_norm is not None:
            wq, rows = step.param_rows(f"{self.q_norm.name}.weight", self.q_norm.weight)
            wk, _ = step.param_rows(f"{self.k_norm.name}.weight", self.k_norm.weight)
            if wq.dtype == wk.dtype == q.dtype:
                norms = dict(q_weight=wq, k_weight=wk, weight_rows=rows, eps=self.q_norm.eps,
                             offset=self.q_norm.offset)
            else:
                q, k = self.q_norm(q, step), self.k_norm(k, step)
        plan = step.batch.attn
        if plan.decode and plan.dec_rows is None:  # a pure decode step reads its keys from the cache
            q = fused_norm.rope_kv_write(q, k, v, cos, sin, kc, vc, step.batch.kv_index, **norms)
            return self._decode(q, kc, vc, plan).reshape(q.shape[0], -1)
        q, k = fused_norm.rope_kv_write(q, k, v, cos, sin, kc, vc, step.batch.kv_index, return_k=True, **norms)
        return self._attention(q, k, v, step, written=True)

    def _attention(self, q, k, v, step: Step, written: bool = False) -> torch.Tensor:
        """q [T, H, D]; k/v [T, KV, D] for the new tokens; returns [T, H*D]. ``written``: the keys and
        values are in the cache already (the fused RoPE wrote them)."""
        batch, kv = step.batch, step.kv
        kc, vc = kv.k[self.layer], kv.v[self.layer]  # [blocks, block_size, KV, D]
        h, nkv, d = self.heads, self.kv_heads, self.head_dim
        if not written:
            # Every new token's key and value go to its own row of the flat view (block * size + offset).
            kc.view(-1, nkv, d).index_copy_(0, batch.kv_index, k.to(kc.dtype))
            vc.view(-1, nkv, d).index_copy_(0, batch.kv_index, v.to(vc.dtype))
        plan = batch.attn
        t = q.shape[0]
        if plan.decode and plan.dec_rows is None:  # a pure decode step: no scatter needed
            return self._decode(q, kc, vc, plan).reshape(t, -1)
        out = q.new_empty(q.shape)
        for row0, g, n in plan.prefill:  # fresh prompts: their cache rows are exactly k, v
            rows = slice(row0, row0 + g * n)
            qs = q[rows].view(g, n, h, d).transpose(1, 2)
            ks = k[rows].view(g, n, nkv, d).transpose(1, 2)
            vs = v[rows].view(g, n, nkv, d).transpose(1, 2)
            mask = None
            if self.window is not None and self.window < n:
                pos = torch.arange(n, device=q.device)
                mask = _window_mask(pos, pos, self.window)
            o = _attend(qs, ks, vs, mask, self.scale, self.softcap, causal=True)
            out[rows] = o.transpose(1, 2).reshape(g * n, h, d)
        if plan.decode:
            out[plan.dec_rows] = self._decode(q[plan.dec_rows], kc, vc, plan)
        for i, blocks in zip(plan.other, plan.other_blocks):  # a sequence continuing with several tokens
            _, start, n = batch.seqs[i]
            o0, total = plan.offsets[i], start + n
            # its context through its block table: [1, KV, L, D]
            keys = kc[blocks].reshape(-1, nkv, d)[:total].permute(1, 0, 2)[None]
            vals = vc[blocks].reshape(-1, nkv, d)[:total].permute(1, 0, 2)[None]
            qi = q[o0:o0 + n].permute(1, 0, 2)[None]  # [1, H, n, D]
            mask = _window_mask(start + torch.arange(n, device=q.device), torch.arange(total, device=q.device),
                                self.window)
            o = _attend(qi, keys, vals, mask, self.scale, self.softcap)
            out[o0:o0 + n] = o[0].permute(1, 0, 2)
        return out.reshape(t, -1)

    def _decode(self, qd, kc, vc, plan: AttentionPlan):
        """Single-token rows ``qd [B, H, D]`` over their cache blocks; returns ``[B, H, D]``."""
        return decode_attention(qd, kc, vc, plan.block_tables, plan.seq_lens, scale=self.scale,
                                window=self.window, softcap=self.softcap, max_len=plan.span)


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``; Phi-3's ``gate_up_proj`` is one matrix, gate first."""

    def __init__(self, arch: Arch, projections: dict):
        super().__init__()
        for key, mod in projections.items():
            setattr(self, key, mod)
        self.fused, self.act = arch.fused_gate_up, ACTIVATIONS[arch.act]
        self.act_name = FUSED_ACTIVATIONS[arch.act]
        self.gate_up_stack = None  # gate and up stacked into one matrix, gate first (see .stacked)

    def _gate_up(self, x: torch.Tensor, step: Step) -> torch.Tensor | None:
        """Gate and up side by side (gate first) when they are one matrix or a stack; else None."""
        if self.fused:
            return self.gate_up_proj(x, step)
        if self.gate_up_stack is not None:
            return self.gate_up_stack(x, step)
        return None

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        gu = self._gate_up(x, step)
        if step.fused:  # act(gate) * up in one kernel
            if gu is not None:
                y = fused_norm.gated_activation(gu, act=self.act_name)
            else:
                y = fused_norm.gated_activation(self.gate_proj(x, step), self.up_proj(x, step), self.act_name)
            return self.down_proj(y, step)
        if gu is not None:
            g, u = gu.chunk(2, dim=-1)
        else:
            g, u = self.gate_proj(x, step), self.up_proj(x, step)
        return self.down_proj(self.act(g) * u, step)


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: Attention, mlp: MLP, norms: dict[str, TenantNorm]):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        for key, mod in norms.items():
            setattr(self, key, mod)
        self.sandwich = "pre_feedforward_layernorm" in norms

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x, step), step)
        if self.sandwich:  # Gemma: normalise each block's output too
            x = x + self.post_attention_layernorm(a, step)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x, step), step), step)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x, step), step)

    def forward_fused(self, residual: torch.Tensor, pending: torch.Tensor | None, step: Step):
        """The layer on the fused path, whose hidden state is ``residual + pending``: ``pending`` is the
        previous layer's MLP output (None before the first layer), added inside this layer's input norm.
        Returns the new ``(residual, pending)``; ``residual`` is updated in place."""
        if pending is None:
            h = self.input_layernorm.fused(residual, step)
        else:
            h = self.input_layernorm.fused(pending, step, residual=residual)
        a = self.self_attn(h, step)
        if self.sandwich:  # Gemma-2/3: each block's output is normalised before it is added
            a = self.post_attention_layernorm.fused(a, step)
            h = self.pre_feedforward_layernorm.fused(a, step, residual=residual)
            return residual, self.post_feedforward_layernorm.fused(self.mlp(h, step), step)
        h = self.post_attention_layernorm.fused(a, step, residual=residual)
        return residual, self.mlp(h, step)


class Backbone(nn.Module):
    """``model.*`` of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, embed_tokens: nn.Parameter, layers: list[DecoderLayer], norm: TenantNorm):
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class DeltaModel(nn.Module):
    """A served base model as a module tree; deltas come in per step through ``deltas``.

        model = DeltaModel.from_hf(hf_model, device="cpu")      # any supported family
        logits = model.forward(batch, kv, deltas)              # [num_sequences, vocab (+ extra rows)]
    """

    def __init__(self, cfg, arch: Arch, tensors: dict[str, torch.Tensor],
                 ropes: dict[str, tuple[torch.Tensor, float]], dtype, device):
        """``tensors``: checkpoint name -> tensor (already on ``device`` in ``dtype``); ``ropes``: per
        rotary key, ``(inv_freq, attention_scaling)``."""
        super().__init__()
        self.config, self.arch = cfg, arch
        self.num_layers = cfg.num_hidden_layers
        self.hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.num_heads
        self.max_len = int(getattr(cfg, "max_position_embeddings", 2048))
        self.dtype, self.device = dtype, torch.device(device)
        self.ropes = {k: (f.float().to(self.device), float(s)) for k, (f, s) in ropes.items()}
        self.inv_freq = next(iter(self.ropes.values()))[0]
        # Gemma multiplies by the scale rounded to the model's dtype (a tensor of that dtype): so do we.
        self.embed_scale = None if arch.embed_scale is None else float(torch.tensor(arch.embed_scale).to(dtype))
        eps = cfg.rms_norm_eps
        used: set[str] = set()

        def take(name):
            used.add(name)
            return tensors[name]

        def linear(name):
            weight, bias = take(f"{name}.weight"), take(f"{name}.bias") if f"{name}.bias" in tensors else None
            if isinstance(weight, QuantizedWeight):
                return QuantTenantLinear(name, weight, bias, dtype)
            return TenantLinear(name, weight, bias)

        def norm(name):
            return TenantNorm(name, take(f"{name}.weight"), eps, arch.norm_offset)

        layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            if arch.fused_qkv:
                proj = {k: linear(p + f"self_attn.{k}") for k in ("qkv_proj", "o_proj")}
            else:
                proj = {k: linear(p + f"self_attn.{k}") for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
            qn = kn = None
            if arch.qk_norm:
                qn, kn = norm(p + "self_attn.q_norm"), norm(p + "self_attn.k_norm")
            attn = Attention(arch, i, self.num_heads, self.kv_heads, self.head_dim, proj, qn, kn)
            keys = ("gate_up_proj", "down_proj") if arch.fused_gate_up else ("gate_proj", "up_proj", "down_proj")
            mlp = MLP(arch, {k: linear(p + f"mlp.{k}") for k in keys})
            if not arch.fused_qkv:
                attn.qkv_stack = stack_projections([proj["q_proj"], proj["k_proj"], proj["v_proj"]], tensors)
            if not arch.fused_gate_up:
                mlp.gate_up_stack = stack_projections([mlp.gate_proj, mlp.up_proj], tensors)
            names = ["input_layernorm", "post_attention_layernorm"]
            if arch.sandwich_norms:
                names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
            layers.append(DecoderLayer(attn, mlp, {n: norm(p + n) for n in names}))
        self.model = Backbone(_frozen(take("model.embed_tokens.weight")), layers, norm("model.norm"))
        self.embed_name = "model.embed_tokens"
        tied = "lm_head.weight" not in tensors or tensors["lm_head.weight"] is tensors["model.embed_tokens.weight"]
        if tied:
            self.head_name, self.lm_head = self.embed_name, None
        else:
            if "lm_head.bias" in tensors:
                raise UnsupportedModel("output heads with a bias are not supported by the serving engine")
            self.head_name, self.lm_head = "lm_head", TenantLinear("lm_head", take("lm_head.weight"))
        used.add("lm_head.weight")
        left = sorted(set(tensors) - used)
        if left:  # a tensor the family's tree has no place for: a feature this engine would silently drop
            raise refuse(cfg, f"tensors {left[:4]}{' ...' if len(left) > 4 else ''} (not part of its "
                              f"{arch.family} layers)")
        self.vocab_size = int(self.model.embed_tokens.weight.shape[0])
        self._head = TenantLinear(self.head_name, self.model.embed_tokens.weight) if tied else self.lm_head
        # the quantized base the weights are, if any ({"scheme", "format", ...}, as bitdelta.quant
        # describes it): deltas made against another base quantization are refused at registration
        self._bitdelta_base_quantization: dict | None = None
        self._index()

    def _index(self) -> None:
        """Checkpoint name -> tensor maps the slots and validation read (the same storage, no copies)."""
        # module name -> [out, in] matrix that takes deltas: a tensor, or a quantized base's QuantizedWeight
        self.weights: dict[str, torch.Tensor | QuantizedWeight] = {}
        self.params1d: dict[str, torch.Tensor] = {}  # parameter name -> [dim] (norm weights, biases)
        for name, p in self.named_parameters(remove_duplicate=True):
            if name.startswith("_head."):
                continue
            if p.dim() == 2:
                self.weights[name.removesuffix(".weight")] = p.data
            else:
                self.params1d[name] = p.data
        for name, m in self.named_modules():
            if isinstance(m, QuantTenantLinear):
                self.weights[name] = m.quantized

    @property
    def base_quantization(self) -> dict | None:
        """The quantized base these weights are (scheme, format, quantized tensors), None for a plain base."""
        return self._bitdelta_base_quantization

    def readable(self) -> "ReadableWeights":
        """Every base matrix (dequantized when read, one at a time) and 1-D parameter by name, as a
        delta sees them: what registration checks a delta's fingerprint and values against."""
        return ReadableWeights(self)

    def quantized_modules(self) -> dict[str, QuantTenantLinear]:
        return {n: m for n, m in self.named_modules() if isinstance(m, QuantTenantLinear)}

    # ------------------------------------------------------------------ construction

    @classmethod
    @torch.no_grad()
    def from_hf(cls, hf_model, device=None, dtype=None) -> "DeltaModel":
        """The served model of a Hugging Face causal LM of a supported family (raises
        :class:`UnsupportedModel`, naming the feature, for anything it does not implement)."""
        from . import family_of

        cfg = hf_model.config
        check_common(cfg)
        family = family_of(cfg)
        arch = family.arch(cfg)
        device = torch.device(device or next(hf_model.parameters()).device)
        dtype = dtype or next(hf_model.parameters()).dtype
        emb = hf_model.get_input_embeddings().weight
        head = hf_model.get_output_embeddings()
        tied = head is None or head.weight is emb or head.weight.data_ptr() == emb.data_ptr()
        tensors = {}
        for name, t in hf_model.state_dict().items():
            if name == "lm_head.weight" and tied:
                continue
            tensors[name] = t.detach().to(device=device, dtype=dtype).contiguous()
        model = DeltaModel(cfg, arch, tensors, rotary_of(hf_model, arch), dtype, device)
        # a quantized base loaded dequantized is still that base: deltas are checked against its scheme
        model._bitdelta_base_quantization = getattr(hf_model, "_bitdelta_base_quantization", None)
        return model

    # ------------------------------------------------------------------ forward

    def delta_modules(self) -> dict[str, tuple[int, int]]:
        """Matrices that take per-tenant 1-bit deltas: name -> (out, in)."""
        return {n: tuple(w.shape) for n, w in self.weights.items()}

    def forward(self, batch: BatchMapping, kv: KVCache, deltas=None) -> torch.Tensor:
        """Runs one step; returns float32 logits ``[num_sequences, vocab + extra]``."""
        if batch.replay is not None:  # a captured CUDA graph with this step's inputs already in place
            return batch.replay()
        return self.forward_eager(batch, kv, deltas)

    @torch.no_grad()
    def forward_eager(self, batch: BatchMapping, kv: KVCache, deltas=None) -> torch.Tensor:
        """The step's computation, op by op (what :mod:`bitdelta.serving.graphs` captures)."""
        with sdpa_kernel(SDPA_BACKENDS):
            return self._forward(Step(batch, kv, deltas, fused=fused_base_on(self.device)))

    def _forward(self, step: Step) -> torch.Tensor:
        batch, deltas, arch = step.batch, step.deltas, self.arch
        x = F.embedding(batch.tokens.clamp(max=self.vocab_size - 1), self.model.embed_tokens.weight)
        if deltas is not None:
            x = deltas.embed(x, batch)
        if self.embed_scale is not None:  # Gemma
            x = x * self.embed_scale
        for key, (inv_freq, scaling) in self.ropes.items():
            step.rope[key] = rope_tables(batch.positions, inv_freq, scaling, x.dtype)
        last = batch.take_last()
        head_step = Step(last, step.kv, deltas, fused=step.fused)
        if step.fused:
            h = self._layers_fused(x, step, last is batch, head_step)
        else:
            for layer in self.model.layers:
                x = layer(x, step)
            h = self.model.norm(x if last is batch else x[batch.last], head_step)
        logits = self._head(h, head_step).float()
        if deltas is not None:
            logits = deltas.extra_logits(h, logits, last)
        if arch.final_softcap is not None:  # -inf (no such added token) and non-finite values stay as they are
            cap = arch.final_softcap
            logits = torch.where(torch.isfinite(logits), torch.tanh(logits / cap) * cap, logits)
        return logits

    def _layers_fused(self, x: torch.Tensor, step: Step, every_row: bool, head_step: Step) -> torch.Tensor:
        """The layers and the final norm on the fused path; ``x`` (the embeddings) becomes the residual
        stream, updated in place. ``every_row``: every token's logits are wanted (a decode step), so the
        last MLP output is added inside the final norm; else the sum is taken, then its last rows."""
        residual, pending = x, None
        for layer in self.model.layers:
            residual, pending = layer.forward_fused(residual, pending, step)
        if every_row and pending is not None:
            return self.model.norm.fused(pending, head_step, residual=residual)
        if pending is not None:
            residual.add_(pending)
        return self.model.norm.fused(residual if every_row else residual[step.batch.last], head_step)


def rotary_of(hf_model, arch: Arch) -> dict[str, tuple[torch.Tensor, float]]:
    """``(inv_freq, attention_scaling)`` per rotary key, as the Hugging Face model computed them."""
    return rotary_tables(hf_model.model.rotary_emb, arch)


def rotary_tables(rot: nn.Module, arch: Arch) -> dict[str, tuple[torch.Tensor, float]]:
    """``(inv_freq, attention_scaling)`` per rotary key of a Hugging Face rotary-embedding module."""
    out = {}
    for key in dict.fromkeys(arch.rope_keys):
        if key == "default":
            out[key] = (rot.inv_freq, getattr(rot, "attention_scaling", 1.0))
        else:  # per layer type (Gemma-3: local and global layers have their own base frequency)
            out[key] = (getattr(rot, f"{key}_inv_freq"), getattr(rot, f"{key}_attention_scaling", 1.0))
    return out


class ReadableWeights:
    """Name -> tensor over a served model's base matrices and 1-D parameters, read lazily: a quantized
    matrix is dequantized (in the model's dtype) each time it is read, so checking a delta against
    a quantized base never holds more than one dense matrix. Names set on it (an alias such as a
    tied ``lm_head``) are kept beside the model's."""

    def __init__(self, model: DeltaModel):
        self.model = model
        self.extra: dict[str, torch.Tensor] = {}

    def _names(self):
        return [*self.model.weights, *self.model.params1d, *self.extra]

    def __contains__(self, name) -> bool:
        return name in self.extra or name in self.model.weights or name in self.model.params1d

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name]
        w = self.model.weights.get(name)
        if isinstance(w, QuantizedWeight):
            return w.dequantized(self.model.dtype)
        return w if w is not None else self.model.params1d[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.extra[name] = value

    def __iter__(self):
        return iter(dict.fromkeys(self._names()))

    def __len__(self) -> int:
        return len(dict.fromkeys(self._names()))

    def keys(self):
        return list(self)

    def items(self):
        return ((name, self[name]) for name in self)
