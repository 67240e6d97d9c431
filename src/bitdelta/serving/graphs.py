"""CUDA-graph steps: a step of one-token rows replays a captured forward.

Why: a decode step of a 7B model moves a few GB of weights (about a millisecond of GPU time), but
its forward launches some 30 kernels per layer from Python, which takes the host longer than the
GPU needs to run them. A CUDA graph launches the whole step at once; the host only copies the
step's inputs and replays. The same holds for a step that carries a short prompt beside the
decoding streams: run eagerly, its launches take several times its GPU time, and every stream
waits for it.

Layout (all shapes static, nothing read back on the host):

* Graph row ``j`` is the step's ``j``-th token. A decode token is one row; a prompt chunk is one row
  per token (:meth:`DecodeGraphs.token_rows`): every row writes its key and value before any row
  attends, and each attends through its sequence's block table over the positions up to its own,
  which is causal attention over the prompt. A step of ``T`` rows replays a graph of batch bucket
  ``B >= T`` (powers of two and ``max_batch`` itself, and when prompt rows are graphed, powers of
  two and ``max_tokens`` up to that). A bucket of more rows than the decode op takes in one
  call (``bitdelta.ops.DECODE_MAX_TOKENS``) runs the op in fixed chunks of that size
  (:class:`~bitdelta.serving.dispatch.Dispatch`), static shapes that capture like the rest; should
  such a bucket (or one past ``max_batch``) fail to capture, it is dropped with a warning and those
  steps run eagerly. Rows past the step's tokens are padding: token 0 at position 0, no delta, a
  context of one, whose key and value go to the paged cache's scratch block (never handed to a
  sequence) and whose logits are dropped.
* Attention reads each row's keys through its block table
  (:func:`~bitdelta.serving.paged_decode.paged_decode_attention`) over the first ``S`` positions,
  ``S`` the span bucket (powers of two from :data:`MIN_SPAN`, the last one the cache length), masked
  per row by its context length, so no host-known length is baked into the graph. The kernel stops
  at each row's length, so prompt rows cost the keys before them: a step is graphed only while its
  prompt rows read at most :data:`MAX_PROMPT_ROW_KEYS` keys together (a long chunk deep into a long
  prompt runs eagerly, where prefill attention reads each key once per chunk).
* Inputs: per batch bucket one int32 buffer: ``[6, B]`` (token, position, delta slot, context length
  per row, each entry's row in the engine's order, the flat cache row each token writes) then the
  block tables ``[B, max_blocks]`` (each row its sequence's table; ``max_blocks`` for a sequence of
  the cache's whole length), filled by one host-to-device copy per step (:func:`pack_step`). Delta
  pools are written in place by :class:`~bitdelta.serving.layers.DevicePool`, so a graph always reads
  the installed deltas.
* One graph per (batch bucket, span bucket, variant): "delta" (per-token deltas via the Triton
  decode op) or "base" (no token in the step has a delta: plain GEMMs, as the eager path). All are
  captured when the engine starts, while no sequence runs (the warm-up runs write padding rows),
  into one shared memory pool (replays never overlap).

Steps that run eagerly instead: more rows than the largest bucket; prompt rows past the key budget;
a tenant whose delta is column-scaled on some module (its tokens take a separate call on a
host-computed token set); a custom ``linear_fn`` (the unfused baseline); a delta backend other than
Triton (the torch reference reads tenant ids on the host).

    graphs = DecodeGraphs(model, kv, slots, max_batch, max_tokens=512).setup()   # captures (CUDA)
    rows = graphs.token_rows(groups)    # the step's entry groups as one-token rows (None: eager)
    batch = graphs.prepare([e for g in rows for e in g])   # None: run this step eagerly
    logits = model.forward(batch, kv, slots)                       # replays: one row per entry
    DecodeGraphs(model, kv, slots, max_batch, capture=False)       # same steps, run eagerly (CPU tests)
"""

from __future__ import annotations

import logging
import time

import torch

from ..ops import DECODE_MAX_TOKENS
from .mapping import AttentionPlan, BatchMapping

logger = logging.getLogger(__name__)

MIN_SPAN = 256
# Prompt rows attend through the decode kernel, each over the keys before it: a fresh prompt of L
# tokens reads about L^2/2 keys, a chunk of L tokens after P cached ones about L * P. Past this many
# the step runs eagerly (prefill attention reads each key once per chunk).
MAX_PROMPT_ROW_KEYS = 1 << 16


def batch_buckets(max_batch: int) -> list[int]:
    """Graph batch sizes: powers of two below ``max_batch``, then ``max_batch`` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def span_buckets(max_len: int, min_span: int = MIN_SPAN) -> list[int]:
    """Attention spans: ``min_span`` doubling while below ``max_len``, then ``max_len`` itself."""
    out, s = [], min_span
    while s < max_len:
        out.append(s)
        s *= 2
    return out + [max_len]


def pick(value: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``value`` (None: larger than every bucket)."""
    for b in buckets:
        if value <= b:
            return b
    return None


def pack_inputs(entries, bucket: int) -> list[int]:
    """The ``[5, bucket]`` input buffer of one step, flattened; row ``j`` is ``entries[j]``.

    ``entries``: ``(kv_slot, position, [token], delta_slot)`` per row, at most ``bucket`` of them.
    Rows: token, position, delta slot (-1 = base), context length (position + 1, the new token
    included); padding rows get ``0, 0, -1, 1``. The fifth row lists each entry's row (where its
    logits are), then zeros.
    """
    n = len(entries)
    pad = bucket - n
    tokens = [new[0] for _, _, new, _ in entries] + [0] * pad
    pos = [start for _, start, _, _ in entries] + [0] * pad
    ids = [slot for _, _, _, slot in entries] + [-1] * pad
    lens = [start + 1 for _, start, _, _ in entries] + [1] * pad
    return tokens + pos + ids + lens + list(range(n)) + [0] * pad


def pack_step(entries, bucket: int, kv) -> torch.Tensor:
    """A graph's whole input buffer for ``entries``, flattened, as an int32 host tensor: the five
    rows of :func:`pack_inputs`, then each row's flat cache row, then the ``[bucket, kv.max_blocks]``
    block tables (row ``j`` the table of ``entries[j]``'s sequence slot, from the cache's host
    tables; padding rows only the scratch block). Padding rows write and read the scratch block.
    Every entry's slot must already hold the blocks its position needs."""
    n = len(entries)
    index = [kv.flat_index(kv_slot, [start])[0] for kv_slot, start, _, _ in entries] + [kv.pad_index] * (bucket - n)
    head = torch.tensor(pack_inputs(entries, bucket) + index, dtype=torch.int32)
    tables = torch.full((bucket, kv.max_blocks), kv.scratch, dtype=torch.int32)
    if n:  # (indexing by a tensor of slots: far faster than by a list)
        tables[:n] = kv.host_tables.index_select(0, torch.tensor([e[0] for e in entries]))
    return torch.cat((head, tables.flatten()))


def unsupported(model, slots) -> str | None:
    """Why this model and delta pool cannot run graph-captured decode steps (None: they can)."""
    from ..ops import Backend, resolve_backend

    if model.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not slots.dispatch.graph_safe:
        return "a custom linear_fn (e.g. the unfused baseline) groups tokens on the host"
    try:
        backend = resolve_backend(slots.backend, torch.empty(0, device=model.device))
    except (RuntimeError, ValueError) as e:
        return str(e)
    if backend is not Backend.TRITON:
        return "the delta backend is the torch reference, which reads tenant ids on the host"
    return None


class DecodeGraphs:
    """Captured decode steps over one engine's model, KV cache and delta slots.

    ``capture=False`` keeps the same inputs, padding and attention but runs the forward eagerly
    at each step: the CPU tests' way of checking everything except the capture itself.
    """

    def __init__(self, model, kv, slots, max_batch: int, capture: bool = True, min_span: int = MIN_SPAN,
                 max_tokens: int = 0):
        """``max_batch``: the most sequences a step decodes; ``max_tokens``: the most rows of a step
        with prompt tokens to replay (0: prompt steps run eagerly). The largest bucket is the larger."""
        self.model, self.kv, self.slots, self.capture = model, kv, slots, capture
        self.device = model.device
        self.decode_rows = min(max_batch, kv.max_batch)
        # every decode batch fits a bucket of at most its own rows' power of two or max_batch itself;
        # prompt steps add buckets up to max_tokens
        prompt_buckets = batch_buckets(max_tokens) if max_tokens else []
        self.batches = sorted(set(batch_buckets(self.decode_rows)) | set(prompt_buckets))
        self.max_tokens = max_tokens
        self.spans = span_buckets(kv.max_len, min_span)
        self.width = kv.max_blocks
        self.inputs = {b: torch.zeros(b * (6 + self.width), dtype=torch.int32, device=self.device)
                       for b in self.batches}
        self.rows = torch.arange(self.batches[-1], device=self.device)
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0
        self.replays = 0
        self.pin = self.device.type == "cuda"

    # ------------------------------------------------------------------ capture (engine start)

    def setup(self) -> "DecodeGraphs":
        """Captures every (batch, span, variant) graph; call while no sequence is running."""
        if not self.capture:
            return self
        t = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        # Largest first: smaller graphs then reuse the pool's blocks.
        for b in reversed(list(self.batches)):
            try:
                for span in reversed(self.spans):
                    for delta in (True, False):
                        self.graphs[(b, span, delta)] = self._capture(b, span, delta, pool, stream)
            except RuntimeError as e:
                if b <= min(DECODE_MAX_TOKENS, self.decode_rows):  # the buckets every engine has captured
                    raise
                # A bucket of chunked op calls, or one only prompt steps use, that does not capture
                # here: its steps run eagerly.
                logger.warning("steps of %d rows run without a CUDA graph (capture failed: %s)", b, e)
                torch.cuda.synchronize(self.device)
                self.graphs = {k: v for k, v in self.graphs.items() if k[0] != b}
                self.batches.remove(b)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t
        return self

    def _capture(self, b, span, delta, pool, stream):
        inp = self.inputs[b]
        # padding everywhere (no sequence runs during capture: every table row is scratch)
        inp.copy_(pack_step([], b, self.kv))
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Outside the capture: compiles Triton kernels, sizes cuBLAS workspaces and allocator blocks.
            for _ in range(2):
                self._forward(b, span, delta)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the delta loader thread may pin host memory meanwhile, which is not ours to stop.
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            out = self._forward(b, span, delta)
        return graph, out

    def _forward(self, b: int, span: int, delta: bool) -> torch.Tensor:
        """The forward of bucket ``b`` over the static inputs: logits ``[b, vocab + extra]`` by row."""
        head, tables, rows = self._views(b)
        wide = head.long()  # indices as int64 (one kernel inside the graph); the block tables stay int32
        plan = AttentionPlan(prefill=[], decode=list(range(b)), dec_rows=None, block_tables=tables,
                             seq_lens=head[3], span=span, other=[], offsets=list(range(b)))
        # seq_delta_slots stays empty: no host-side tenant grouping may happen inside a graph (DeltaSlots
        # then makes the single row-table call; steps with col-scaled tenants never get here).
        batch = BatchMapping(tokens=wide[0], positions=wide[1], delta_slots=head[2], gather=wide[2] + 1,
                             kv_slots=rows, seqs=[(i, 0, 1) for i in range(b)], last=rows, any_delta=delta,
                             seq_delta_slots=[], attn=plan, kv_index=wide[5])
        return self.model.forward_eager(batch, self.kv, self.slots)

    def _views(self, b: int):
        """Bucket ``b``'s static input as ``[6, b]`` rows, ``[b, max_blocks]`` block tables, and row ids."""
        inp = self.inputs[b]
        return inp[:6 * b].view(6, b), inp[6 * b:].view(b, self.width), self.rows[:b]

    # ------------------------------------------------------------------ per step

    def token_rows(self, groups):
        """The step's entry groups (per request, ``(kv_slot, start, new_tokens, delta_slot)`` entries)
        with every prompt chunk split into one-token rows, the layout :meth:`prepare` takes; None when
        the step is to run eagerly: more tokens than the largest bucket, or prompt rows that would read
        more than :data:`MAX_PROMPT_ROW_KEYS` cached keys together. A step of decode tokens only comes
        back as it is."""
        tokens = keys = 0
        for g in groups:
            for _, start, new, _ in g:
                n = len(new)
                tokens += n
                if n > 1:
                    keys += start * n + n * (n + 1) // 2
        if tokens > self.batches[-1] or keys > MAX_PROMPT_ROW_KEYS:
            return None
        if tokens == sum(len(g) for g in groups):
            return groups
        if tokens > self.max_tokens:  # (0: prompt chunks never replay)
            return None
        return [[(slot, start + i, [tok], d) for slot, start, new, d in g for i, tok in enumerate(new)]
                for g in groups]

    def prepare(self, entries, device_tokens: torch.Tensor | None = None) -> BatchMapping | None:
        """This step as a graph replay (a batch whose ``replay`` computes one logits row per entry),
        or None when it must run eagerly. ``entries`` as :meth:`BatchMapping.build` takes them, one
        token each (:meth:`token_rows` splits prompt chunks). ``device_tokens``: the step's input
        tokens as a device tensor in ``entries`` order, in place of the entries' own (a step launched
        before the previous one's tokens reached the host: they go from the previous step's sampling
        straight into this step's input buffer, on the device)."""
        if not entries or any(len(new) != 1 for _, _, new, _ in entries):
            return None
        b = pick(len(entries), self.batches)
        span = pick(max(e[1] for e in entries) + 1, self.spans)
        seq_slots = [e[3] for e in entries]
        if b is None or span is None or not self.slots.dispatch.graph_safe \
                or not self.slots.col_slots.isdisjoint(seq_slots):
            return None
        delta = any(s >= 0 for s in seq_slots)
        key, n = (b, span, delta), len(entries)
        if self.capture and key not in self.graphs:
            return None
        if not all(self.kv.ensure(slot, start + 1) for slot, start, _, _ in entries):
            return None  # out of blocks: the eager path says so
        host = pack_step(entries, b, self.kv)
        inp = self.inputs[b]
        head, _, rows = self._views(b)

        def replay() -> torch.Tensor:
            src = host
            if self.pin:
                inp.copy_(src.pin_memory(), non_blocking=True)
            else:
                inp.copy_(src)
            if device_tokens is not None:
                head[0].index_copy_(0, head[4, :n].long(), device_tokens.to(torch.int32))
            if self.capture:
                graph, out = self.graphs[key]
                graph.replay()
            else:
                out = self._forward(b, span, delta)
            self.replays += 1
            # A fresh tensor in the engine's order: the graph's own output is overwritten next replay.
            return out.index_select(0, head[4, :n])

        return BatchMapping(tokens=head[0], positions=head[1], delta_slots=head[2], gather=head[2], kv_slots=rows,
                            seqs=[(e[0], e[1], 1) for e in entries], last=head[4, :n], any_delta=delta,
                            seq_delta_slots=seq_slots, replay=replay, kv_index=head[5])

    def stats(self) -> dict:
        return {"graphs": len(self.graphs), "capture_s": self.capture_s, "replays": self.replays,
                "batch_buckets": self.batches, "span_buckets": self.spans}
