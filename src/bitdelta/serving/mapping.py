"""One engine step's metadata, built on the host once per step.

:class:`BatchMapping` is the step's token layout (like vLLM's punica mapping): the new tokens of
every sequence flattened in order, each with its position, sequence slot, delta slot (``delta_slots``;
-1 = the plain base) and the row of the paged KV cache it writes (``kv_index``); :class:`AttentionPlan`
says how the step's attention runs, with the block tables its decode rows read through. Every index
tensor reaches the device in one copy, so the forward never waits for the GPU: on CUDA the host can
queue the whole step ahead of the device. The cache itself is :class:`~bitdelta.serving.kv_cache.KVCache`
(re-exported here).

    batch = BatchMapping.build([(kv_slot, start_pos, new_token_ids, delta_slot), ...], device, kv)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .kv_cache import KVCache, blocks_for


@dataclass
class AttentionPlan:
    """How one step's attention is computed, decided on the host when the step is built.

    ``prefill``: runs of fresh prompts (start 0) of equal length, ``(first_row, num_seqs, length)``,
    each run one causal attention call over its own new tokens. ``decode``: the single-token rows,
    attended in one paged call (:func:`~bitdelta.serving.paged_decode.paged_decode_attention`) through
    ``block_tables [B, max_blocks]`` int32 and ``seq_lens [B]`` int32 (keys per row, its own token
    included), ``span`` the longest ``seq_len`` (known on the host); ``dec_rows`` is None when they are
    all rows of the step in order. ``other``: sequences continuing with several tokens (chunked
    prefill), attended one by one over their context, read through ``other_blocks`` (per such
    sequence, its block ids in order).
    """

    prefill: list[tuple[int, int, int]]
    decode: list[int]
    dec_rows: torch.Tensor | None  # [B] int64
    block_tables: torch.Tensor | None  # [B, max_blocks] int32
    seq_lens: torch.Tensor | None  # [B] int32
    span: int
    other: list[int]
    offsets: list[int]
    other_blocks: list[torch.Tensor] = field(default_factory=list)  # per `other` sequence: [blocks] int64


@dataclass
class BatchMapping:
    """One step's token layout, built once per step (like vLLM's punica mapping).

    ``delta_slots`` is the delta slot of each token (-1 = base; ``ids`` is the same tensor, under
    its first name); ``kv_slots`` each token's sequence slot; ``kv_index`` the row of the paged
    cache's flat ``[blocks * block_size]`` view the token's key and value go to; ``seqs`` lists, per
    sequence in token order, ``(kv_slot, start_position, num_new_tokens)``; ``last`` indexes each
    sequence's last token (where logits are taken); ``seq_delta_slots`` (also ``seq_slots``) is each
    sequence's delta slot on the host.

    A mapping built without a cache (``build(entries, device)``) keeps its ``entries`` and is bound
    to the cache when a forward starts (:meth:`bind`): callers that drive the model directly need
    not know the cache's layout. The engine builds with its cache, in one copy.
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
    kv_index: torch.Tensor | None = None  # [T] int64, None until bound to a cache
    entries: list | None = None  # the host entries of a mapping not bound to a cache yet

    @classmethod
    def build(cls, entries: list[tuple[int, int, list[int], int]], device, kv: KVCache | None = None
              ) -> "BatchMapping":
        """entries: ``(kv_slot, start_position, new_token_ids, delta_slot)`` per sequence. With ``kv``,
        each sequence slot is given the blocks its new positions need (the engine has reserved them
        already; raises ``RuntimeError`` when the pool is out of blocks) and the mapping is bound."""
        toks, pos, ids, kvs, seqs, last, offsets, flat = [], [], [], [], [], [], [], []
        for kv_slot, start, new, slot in entries:
            n = len(new)
            offsets.append(len(toks))
            toks += new
            pos += range(start, start + n)
            ids += [slot] * n
            kvs += [kv_slot] * n
            seqs.append((kv_slot, start, n))
            last.append(len(toks) - 1)
            if kv is not None:
                if not kv.ensure(kv_slot, start + n):
                    raise RuntimeError(f"the KV cache has no free block for positions {start}..{start + n - 1} of "
                                       f"sequence slot {kv_slot} ({kv.blocks_free} of {kv.num_blocks} free)")
                flat += kv.flat_index(kv_slot, range(start, start + n))
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
        dec_lens = [seqs[i][1] + 1 for i in decode]
        span = max(dec_lens, default=0)
        rows_all = dec_rows == list(range(len(toks)))
        other_blocks = []
        width = blocks_for(span, kv.block_size) if kv is not None else 0
        if kv is not None:
            for i in other:
                slot, start, n = seqs[i]
                other_blocks.append(kv.tables[slot][:blocks_for(start + n, kv.block_size)])
        # One host buffer, one copy to the device (pinned and asynchronous on CUDA). The decode rows'
        # block tables come last, sliced from the cache's host tables (no loop over their entries).
        parts = [toks, pos, ids, kvs, last, dec_rows, flat, dec_lens, *other_blocks]
        host = torch.tensor([v for part in parts for v in part], dtype=torch.long)
        if kv is not None and decode:
            rows = torch.tensor([seqs[i][0] for i in decode])
            tables = kv.host_tables.index_select(0, rows)[:, :width]  # (indexing by a list is far slower)
            host = torch.cat((host, tables.flatten().long()))
        if torch.device(device).type == "cuda":
            buf = host.pin_memory().to(device, non_blocking=True)
        else:
            buf = host.to(device)
        views, at = [], 0
        for part in parts:
            views.append(buf[at:at + len(part)])
            at += len(part)
        tok_t, pos_t, ids64, kv_t, last_t, rows_t, flat_t, lens_t, *other_t = views
        bound = kv is not None
        plan = AttentionPlan(prefill, decode, None if rows_all else rows_t,
                             buf[at:].view(len(decode), width).to(torch.int32) if bound else None,
                             lens_t.to(torch.int32), span, other, offsets, other_t)
        return cls(tok_t, pos_t, ids64.to(torch.int32), ids64 + 1, kv_t, seqs, last_t,
                   any(s >= 0 for *_, s in entries), [s for *_, s in entries], plan,
                   kv_index=flat_t if bound else None, entries=None if bound else list(entries))

    def bind(self, kv: KVCache) -> "BatchMapping":
        """This step's mapping on ``kv`` (itself when already bound, or when it has no entries to bind)."""
        if self.kv_index is not None or self.entries is None:
            return self
        return BatchMapping.build(self.entries, self.tokens.device, kv)

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

    @property
    def has_prompt(self) -> bool:
        """Whether the step holds prompt tokens: a sequence with several new tokens, or several one-token
        rows of one sequence slot (a prompt split into rows, as graph replays and scored prefills take it)."""
        return any(n > 1 for _, _, n in self.seqs) or len({k for k, _, _ in self.seqs}) < len(self.seqs)

    def take_last(self) -> "BatchMapping":
        """The mapping restricted to each sequence's last token (for the output head)."""
        if self.one_token_each:  # already is (no gathers)
            return self
        ids = self.delta_slots[self.last]
        return BatchMapping(self.tokens[self.last], self.positions[self.last], ids, ids.long() + 1,
                            self.kv_slots[self.last], [(k, s + n - 1, 1) for k, s, n in self.seqs],
                            torch.arange(len(self.seqs), device=ids.device), self.any_delta, self.seq_delta_slots)


__all__ = ["AttentionPlan", "BatchMapping", "KVCache"]
