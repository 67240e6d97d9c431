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

    model = DeltaLlama.from_hf(hf_model, device="cpu")
    batch = BatchMapping.build([(kv_slot, start_pos, new_token_ids, delta_slot), ...], device)
    logits = model.forward(batch, kv, deltas)   # [num_sequences, vocab (+ extra rows)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

SUPPORTED = ("llama", "mistral", "qwen2")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class BatchMapping:
    """One step's token layout, built once per step (like vLLM's punica mapping).

    ``ids`` is the delta slot of each token (-1 = base); ``seqs`` lists, per sequence in token
    order, ``(kv_slot, start_position, num_new_tokens)``; ``last`` indexes each sequence's last
    token (where logits are taken).
    """

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    ids: torch.Tensor  # [T] int32, -1 = base only
    gather: torch.Tensor  # [T] int64 = ids + 1, row index into dense tables (row 0 = base)
    kv_slots: torch.Tensor  # [T] int64
    seqs: list[tuple[int, int, int]]
    last: torch.Tensor  # [S] int64
    any_delta: bool

    @classmethod
    def build(cls, entries: list[tuple[int, int, list[int], int]], device) -> "BatchMapping":
        """entries: ``(kv_slot, start_position, new_token_ids, delta_slot)`` per sequence."""
        toks, pos, ids, kvs, seqs, last = [], [], [], [], [], []
        for kv_slot, start, new, slot in entries:
            n = len(new)
            toks += new
            pos += range(start, start + n)
            ids += [slot] * n
            kvs += [kv_slot] * n
            seqs.append((kv_slot, start, n))
            last.append(len(toks) - 1)
        t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
        ids_t = t(ids, torch.int32)
        return cls(t(toks, torch.long), t(pos, torch.long), ids_t, ids_t.long() + 1, t(kvs, torch.long),
                   seqs, t(last, torch.long), any(s >= 0 for *_, s in entries))

    def take_last(self) -> "BatchMapping":
        """The mapping restricted to each sequence's last token (for the output head)."""
        ids = self.ids[self.last]
        return BatchMapping(self.tokens[self.last], self.positions[self.last], ids, ids.long() + 1,
                            self.kv_slots[self.last], [(k, s + n - 1, 1) for k, s, n in self.seqs],
                            torch.arange(len(self.seqs), device=ids.device), self.any_delta)


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


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


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
        if deltas is None:
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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self._param(name, batch, deltas) * xf.to(x.dtype)

    def _rope(self, x, positions):  # x [T, heads, head_dim]
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(x.dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(x.dtype)[:, None, :]
        return x * cos + _rotate_half(x) * sin

    def _attention(self, q, k, v, layer, batch, kv: KVCache):
        """q [T, H, D]; k/v [T, KV, D] for the new tokens; returns [T, H*D].

        Query head h reads KV head h // (H / KV) (grouped-query attention, as Hugging Face's repeat_kv).
        """
        kc, vc = kv.k[layer], kv.v[layer]
        kc[batch.kv_slots, batch.positions] = k
        vc[batch.kv_slots, batch.positions] = v
        nkv, rep, d = self.kv_heads, self.num_heads // self.kv_heads, self.head_dim
        scale = d ** -0.5
        out = q.new_empty(q.shape)
        offsets, off = [], 0
        for s in batch.seqs:
            offsets.append(off)
            off += s[2]
        decode = [i for i, s in enumerate(batch.seqs) if s[2] == 1]
        done = set()
        if len(decode) > 1:  # batched single-token attention over the gathered cache rows
            rows = torch.tensor([offsets[i] for i in decode], device=q.device)
            slots = batch.kv_slots[rows]
            lens = batch.positions[rows] + 1
            span = int(max(batch.seqs[i][1] for i in decode)) + 1
            keys = kc[slots, :span].float().permute(0, 2, 1, 3)  # [B, KV, L, D]
            vals = vc[slots, :span].float().permute(0, 2, 1, 3)
            qb = q[rows].float().view(-1, nkv, rep, d)  # [B, KV, rep, D]
            scores = torch.einsum("bkrd,bkld->bkrl", qb, keys) * scale
            mask = torch.arange(span, device=q.device)[None, :] < lens[:, None]  # [B, L]
            probs = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
            out[rows] = torch.einsum("bkrl,bkld->bkrd", probs, vals).reshape(-1, self.num_heads, d).to(q.dtype)
            done = set(decode)
        for i, (slot, start, n) in enumerate(batch.seqs):
            if i in done:
                continue
            o0, total = offsets[i], start + n
            keys = kc[slot, :total].float().permute(1, 0, 2)  # [KV, L, D]
            vals = vc[slot, :total].float().permute(1, 0, 2)
            qi = q[o0:o0 + n].float().view(n, nkv, rep, d).permute(1, 2, 0, 3)  # [KV, rep, n, D]
            scores = torch.matmul(qi, keys[:, None].transpose(-1, -2)) * scale  # [KV, rep, n, L]
            mask = torch.arange(total, device=q.device)[None, :] <= (start + torch.arange(n, device=q.device))[:, None]
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            o = torch.matmul(probs, vals[:, None])  # [KV, rep, n, D]
            out[o0:o0 + n] = o.permute(2, 0, 1, 3).reshape(n, self.num_heads, d).to(q.dtype)
        return out.reshape(q.shape[0], -1)

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, batch: BatchMapping, kv: KVCache, deltas=None) -> torch.Tensor:
        """Runs one step; returns float32 logits ``[num_sequences, vocab + extra]``."""
        x = F.embedding(batch.tokens.clamp(max=self.vocab_size - 1), self.weights[self.embed_name])
        if deltas is not None:
            x = deltas.embed(x, batch)
        t = x.shape[0]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            h = self._norm(p + "input_layernorm.weight", x, batch, deltas)
            q = self._linear(p + "self_attn.q_proj", h, batch, deltas).view(t, self.num_heads, self.head_dim)
            k = self._linear(p + "self_attn.k_proj", h, batch, deltas).view(t, self.kv_heads, self.head_dim)
            v = self._linear(p + "self_attn.v_proj", h, batch, deltas).view(t, self.kv_heads, self.head_dim)
            q, k = self._rope(q, batch.positions), self._rope(k, batch.positions)
            a = self._attention(q, k, v, i, batch, kv)
            x = x + self._linear(p + "self_attn.o_proj", a, batch, deltas)
            h = self._norm(p + "post_attention_layernorm.weight", x, batch, deltas)
            g = self._linear(p + "mlp.gate_proj", h, batch, deltas)
            u = self._linear(p + "mlp.up_proj", h, batch, deltas)
            x = x + self._linear(p + "mlp.down_proj", F.silu(g) * u, batch, deltas)
        last = batch.take_last()
        h = self._norm("model.norm.weight", x[batch.last], last, deltas)
        logits = self._linear(self.head_name, h, last, deltas).float()
        if deltas is not None:
            logits = deltas.extra_logits(h, logits, last)
        return logits
