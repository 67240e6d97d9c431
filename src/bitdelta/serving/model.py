"""Engine-native Llama-family decoder where every compressed matrix is multi-tenant.

Built from a base Hugging Face model's tensors (Llama, Mistral, Qwen2 layouts: RMSNorm, RoPE with
the config's theta/scaling, grouped-query attention, SwiGLU, optional q/k/v/o biases, tied or
untied head). It sees token ids only. One forward runs a flattened step: the new tokens of every
sequence in the batch (prompt chunks and single decode tokens, mixed), each token carrying its
tenant's delta slot (``-1`` = the plain base). Per module, one call to
:func:`bitdelta.ops.bitdelta_linear` applies base + each token's own delta; per-tenant dense
extras (norm weights, biases) and embedding rows are gathered per token by
:class:`bitdelta.serving.slots.DeltaSlots`. Keys/values go to a slotted cache
``[max_batch, max_len, kv_heads, head_dim]`` per layer.

Every index tensor a step needs (token ids, positions, tenant ids, the attention plan) is built
once per step in :meth:`BatchMapping.build` and reaches the device in one copy, so the forward
itself never waits for the GPU: on CUDA the host can queue the whole step ahead of the device.
Attention uses ``scaled_dot_product_attention``: fresh prompts attend causally among their own
new tokens, single-token (decode) rows read their sequences' cache rows in one batched call.
SDPA may pick flash, memory-efficient or math kernels but not cuDNN's: cuDNN builds an execution
graph per (batch, key length) on the host (tens of ms each), and decode changes the key length
every step. A step whose batch carries ``replay`` (a captured CUDA graph, see
:mod:`bitdelta.serving.graphs`) is computed by replaying it; :meth:`DeltaLlama.forward_eager` is
the computation itself.

    model = DeltaLlama.from_hf(hf_model, device="cpu")
    batch = BatchMapping.build([(kv_slot, start_pos, new_token_ids, delta_slot), ...], device)
    logits = model.forward(batch, kv, deltas)   # [num_sequences, vocab (+ extra rows)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SUPPORTED = ("llama", "mistral", "qwen2")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Attention kernels SDPA may choose from: not cuDNN, whose per-shape graph build (tens of ms of host
# time for every new batch size x key length) made every decode step pay it (see the module docstring).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionPlan:
    """How one step's attention is computed, decided on the host when the step is built.

    ``prefill``: runs of fresh prompts (start 0) of equal length, ``(first_row, num_seqs, length)``,
    each run one causal attention call over its own new tokens. ``decode``: the single-token rows,
    attended in one call over ``span`` cache positions; ``dec_rows`` is None when they are all rows
    of the step in order, ``dec_slot0`` the first KV slot when their slots are consecutive (the
    cache is then read in place, no gather), ``dec_lens`` None when every context is ``span`` long
    (no mask). ``other``: sequences continuing with several tokens, attended one by one.
    """

    prefill: list[tuple[int, int, int]]
    decode: list[int]
    dec_rows: torch.Tensor | None  # [B] int64
    dec_slots: torch.Tensor | None  # [B] int64
    dec_slot0: int | None
    dec_lens: torch.Tensor | None  # [B] int64
    span: int
    other: list[int]
    offsets: list[int]


@dataclass
class BatchMapping:
    """One step's token layout, built once per step (like vLLM's punica mapping).

    ``ids`` is the delta slot of each token (-1 = base); ``seqs`` lists, per sequence in token
    order, ``(kv_slot, start_position, num_new_tokens)``; ``last`` indexes each sequence's last
    token (where logits are taken); ``seq_slots`` is each sequence's delta slot on the host.
    """

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    ids: torch.Tensor  # [T] int32, -1 = base only
    gather: torch.Tensor  # [T] int64 = ids + 1, row index into dense tables (row 0 = base)
    kv_slots: torch.Tensor  # [T] int64
    seqs: list[tuple[int, int, int]]
    last: torch.Tensor  # [S] int64
    any_delta: bool
    seq_slots: list[int] = field(default_factory=list)
    attn: AttentionPlan | None = None
    cache: dict = field(default_factory=dict)  # per-step values derived by callers (e.g. tenant row groups)
    replay: Callable[[], torch.Tensor] | None = None  # a captured graph computing this step (serving.graphs)

    @classmethod
    def build(cls, entries: list[tuple[int, int, list[int], int]], device) -> "BatchMapping":
        """entries: ``(kv_slot, start_position, new_token_ids, delta_slot)`` per sequence."""
        toks, pos, ids, kvs, seqs, last, offsets = [], [], [], [], [], [], []
        for kv_slot, start, new, slot in entries:
            n = len(new)
            offsets.append(len(toks))
            toks += new
            pos += range(start, start + n)
            ids += [slot] * n
            kvs += [kv_slot] * n
            seqs.append((kv_slot, start, n))
            last.append(len(toks) - 1)
        # The attention plan, from host values only.
        decode = [i for i, s in enumerate(seqs) if s[2] == 1]
        prefill, other = [], []
        i = 0
        while i < len(seqs):
            kv_slot, start, n = seqs[i]
            if n > 1 and start == 0:
                j = i + 1
                while j < len(seqs) and seqs[j][1] == 0 and seqs[j][2] == n:
                    j += 1
                prefill.append((offsets[i], j - i, n))
                i = j
                continue
            if n > 1:
                other.append(i)
            i += 1
        dec_rows = [offsets[i] for i in decode]
        dec_slots = [seqs[i][0] for i in decode]
        dec_lens = [seqs[i][1] + 1 for i in decode]
        span = max(dec_lens, default=0)
        slot0 = dec_slots[0] if dec_slots and dec_slots == list(range(dec_slots[0], dec_slots[0] + len(decode))) else None
        rows_all = dec_rows == list(range(len(toks)))
        lens_all = all(n == span for n in dec_lens)
        # One host buffer, one copy to the device (pinned and asynchronous on CUDA).
        parts = [toks, pos, ids, kvs, last, dec_rows, dec_slots, dec_lens]
        buf = torch.tensor([v for part in parts for v in part], dtype=torch.long)
        if torch.device(device).type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        else:
            buf = buf.to(device)
        views, at = [], 0
        for part in parts:
            views.append(buf[at:at + len(part)])
            at += len(part)
        tok_t, pos_t, ids64, kv_t, last_t, rows_t, slots_t, lens_t = views
        plan = AttentionPlan(prefill, decode, None if rows_all else rows_t, slots_t, slot0,
                             None if lens_all else lens_t, span, other, offsets)
        return cls(tok_t, pos_t, ids64.to(torch.int32), ids64 + 1, kv_t, seqs, last_t,
                   any(s >= 0 for *_, s in entries), [s for *_, s in entries], plan)

    @property
    def one_token_each(self) -> bool:
        """Every sequence brings exactly one token (a decode step): its last tokens are all tokens."""
        return len(self.seqs) == self.tokens.shape[0]

    def take_last(self) -> "BatchMapping":
        """The mapping restricted to each sequence's last token (for the output head)."""
        if self.one_token_each:  # already is (no gathers)
            return self
        ids = self.ids[self.last]
        return BatchMapping(self.tokens[self.last], self.positions[self.last], ids, ids.long() + 1,
                            self.kv_slots[self.last], [(k, s + n - 1, 1) for k, s, n in self.seqs],
                            torch.arange(len(self.seqs), device=ids.device), self.any_delta, self.seq_slots)


class KVCache:
    """Slotted key/value cache: per layer ``[max_batch, max_len, kv_heads, head_dim]``."""

    def __init__(self, num_layers, max_batch, max_len, kv_heads, head_dim, dtype, device):
        shape = (num_layers, max_batch, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_len = max_batch, max_len

    @staticmethod
    def bytes_per_sequence(num_layers, max_len, kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * max_len * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class DeltaLlama:
    """The base model's tensors plus the forward pass; deltas come in through ``deltas``."""

    def __init__(self, cfg, weights: dict[str, torch.Tensor], params1d: dict[str, torch.Tensor],
                 inv_freq: torch.Tensor, attention_scaling: float, tied: bool, dtype, device):
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.max_len = int(getattr(cfg, "max_position_embeddings", 2048))
        self.weights = weights  # module FQN -> [out, in]
        self.params1d = params1d  # parameter FQN -> [dim] (norm weights, biases)
        self.inv_freq = inv_freq.float().to(device)
        self.attention_scaling = float(attention_scaling)
        self.embed_name = "model.embed_tokens"
        self.head_name = self.embed_name if tied else "lm_head"
        self.vocab_size = int(weights[self.embed_name].shape[0])
        self.dtype, self.device = dtype, torch.device(device)

    @classmethod
    @torch.no_grad()
    def from_hf(cls, hf_model, device=None, dtype=None) -> "DeltaLlama":
        cfg = hf_model.config
        experts = next((getattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                        if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) > 0), None)
        if experts:
            from ..errors import BitDeltaError  # a ValueError, printed as one line by the CLI

            raise BitDeltaError(
                f"the serving engine does not serve mixture-of-experts models ({getattr(cfg, 'model_type', None)!r} "
                f"with {experts} experts per layer); merge the delta into the base with `bitdelta merge --base BASE "
                "--delta DELTA --out MERGED` and serve the merged model with another server (e.g. vLLM)")
        if getattr(cfg, "model_type", None) not in SUPPORTED:
            raise ValueError(f"the serving engine supports {', '.join(SUPPORTED)} models "
                             f"(got {getattr(cfg, 'model_type', None)!r}); merge the delta and use another server")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"only SwiGLU (silu) MLPs are supported (got {cfg.hidden_act!r})")
        device = torch.device(device or next(hf_model.parameters()).device)
        dtype = dtype or next(hf_model.parameters()).dtype
        mv = lambda t: t.detach().to(device=device, dtype=dtype).contiguous()  # noqa: E731
        weights, params1d = {}, {}
        for i in range(cfg.num_hidden_layers):
            for sub in LINEARS:
                name = f"model.layers.{i}.{sub}"
                mod = hf_model.get_submodule(name)
                weights[name] = mv(mod.weight)
                if getattr(mod, "bias", None) is not None:
                    params1d[f"{name}.bias"] = mv(mod.bias)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                params1d[f"model.layers.{i}.{norm}.weight"] = mv(hf_model.get_submodule(f"model.layers.{i}.{norm}").weight)
        params1d["model.norm.weight"] = mv(hf_model.model.norm.weight)
        emb = hf_model.get_input_embeddings().weight
        head = hf_model.get_output_embeddings()
        tied = head is None or head.weight is emb or head.weight.data_ptr() == emb.data_ptr()
        weights["model.embed_tokens"] = mv(emb)
        if not tied:
            weights["lm_head"] = mv(head.weight)
            if getattr(head, "bias", None) is not None:
                raise ValueError("output heads with a bias are not supported")
        rot = hf_model.model.rotary_emb
        return cls(cfg, weights, params1d, rot.inv_freq, getattr(rot, "attention_scaling", 1.0), tied, dtype, device)

    # ------------------------------------------------------------------ pieces

    def delta_modules(self) -> dict[str, tuple[int, int]]:
        """Matrices that take per-tenant 1-bit deltas: FQN -> (out, in)."""
        return {n: tuple(w.shape) for n, w in self.weights.items()}

    def _param(self, name, batch, deltas):
        if deltas is None or not batch.any_delta:  # every token uses the base: no per-token gather
            return self.params1d[name]
        return deltas.gather1d(name, batch)  # [T, dim]

    def _linear(self, name, x, batch, deltas):
        w = self.weights[name]
        bias_name = f"{name}.bias"
        if deltas is None or not batch.any_delta:
            y = F.linear(x, w)
        else:
            y = deltas.linear(name, x, w, batch)
        if bias_name in self.params1d:
            y = y + self._param(bias_name, batch, deltas)
        return y

    def _norm(self, name, x, batch, deltas):
        # Hugging Face's LlamaRMSNorm: normalise in float32, cast back, then scale.
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self._param(name, batch, deltas) * xf.to(x.dtype)

    def _rope_tables(self, positions, dtype):
        """cos and signed sin ``[T, 1, head_dim]`` for the step's positions (once per step, for every layer).

        Hugging Face's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` equals
        ``x * cos + roll(x, D/2) * cat(-sin1, sin2)`` exactly (negation is exact), in four kernels.
        """
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        h = sin.shape[-1] // 2
        sin = torch.cat((-sin[:, :h], sin[:, h:]), dim=-1)[:, None, :]
        return cos, sin

    @staticmethod
    def _rope(x, cos, sin):  # x [T, heads, head_dim]
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin

    def _attention(self, q, k, v, layer, batch, kv: KVCache):
        """q [T, H, D]; k/v [T, KV, D] for the new tokens; returns [T, H*D].

        Query head h reads KV head h // (H / KV) (grouped-query attention, as Hugging Face's repeat_kv).
        """
        kc, vc = kv.k[layer], kv.v[layer]
        kc[batch.kv_slots, batch.positions] = k
        vc[batch.kv_slots, batch.positions] = v
        plan = batch.attn
        nkv, h, d = self.kv_heads, self.num_heads, self.head_dim
        gqa = nkv != h
        t = q.shape[0]
        if plan.decode and plan.dec_rows is None:  # a pure decode step: no scatter needed
            return self._decode_attention(q, kc, vc, plan, gqa).reshape(t, -1)
        out = q.new_empty(q.shape)
        for row0, g, n in plan.prefill:  # fresh prompts: their cache rows are exactly k, v
            rows = slice(row0, row0 + g * n)
            qs = q[rows].view(g, n, h, d).transpose(1, 2)
            ks = k[rows].view(g, n, nkv, d).transpose(1, 2)
            vs = v[rows].view(g, n, nkv, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            out[rows] = o.transpose(1, 2).reshape(g * n, h, d)
        if plan.decode:
            out[plan.dec_rows] = self._decode_attention(q[plan.dec_rows], kc, vc, plan, gqa)
        rep, scale = h // nkv, d ** -0.5
        for i in plan.other:  # a sequence continuing with several tokens: its own causal mask over the cache
            slot, start, n = batch.seqs[i]
            o0, total = plan.offsets[i], start + n
            keys = kc[slot, :total].float().permute(1, 0, 2)  # [KV, L, D]
            vals = vc[slot, :total].float().permute(1, 0, 2)
            qi = q[o0:o0 + n].float().view(n, nkv, rep, d).permute(1, 2, 0, 3)  # [KV, rep, n, D]
            scores = torch.matmul(qi, keys[:, None].transpose(-1, -2)) * scale  # [KV, rep, n, L]
            mask = torch.arange(total, device=q.device)[None, :] <= (start + torch.arange(n, device=q.device))[:, None]
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            o = torch.matmul(probs, vals[:, None])  # [KV, rep, n, D]
            out[o0:o0 + n] = o.permute(2, 0, 1, 3).reshape(n, h, d).to(q.dtype)
        return out.reshape(t, -1)

    @staticmethod
    def _decode_attention(qd, kc, vc, plan: AttentionPlan, gqa: bool):
        """Single-token rows ``qd [B, H, D]`` over their cache rows; returns ``[B, H, D]``."""
        b, span = qd.shape[0], plan.span
        if plan.dec_slot0 is not None:  # consecutive slots: read the cache in place
            keys, vals = kc[plan.dec_slot0:plan.dec_slot0 + b, :span], vc[plan.dec_slot0:plan.dec_slot0 + b, :span]
        else:
            keys, vals = kc[plan.dec_slots, :span], vc[plan.dec_slots, :span]
        mask = None
        if plan.dec_lens is not None:  # contexts of different lengths
            mask = (torch.arange(span, device=qd.device)[None, :] < plan.dec_lens[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(qd.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=gqa)  # [B, H, 1, D]
        return o.squeeze(2)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: BatchMapping, kv: KVCache, deltas=None) -> torch.Tensor:
        """Runs one step; returns float32 logits ``[num_sequences, vocab + extra]``."""
        if batch.replay is not None:  # a captured CUDA graph with this step's inputs already in place
            return batch.replay()
        return self.forward_eager(batch, kv, deltas)

    @torch.no_grad()
    def forward_eager(self, batch: BatchMapping, kv: KVCache, deltas=None) -> torch.Tensor:
        """The step's computation, op by op (what :mod:`bitdelta.serving.graphs` captures)."""
        with sdpa_kernel(SDPA_BACKENDS):
            return self._forward(batch, kv, deltas)

    def _forward(self, batch: BatchMapping, kv: KVCache, deltas) -> torch.Tensor:
        x = F.embedding(batch.tokens.clamp(max=self.vocab_size - 1), self.weights[self.embed_name])
        if deltas is not None:
            x = deltas.embed(x, batch)
        t = x.shape[0]
        cos, sin = self._rope_tables(batch.positions, x.dtype)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            h = self._norm(p + "input_layernorm.weight", x, batch, deltas)
            q = self._linear(p + "self_attn.q_proj", h, batch, deltas).view(t, self.num_heads, self.head_dim)
            k = self._linear(p + "self_attn.k_proj", h, batch, deltas).view(t, self.kv_heads, self.head_dim)
            v = self._linear(p + "self_attn.v_proj", h, batch, deltas).view(t, self.kv_heads, self.head_dim)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            a = self._attention(q, k, v, i, batch, kv)
            x = x + self._linear(p + "self_attn.o_proj", a, batch, deltas)
            h = self._norm(p + "post_attention_layernorm.weight", x, batch, deltas)
            g = self._linear(p + "mlp.gate_proj", h, batch, deltas)
            u = self._linear(p + "mlp.up_proj", h, batch, deltas)
            x = x + self._linear(p + "mlp.down_proj", F.silu(g) * u, batch, deltas)
        last = batch.take_last()
        h = self._norm("model.norm.weight", x if last is batch else x[batch.last], last, deltas)
        logits = self._linear(self.head_name, h, last, deltas).float()
        if deltas is not None:
            logits = deltas.extra_logits(h, logits, last)
        return logits
