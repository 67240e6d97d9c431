"""Engine: continuous batching over one base and many deltas, on token ids only.

Requests join and leave the running batch every step; a step flattens the new tokens of every
running sequence (whole prompts for sequences just admitted, one token for the others), whatever
their tenant, into one forward of :class:`~bitdelta.serving.model.DeltaLlama`. A request whose
delta is not device-resident waits in the queue while its delta loads in the background; the others
keep decoding. The waiting queue is bounded (:class:`QueueFull` when it is full, the API's 429).
Keys/values live in a preallocated slotted cache: one slot per running sequence, ``max_len``
positions each, sized from free device memory (CUDA) or ``kv_cache_mb`` (CPU); a new sequence takes
the lowest free slot. With ``cuda_graphs`` on (the default on CUDA), steps where every sequence decodes
one token replay CUDA graphs captured when the engine is built (:mod:`bitdelta.serving.graphs`);
other steps run the forward eagerly.

    engine = Engine(model, slots, max_batch=32, max_queue=256); engine.start()
    req = engine.submit(Request(prompt=[1, 2, 3], tenant="zephyr", params=SamplingParams(max_tokens=8),
                                on_event=print))     # events: Event(token=..., finish=None) ..., Event(finish="length")
    engine.cancel(req)                               # e.g. on client disconnect: frees the slot next step
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import graphs as graphs_mod
from .model import BatchMapping, DeltaLlama, KVCache

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_queue``: retry later (HTTP 429)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy (argmax, exact)
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass
class Event:
    token: int | None = None
    finish: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    tenant: str | None = None  # None = the plain base
    params: SamplingParams = field(default_factory=SamplingParams)
    on_event: Callable[[Event], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    output: list[int] = field(default_factory=list)
    kv_slot: int | None = None
    delta_slot: int = -1
    finish_reason: str | None = None
    cancel_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    prefilled: bool = False


class Engine:
    """Continuous-batching scheduler + sampler around a :class:`DeltaLlama` and its :class:`DeltaSlots`."""

    def __init__(self, model: DeltaLlama, slots, max_batch: int = 64, max_queue: int = 256,
                 max_len: int | None = None, kv_cache_mb: float | None = None, gpu_memory_fraction: float = 0.9,
                 max_prefill_tokens: int = 4096, metrics=None, cuda_graphs: bool | None = None):
        """``cuda_graphs``: None (default) captures decode graphs when the model is on CUDA and falls
        back to eager decoding, with a warning, if that is not possible; True requires them (raises
        otherwise); False never captures."""
        self.model, self.slots, self.metrics = model, slots, metrics
        self.max_len = min(max_len or model.max_len, model.max_len)
        self.max_queue, self.max_prefill_tokens = max_queue, max_prefill_tokens
        per_seq = KVCache.bytes_per_sequence(model.num_layers, self.max_len, model.kv_heads, model.head_dim, model.dtype)
        if kv_cache_mb is not None:
            budget = int(kv_cache_mb * 2**20)
        elif model.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(model.device)
            budget = int(free - (1 - gpu_memory_fraction) * total)
        else:
            budget = 1024 * 2**20
        fits = budget // per_seq
        if fits < 1:
            raise ValueError(f"the KV cache budget ({budget / 2**20:.0f} MiB) holds no sequence of {self.max_len} tokens "
                             f"({per_seq / 2**20:.1f} MiB each); raise --kv-cache-mb or lower --max-model-len")
        self.max_batch = int(min(max_batch, fits))
        self.kv = KVCache(model.num_layers, self.max_batch, self.max_len, model.kv_heads, model.head_dim,
                          model.dtype, model.device)
        # A min-heap: the lowest free slot first keeps running sequences in low slots, and so decode
        # steps in small graph buckets (graph rows are KV slots).
        self.free_kv = list(range(self.max_batch))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cancelled: dict[int, str] = {}
        self.cond = threading.Condition()
        self.steps = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        slots.on_ready = self._wake
        self.graphs: graphs_mod.DecodeGraphs | None = self._capture_graphs(cuda_graphs)

    def _capture_graphs(self, want: bool | None):
        if want is False or (want is None and self.model.device.type != "cuda"):
            return None
        why = graphs_mod.unsupported(self.model, self.slots)
        if why is None:
            try:
                g = graphs_mod.DecodeGraphs(self.model, self.kv, self.slots, self.max_batch).setup()
            except Exception as e:  # noqa: BLE001 (auto mode decodes eagerly instead)
                if want:
                    raise
                logger.warning("CUDA-graph capture failed, decoding eagerly", exc_info=True)
                why = f"capture failed: {type(e).__name__}: {e}"
            else:
                logger.info("captured %d CUDA graphs (batch buckets %s, span buckets %s) in %.1f s", len(g.graphs),
                            g.batches, g.spans, g.capture_s)
                return g
        if want:
            raise ValueError(f"cuda_graphs=True but {why}")
        logger.info("CUDA graphs off: %s", why)
        return None

    # ------------------------------------------------------------------ public

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="bitdelta-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def submit(self, req: Request) -> Request:
        """Queues ``req``; raises :class:`QueueFull`, or ``ValueError`` for a prompt that cannot fit."""
        if not req.prompt:
            raise ValueError("the prompt is empty")
        if len(req.prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(req.prompt)} tokens; this model's context is {self.max_len} "
                             "tokens including at least one generated token")
        if req.tenant is not None and self.slots.get(req.tenant) is None:
            raise KeyError(req.tenant)
        if req.params.temperature > 0:
            req.generator = torch.Generator(device="cpu")
            req.generator.manual_seed(req.params.seed if req.params.seed is not None else torch.seed())
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.waiting.append(req)
            self.cond.notify_all()
        if req.tenant is not None:
            self.slots.prefetch(req.tenant)
        return req

    def cancel(self, req: Request, reason: str = "abort") -> None:
        """Stops ``req`` at the next step and frees its KV slot (no more events are sent)."""
        with self.cond:
            if req.finish_reason is None:
                self.cancelled[req.id] = reason
                self.cond.notify_all()

    def stats(self) -> dict:
        with self.cond:
            return {"waiting": len(self.waiting), "running": len(self.running), "max_batch": self.max_batch,
                    "free_kv_slots": len(self.free_kv), "max_len": self.max_len, "steps": self.steps,
                    "graph_replays": self.graphs.replays if self.graphs else 0}

    # ------------------------------------------------------------------ loop

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self._stop and not self.running and not self._admissible():
                        self.cond.wait(timeout=0.5)
                        self._drop_cancelled()
                    if self._stop:
                        return
                self.step()
        except Exception as e:  # a bug or device failure: fail every request loudly, stop serving
            logger.exception("engine loop failed")
            self.error = f"{type(e).__name__}: {e}"
            with self.cond:
                for r in list(self.running) + list(self.waiting):
                    self._finish(r, "error", error=self.error)
                self.running.clear()
                self.waiting.clear()

    def _admissible(self) -> bool:
        """Whether a waiting request could start now (called under the lock)."""
        self._drop_cancelled()
        if not self.waiting or not self.free_kv:
            return False
        for r in self.waiting:
            if r.tenant is None:
                return True
            e = self.slots.get(r.tenant)
            if e is None or e.error or e.slot is not None or e.host is not None:
                return True
        return False

    def _drop_cancelled(self) -> None:
        if not self.cancelled:
            return
        keep = deque()
        for r in self.waiting:
            if r.id in self.cancelled:
                self._finish(r, self.cancelled.pop(r.id))
            else:
                keep.append(r)
        self.waiting = keep
        for r in list(self.running):
            if r.id in self.cancelled:
                self._finish(r, self.cancelled.pop(r.id))

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        """Marks ``r`` done, frees its KV slot and delta reference, sends the final event (under the lock)."""
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        if r in self.running:
            self.running.remove(r)
        if r.kv_slot is not None:
            heapq.heappush(self.free_kv, r.kv_slot)
            r.kv_slot = None
        if r.tenant is not None and r.delta_slot >= 0:
            self.slots.release(r.tenant)
            r.delta_slot = -1
        self.cancelled.pop(r.id, None)
        if self.metrics:
            self.metrics.finished(r)
        if r.on_event:
            r.on_event(Event(finish=reason, error=error))

    def _admit(self) -> list[Request]:
        admitted, budget = [], self.max_prefill_tokens
        keep = deque()
        # An older request waiting for a free delta slot (its delta is in host memory, every slot is
        # held by running requests) holds back later delta requests, so a stream of requests for
        # resident tenants cannot keep the slots busy forever. A delta still loading blocks nobody.
        slot_blocked = False
        while self.waiting:
            r = self.waiting.popleft()
            if not self.free_kv or (admitted and len(r.prompt) > budget) or (slot_blocked and r.tenant is not None):
                keep.append(r)
                continue
            if r.tenant is not None:
                e = self.slots.get(r.tenant)
                if e is None:
                    self._finish(r, "error", error=f"model {r.tenant!r} was removed")
                    continue
                if e.error:
                    self._finish(r, "error", error=e.error)
                    continue
                slot = self.slots.acquire(r.tenant)
                if slot is None:  # loading in the background, or every slot is busy: wait
                    slot_blocked = slot_blocked or (e.slot is None and e.host is not None)
                    keep.append(r)
                    continue
                r.delta_slot = slot
            r.kv_slot = heapq.heappop(self.free_kv)
            budget -= len(r.prompt)
            admitted.append(r)
        self.waiting = keep
        return admitted

    def step(self) -> None:
        """Admits what fits, runs one forward over every running sequence, samples, emits, retires."""
        with self.cond:
            self._drop_cancelled()
            self.running += self._admit()
            batch_reqs = list(self.running)
        if not batch_reqs:
            return
        entries = []
        for r in batch_reqs:
            if not r.prefilled:
                entries.append((r.kv_slot, 0, list(r.prompt), r.delta_slot))
            else:
                entries.append((r.kv_slot, len(r.prompt) + len(r.output) - 1, [r.output[-1]], r.delta_slot))
        batch = self.graphs.prepare(entries) if self.graphs is not None else None  # None: not graphable
        if batch is None:
            batch = BatchMapping.build(entries, self.model.device)
        logits = self.model.forward(batch, self.kv, self.slots)
        tokens = self._sample(logits, batch_reqs)
        self.steps += 1
        with self.cond:
            for r, tok in zip(batch_reqs, tokens):
                r.prefilled = True
                if r.finish_reason is not None or r.id in self.cancelled:
                    continue
                r.output.append(tok)
                if self.metrics:
                    self.metrics.token(r)
                p = r.params
                stop = tok in p.stop_token_ids and not p.ignore_eos
                if r.on_event and not stop:
                    r.on_event(Event(token=tok))
                if stop:
                    self._finish(r, "stop")
                elif len(r.output) >= p.max_tokens or len(r.prompt) + len(r.output) >= self.max_len:
                    self._finish(r, "length")
            self._drop_cancelled()

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, r in enumerate(reqs):
            p = r.params
            if p.temperature <= 0:
                out.append(greedy[i])
                continue
            x = logits[i].float().cpu() / p.temperature
            if p.top_k and p.top_k > 0:
                kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
                x = x.masked_fill(x < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_x, order = torch.sort(x, descending=True)
                probs = torch.softmax(sorted_x, dim=-1)
                drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix with mass >= top_p
                x[order[drop]] = float("-inf")
            probs = torch.softmax(x, dim=-1)
            out.append(int(torch.multinomial(probs, 1, generator=r.generator)))
        return out
