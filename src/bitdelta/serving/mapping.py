"""One engine step's metadata, built on the host once per step, and the KV cache it indexes.

:class:`BatchMapping` is the step's token layout (like vLLM's punica mapping): the new tokens of
every sequence flattened in order, each with its position, KV slot and delta slot (``delta_slots``;
-1 = the plain base); :class:`AttentionPlan` says how the step's attention runs. Every index tensor
reaches the device in one copy, so the forward never waits for the GPU: on CUDA the host can queue
the whole step ahead of the device. :class:`KVCache` is the slotted cache
``[layers, max_batch, max_len, kv_heads, head_dim]``: one KV slot per running sequence.

    batch = BatchMapping.build([(kv_slot, start_pos, new_token_ids, delta_slot), ...], device)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


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

    ``delta_slots`` is the delta slot of each token (-1 = base; ``ids`` is the same tensor, under
    its first name); ``kv_slots`` each token's KV-cache slot; ``seqs`` lists, per sequence in token
    order, ``(kv_slot, start_position, num_new_tokens)``; ``last`` indexes each sequence's last
    token (where logits are taken); ``seq_delta_slots`` (also ``seq_slots``) is each sequence's delta
    slot on the host.
    """

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    delta_slots: torch.Tensor  # [T] int32, -1 = base only
    gather: torch.Tensor  # [T] int64 = delta_slots + 1, row index into dense tables (row 0 = base)
    kv_slots: torch.Tensor  # [T] int64
    seqs: list[tuple[int, int, int]]
    last: torch.Tensor  # [S] int64
    any_delta: bool
    seq_delta_slots: list[int] = field(default_factory=list)
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
        contiguous = dec_slots and dec_slots == list(range(dec_slots[0], dec_slots[0] + len(decode)))
        slot0 = dec_slots[0] if contiguous else None
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
    def ids(self) -> torch.Tensor:
        """``delta_slots`` (the first design's name)."""
        return self.delta_slots

    @property
    def seq_slots(self) -> list[int]:
        """``seq_delta_slots`` (the first design's name)."""
        return self.seq_delta_slots

    @property
    def one_token_each(self) -> bool:
        """Every sequence brings exactly one token (a decode step): its last tokens are all tokens."""
        return len(self.seqs) == self.tokens.shape[0]

    def take_last(self) -> "BatchMapping":
        """The mapping restricted to each sequence's last token (for the output head)."""
        if self.one_token_each:  # already is (no gathers)
            return self
        ids = self.delta_slots[self.last]
        return BatchMapping(self.tokens[self.last], self.positions[self.last], ids, ids.long() + 1,
                            self.kv_slots[self.last], [(k, s + n - 1, 1) for k, s, n in self.seqs],
                            torch.arange(len(self.seqs), device=ids.device), self.any_delta, self.seq_delta_slots)


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
