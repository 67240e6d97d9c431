"""Engine: continuous batching over one base and many deltas, on token ids only.

Requests join and leave the running batch every step; a step flattens the new tokens of every
running sequence (one token for each decoding sequence, then prompt chunks), whatever their tenant,
into one forward of :class:`~bitdelta.serving.models.DeltaModel`. A step holds at most
``max_step_tokens`` tokens: decode tokens first (every running stream gets its token every step),
then what is left goes to prompts in arrival order, a prompt longer than that split into chunks over
several steps (the first chunk as a fresh prompt, later ones continuing over the sequence's cache);
only the step that completes a prompt samples its first token. So a long prompt never stalls the
running streams, and a step's cost stays bounded. With the default budget, a step in which nobody
is decoding (a burst of requests reaching an idle engine) takes up to ``max_prefill_tokens`` prompt
tokens instead: there is no stream's pace to protect, and one large prompt step costs less than
its chunks (per-step costs are paid once). A request whose delta is not device-resident
waits in the queue while its delta loads in the background and then while its copy into a delta
slot is in flight (on CUDA a side stream: see :mod:`bitdelta.serving.install_ticket`); the others
keep decoding. The waiting queue is bounded (:class:`QueueFull` when it is full, the API's 429).
Keys/values live in a paged cache (:mod:`bitdelta.serving.kv_cache`): a pool of fixed-size blocks,
sized from free device memory (CUDA) or ``kv_cache_mb`` (CPU), from which each running sequence gets
the blocks for its prompt when it is admitted and one more whenever its next token crosses a block
boundary; a sequence also takes the lowest free *sequence slot* (its penalty row),
``max_batch`` of them. When a decode step finds the pool empty, the most recently admitted running
sequence is preempted by recompute: its blocks are freed and it goes back to the front of the queue
with its prompt and the tokens it already produced as the context to prefill again, after which it
goes on where it stopped (its stream sees each token once). With ``cuda_graphs`` on (the default on
CUDA), steps replay CUDA graphs captured when the engine is built (:mod:`bitdelta.serving.graphs`):
decode steps, and steps of up to :data:`GRAPH_MAX_TOKENS` tokens whose prompt chunks are short
enough to run as one-token rows; other steps run the forward eagerly.

Sampling (:mod:`bitdelta.serving.sampling`) runs per request after the forward, outside any captured
graph: penalties on the request's logits row, then greedy or seeded sampling, then log-probabilities
when asked. A request that wants its prompt scored (``prompt_logprobs``) is prefilled as one-token
rows of its own sequence slot, :data:`SCORED_PREFILL_CHUNK` per step at most (and within the step's token
budget like any chunk), so every prompt position has logits.

Faults stay with the request that caused them. Sampling runs per request (a failure ends that request
with finish "error"); a request whose logits come out non-finite (a corrupt delta, an overflow, a
penalty pushing a huge logit past float32) ends with code ``invalid_output``; when a batched
forward raises, the step's sequences are retried one by
one, so only the culprit fails. A failure outside any one request (a bug, a broken device) stops the
loop: every request in flight gets an error event, :meth:`Engine.submit` raises
:class:`EngineUnavailable` (HTTP 503), and with ``auto_restart`` (the default) the engine resets its
KV state and serves again after a pause, at most ``max_restarts_per_minute`` times a minute.

    engine = Engine(model, slots, max_batch=32, max_queue=256); engine.start()
    req = engine.submit(Request(prompt=[1, 2, 3], tenant="zephyr", params=SamplingParams(max_tokens=8),
                                on_event=print))     # events: Event(token=..., finish=None) ..., Event(finish="length")
    engine.cancel(req)                               # e.g. on client disconnect: frees its blocks next step
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import graphs as graphs_mod
from .kv_cache import DEFAULT_BLOCK_SIZE, KVCache, blocks_for
from .lookahead import Ahead, greedy_only, lookahead_allowed, next_entries
from .mapping import BatchMapping
from .memory_plan import CPU_KV_CACHE_BYTES, kv_blocks_that_fit, kv_budget_from_free
from .models import DeltaModel
from .residency import DeltaState
from .sampling import (
    MIN_TEMPERATURE,
    InvalidRequest,
    PenaltyTable,
    SamplingParams,
    TokenLogprob,
    check_params,
    device_greedy,
    non_finite_message,
    on_device,
    sample_step,
    token_logprobs,
)

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_queue``: retry later (HTTP 429)."""


class EngineUnavailable(RuntimeError):
    """The engine loop is not running (stopped, or restarting after a failure): retry later (HTTP 503)."""


class EngineFailure(RuntimeError):
    """A failure that no single request explains (the model fails even on a probe): stops the loop."""


class PromptTooLong(InvalidRequest):
    """The prompt leaves no room in the context for a generated token (HTTP 400, context_length_exceeded)."""


# Prompt positions a scored prefill feeds per step: each is a one-token row whose attention reads
# the cache up to its position, so a step's attention memory grows with rows times prompt length.
# At most SCORED_PREFILL_CHUNK rows a step, fewer for long prompts (rows x length within the budget).
SCORED_PREFILL_CHUNK = 128
SCORED_PREFILL_POSITIONS = 1 << 17

# The step token budget when none is given: large enough that a step's matrix products run at full
# speed on a GPU (a few hundred rows already do), small enough that a step holding a prompt chunk
# next to the decode tokens is not much slower than a decode step, so streams keep their pace.
DEFAULT_STEP_TOKENS = 512
# Steps with prompt tokens replay CUDA graphs of up to this many rows (one per token; see
# serving.graphs): short prompts and chunks arriving while others decode, whose eager launches would
# stall every stream. Larger steps run eagerly, where prompt rows take the prefill ops.
GRAPH_MAX_TOKENS = DEFAULT_STEP_TOKENS
GRAPH_MAX_LOGITS_BYTES = 128 * 2**20  # a graph's logits for all its rows stay in its memory pool
PROMPT_GRAPHS_ENV = "BITDELTA_PROMPT_GRAPHS"  # 0: steps with prompt tokens always run eagerly


@dataclass
class Event:
    token: int | None = None
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs: the token's, from the raw logits
    # with SamplingParams.prompt_logprobs, on the event before the first token: one entry per prompt
    # token, None for the first (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    # with finish "error": "engine_error" (this request failed), "invalid_output" (non-finite logits),
    # "engine_unavailable" (the engine stopped or is restarting; retry later)
    code: str | None = None


# eq=False: a request is itself, not its fields. The engine looks requests up in its running list
# every step; field-wise equality made each lookup compare prompts and outputs.
@dataclass(eq=False)
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
    prompt_done: int = 0  # prompt tokens put in the KV cache so far (the prefill goes chunk by chunk)
    prompt_scores: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1, 2, ... so far
    # After a preemption: what is prefilled again (the prompt, then the tokens already produced);
    # None while the prefill is the prompt's own.
    context: list[int] | None = None
    preemptions: int = 0

    @property
    def prefill_tokens(self) -> list[int]:
        """The tokens this request's prefill puts in the cache (its prompt, or its context after a preemption)."""
        return self.prompt if self.context is None else self.context

    @property
    def scores_prompt(self) -> bool:
        """Whether its prefill scores each prompt position (asked for, and not a prefill after a preemption)."""
        return self.params.prompt_logprobs is not None and self.context is None


def check_limits(max_batch: int, max_queue: int, max_prefill_tokens: int = 4096,
                 max_step_tokens: int | None = None) -> None:
    """Raises ``ValueError`` naming the ``bitdelta serve`` flag when a limit is below 1 (an engine with
    no KV slot or no queue would report healthy and never answer)."""
    for flag, value in (("--max-batch", max_batch), ("--max-queue", max_queue),
                        ("--max-prefill-tokens", max_prefill_tokens)):
        if value is None or value < 1:
            raise ValueError(f"{flag} must be at least 1 (got {value!r})")
    if max_step_tokens is not None and max_step_tokens < 1:
        raise ValueError(f"--max-step-tokens must be at least 1 (got {max_step_tokens!r})")


def step_token_budget(max_step_tokens: int | None, max_batch: int) -> int:
    """The tokens one step may hold: ``max_step_tokens`` (default :data:`DEFAULT_STEP_TOKENS`, raised
    to ``max_batch``). Every running stream decodes one token per step, so a budget below
    ``max_batch`` could leave a full batch no room to decode: refused with the flags to change."""
    if max_step_tokens is None:
        return max(DEFAULT_STEP_TOKENS, max_batch)
    if max_step_tokens < max_batch:
        raise ValueError(f"--max-step-tokens ({max_step_tokens}) must be at least --max-batch ({max_batch}): every "
                         "running sequence decodes one token per step; raise the first or lower the second")
    return max_step_tokens


class Engine:
    """Continuous-batching scheduler + sampler around a :class:`DeltaModel` and its :class:`DeltaSlots`."""

    def __init__(self, model: DeltaModel, slots, max_batch: int = 64, max_queue: int = 256,
                 max_len: int | None = None, kv_cache_mb: float | None = None, gpu_memory_fraction: float = 0.9,
                 max_prefill_tokens: int = 4096, metrics=None, cuda_graphs: bool | None = None,
                 auto_restart: bool = True, restart_delay_s: float = 1.0, max_restarts_per_minute: int = 5,
                 wrap_forward=None, max_step_tokens: int | None = None, kv_block_size: int = DEFAULT_BLOCK_SIZE,
                 lookahead: bool | None = None):
        """``cuda_graphs``: None (default) captures decode graphs when the model is on CUDA and falls
        back to eager decoding, with a warning, if that is not possible; True requires them (raises
        otherwise); False never captures. ``auto_restart``: after a failure that stops the loop, wait
        ``restart_delay_s`` and serve again with a fresh KV state, at most ``max_restarts_per_minute``
        times in any 60 s (then the engine stays down until the process restarts).
        ``wrap_forward(run, batch) -> logits``, for measurements: called in place of each step's
        forward, with ``run()`` doing that forward (benchmarks time and profile steps through it).
        ``max_step_tokens``: the tokens one step holds, decode tokens and prompt chunks together (see
        :func:`step_token_budget`); ``max_prefill_tokens``: at most this many of them prompt tokens
        (a step's prompt chunks together; the default, 4096, leaves ``max_step_tokens`` the limit).
        Left at its default, the budget widens to ``max_prefill_tokens`` in steps where no sequence
        decodes; a ``max_step_tokens`` given is a hard cap on every step.
        ``kv_cache_mb`` is the paged KV cache's budget in bytes of keys and values, ``kv_block_size``
        the positions per block; ``max_batch`` caps the sequences running at once (and their slots).
        ``lookahead``: launch greedy decode steps ahead (:mod:`bitdelta.serving.lookahead`); None: env
        ``BITDELTA_LOOKAHEAD`` (default: on with captured CUDA graphs)."""
        check_limits(max_batch, max_queue, max_prefill_tokens, max_step_tokens)
        self.model, self.slots, self.metrics = model, slots, metrics
        self.wrap_forward = wrap_forward
        self.max_len = min(max_len or model.max_len, model.max_len)
        self.max_queue, self.max_prefill_tokens = max_queue, max_prefill_tokens
        per_block = KVCache.bytes_per_block(model.num_layers, kv_block_size, model.kv_heads, model.head_dim,
                                            model.dtype)
        per_seq_blocks = blocks_for(self.max_len, kv_block_size)
        if kv_cache_mb is not None:
            budget = int(kv_cache_mb * 2**20)
        elif model.device.type == "cuda":  # what the base, the delta pool and the allocator's cache leave
            free, total = torch.cuda.mem_get_info(model.device)
            cached = torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
            budget = kv_budget_from_free(free + cached, total, gpu_memory_fraction)
        else:
            budget = CPU_KV_CACHE_BYTES
        num_blocks = kv_blocks_that_fit(budget, per_block, per_seq_blocks, self.max_len,
                                        sized_from_free=kv_cache_mb is None and model.device.type == "cuda")
        # More blocks than max_batch whole-context sequences need could never be used.
        num_blocks = min(num_blocks, max_batch * per_seq_blocks)
        self.max_batch = min(max_batch, num_blocks)  # every running sequence holds at least one block
        self.max_step_tokens = step_token_budget(max_step_tokens, self.max_batch)
        # Only the default budget widens when nobody decodes: a budget asked for is a hard cap.
        self.widen_idle_steps = max_step_tokens is None
        self.kv = KVCache(model.num_layers, self.max_batch, self.max_len, model.kv_heads, model.head_dim,
                          model.dtype, model.device, num_blocks=num_blocks, block_size=kv_block_size)
        self.kv_cache_bytes = self.kv.nbytes
        self.preemptions = 0
        # Sequence slots (penalty rows), a min-heap: the lowest free slot first.
        self.free_kv = list(range(self.max_batch))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cancelled: dict[int, str] = {}
        self.cond = threading.Condition()
        self.steps = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._exited = False  # the loop thread has ended (shutdown, or down for good): submit refuses
        self.error: str | None = None  # set while the loop is down (restarting or stopped)
        self.last_error: str | None = None
        self.restarting = False
        self.restart_count = 0
        self.request_errors = 0  # requests ended by their own fault (the engine went on)
        self.auto_restart, self.restart_delay_s = auto_restart, restart_delay_s
        self.max_restarts_per_minute = max_restarts_per_minute
        self._restarts: deque[float] = deque()  # monotonic times of recent restarts
        slots.on_ready = self._wake
        self._want_graphs = cuda_graphs
        self.graphs: graphs_mod.DecodeGraphs | None = self._capture_graphs(cuda_graphs)
        self.lookahead = lookahead
        self.ahead: Ahead | None = None  # a decode step in flight, launched by the step before
        self.ahead_steps = 0  # steps launched ahead
        self.prompt_graph_steps = 0  # steps with prompt tokens that replayed a graph
        self.read_batch = None  # the BatchMapping whose logits the last step read (for measurements)
        # rows are sequence slots; columns every token a step's logits can hold (the base's and added ones)
        self.penalties = PenaltyTable(self.max_batch, model.vocab_size + getattr(slots, "max_extra", 0), model.device)

    def _capture_graphs(self, want: bool | None):
        if want is False or (want is None and self.model.device.type != "cuda"):
            return None
        why = graphs_mod.unsupported(self.model, self.slots)
        if why is None:
            max_tokens = self._graph_tokens()  # (a bad BITDELTA_PROMPT_GRAPHS raises, not "capture failed")
            try:
                g = graphs_mod.DecodeGraphs(self.model, self.kv, self.slots, self.max_batch,
                                            max_tokens=max_tokens).setup()
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

    def _graph_tokens(self) -> int:
        """The most rows of a step with prompt tokens that replays a graph: the step budget, at most
        :data:`GRAPH_MAX_TOKENS`, and fewer for a vocabulary so large that a bucket's logits (one row
        per token, float32) would pass :data:`GRAPH_MAX_LOGITS_BYTES` (or low-rank factors gathered per
        row, their two temporaries); 0 (prompt steps run eagerly) with env ``BITDELTA_PROMPT_GRAPHS=0``."""
        choice = os.environ.get(PROMPT_GRAPHS_ENV, "1").strip() or "1"
        if choice not in ("0", "1"):
            raise ValueError(f"{PROMPT_GRAPHS_ENV} must be 1 or 0 (got {choice!r})")
        if choice == "0":
            return 0
        width = self.model.vocab_size + getattr(self.slots, "max_extra", 0)
        by_logits = GRAPH_MAX_LOGITS_BYTES // (4 * width)
        # Low-rank terms in a graph gather each row's factors ([rows, out, rank] and [rows, rank, in]): the
        # same budget bounds those temporaries for the widest matrix.
        rank = getattr(self.slots, "max_lowrank_rank", 0)
        if rank:
            widest = max(max(n, k) for n, k in self.model.delta_modules().values())
            by_logits = min(by_logits, GRAPH_MAX_LOGITS_BYTES // (2 * rank * widest * self.model.dtype.itemsize))
        return max(0, min(self.max_step_tokens, GRAPH_MAX_TOKENS, by_logits))

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
        """Queues ``req``; raises :class:`QueueFull`, :class:`EngineUnavailable` when the loop is down,
        :class:`PromptTooLong` or :class:`InvalidRequest` (both ``ValueError``) for a request that cannot run."""
        if not req.prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        if len(req.prompt) >= self.max_len:
            raise PromptTooLong(f"the prompt has {len(req.prompt)} tokens; this model's context is {self.max_len} "
                                "tokens including at least one generated token", "prompt")
        need = self.kv.blocks_needed(len(req.prompt) + 1)
        if need > self.kv.num_blocks:
            raise PromptTooLong(f"the prompt has {len(req.prompt)} tokens; with its first generated token it needs "
                                f"{need} KV-cache blocks of {self.kv.block_size} tokens and the whole cache holds "
                                f"{self.kv.num_blocks}", "prompt")
        check_params(req.params)
        seed = req.params.seed
        if req.tenant is not None and self.slots.get(req.tenant) is None:
            raise KeyError(req.tenant)
        if req.params.temperature >= MIN_TEMPERATURE:
            req.generator = torch.Generator(device="cpu")
            req.generator.manual_seed(seed if seed is not None else torch.seed())
        with self.cond:
            # Under the lock the loop fails queued requests with: a request is either refused here or
            # answered by the loop (finished, or failed when the loop goes down), never left hanging.
            if self._exited or self.error is not None:
                raise EngineUnavailable(self.down_reason())
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.waiting.append(req)
            self.cond.notify_all()
        if req.tenant is not None:
            self.slots.prefetch(req.tenant)
        return req

    def cancel(self, req: Request, reason: str = "abort") -> None:
        """Stops ``req`` at the next step and frees its KV blocks and slot (no more events are sent)."""
        with self.cond:
            if req.finish_reason is None:
                self.cancelled[req.id] = reason
                self.cond.notify_all()

    def stats(self) -> dict:
        with self.cond:
            return {"waiting": len(self.waiting), "running": len(self.running), "max_batch": self.max_batch,
                    "free_kv_slots": len(self.free_kv), "max_len": self.max_len, "steps": self.steps,
                    "kv_blocks_free": self.kv.blocks_free, "kv_blocks_total": self.kv.num_blocks,
                    "kv_block_size": self.kv.block_size, "preemptions": self.preemptions,
                    "max_step_tokens": self.max_step_tokens,
                    "graph_replays": self.graphs.replays if self.graphs else 0,
                    "prompt_graph_steps": self.prompt_graph_steps,
                    "request_errors": self.request_errors, "restart_count": self.restart_count,
                    "restarting": self.restarting, "auto_restart": self.auto_restart, "last_error": self.last_error}

    def down_reason(self) -> str:
        """Why the engine does not take requests now (what a 503 says)."""
        if self.error is None:
            return "the engine is not running (not started yet, or shutting down)"
        if self.restarting:
            return f"the engine failed and is restarting ({self.error}); retry in a few seconds"
        return f"the engine stopped: {self.error}"

    # ------------------------------------------------------------------ loop

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _loop(self) -> None:
        try:
            while True:
                try:
                    self._serve()
                    return  # shutdown
                except Exception as e:  # a bug or a device failure: fail what is in flight, maybe restart
                    if not self._failed(e):
                        return
        finally:
            with self.cond:
                self._exited = True
                if self.error is None and not self._stop:
                    self.error = "the engine loop ended unexpectedly"
                pending = list(self.running) + list(self.waiting)
                for r in pending:
                    self._finish(r, "error", error=self.down_reason(), code="engine_unavailable")
                self.running.clear()
                self.waiting.clear()

    def _serve(self) -> None:
        """Steps until shutdown; resets the engine first after a failure."""
        if self.restarting:
            self._reset()
            with self.cond:
                self.restart_count += 1
                self.restarting, self.error = False, None
            logger.warning("engine restarted (%d restarts so far)", self.restart_count)
        while True:
            with self.cond:
                while not self._stop and not self.running and not self._admissible():
                    self.cond.wait(timeout=0.5)
                    self._drop_cancelled()
                if self._stop:
                    return
            self.step()

    def _failed(self, e: Exception) -> bool:
        """Fails every request in flight; returns whether to restart (after the back-off pause)."""
        logger.exception("engine loop failed")
        msg = f"{type(e).__name__}: {e}"
        now = time.monotonic()
        with self.cond:
            self.ahead = None
            while self._restarts and now - self._restarts[0] > 60:
                self._restarts.popleft()
            self.last_error = msg
            self.restarting = (self.auto_restart and not self._stop
                               and len(self._restarts) < self.max_restarts_per_minute)
            if self.restarting:
                self._restarts.append(now)
                self.error = msg
            elif not self.auto_restart:
                self.error = f"{msg} (automatic restart is off: restart the server)"
            else:
                self.error = (f"{msg} (the engine failed {len(self._restarts) + 1} times within a minute and stays "
                              "down: restart the server and check its log)")
            for r in list(self.running) + list(self.waiting):
                self._finish(r, "error", error=self.down_reason(), code="engine_unavailable")
            self.running.clear()
            self.waiting.clear()
            if not self.restarting:
                return False
            # Back off so that a persistent fault does not spin; shutdown cuts the pause short.
            self.cond.wait_for(lambda: self._stop, timeout=self.restart_delay_s)
            return not self._stop

    def _reset(self) -> None:
        """A fresh KV state: every slot and block free, the cache zeroed in place (captured graphs keep
        pointing at it); on CUDA the decode graphs are captured again."""
        with self.cond:
            self.ahead = None
            self.running.clear()
            self.cancelled.clear()
            self.free_kv = list(range(self.max_batch))
            self.kv.reset()
        if self.graphs is not None and self.graphs.capture:
            self.graphs = None
            self.graphs = self._capture_graphs(self._want_graphs)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)  # a device that is still broken fails here, not mid-request

    def _admissible(self) -> bool:
        """Whether a waiting request could start now (called under the lock)."""
        self._drop_cancelled()
        if not self.waiting or not self.free_kv:
            return False
        for r in self.waiting:  # anything but a delta still loading can start (or fail) now
            if r.tenant is None or self.slots.state(r.tenant) is not DeltaState.LOADING:
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

    def _emit(self, r: Request, ev: Event) -> None:
        """Sends ``ev`` to ``r``'s callback; a failing callback cancels its own request, nothing else."""
        if r.on_event is None:
            return
        try:
            r.on_event(ev)
        except Exception:  # noqa: BLE001 (e.g. the client's event loop has closed)
            logger.warning("request %d: its event callback failed; cancelling it", r.id, exc_info=True)
            if r.finish_reason is None:
                self.cancelled[r.id] = "abort"

    def _finish(self, r: Request, reason: str, error: str | None = None, code: str | None = None) -> None:
        """Marks ``r`` done, frees its KV blocks, slot and delta reference, sends the final event (under the lock)."""
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        self._let_go(r)
        self.cancelled.pop(r.id, None)
        if self.metrics:
            self.metrics.finished(r)
        self._emit(r, Event(finish=reason, error=error, code=(code or "engine_error") if reason == "error" else None))

    def _let_go(self, r: Request) -> None:
        """Takes ``r`` out of the running batch: its KV blocks, sequence slot and delta reference go back."""
        if r in self.running:
            self.running.remove(r)
        if r.kv_slot is not None:
            self.kv.release(r.kv_slot)
            heapq.heappush(self.free_kv, r.kv_slot)
            r.kv_slot = None
        if r.tenant is not None and r.delta_slot >= 0:
            r.delta_slot = -1
            self.slots.release(r.tenant)

    def _preempt(self, r: Request) -> None:
        """Preemption by recompute: ``r`` frees everything it holds and goes back to the front of the
        queue, to prefill its prompt and the tokens it already produced again (called under the lock)."""
        logger.info("request %d: preempted (KV cache full), %d tokens to prefill again", r.id,
                    len(r.prompt) + len(r.output))
        self._let_go(r)
        if r.prefilled:
            r.context = r.prompt + r.output
            r.prefilled = False
        r.prompt_done = 0
        r.prompt_scores = []  # a scored prefill cut short scores again from its start
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def _grow(self, r: Request) -> bool:
        """Gives decoding ``r`` the block its next token needs, preempting the most recently admitted
        running sequences while the pool is empty; False when that was ``r`` itself (called under the lock)."""
        length = len(r.prompt) + len(r.output)
        while not self.kv.ensure(r.kv_slot, length):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is r:
                return False
        return True

    def _schedule(self) -> list[tuple[Request, int]]:
        """This step's sequences and how many new tokens each brings (called under the lock).

        Decoding sequences first, one token each; then the step's token budget left goes to prompts
        in arrival order: those already part way through their prefill, then waiting requests, which
        are admitted (a sequence slot, KV blocks, their delta's slot) only when some of their prompt
        fits this step. A decoding sequence whose next token needs a block the pool does not have
        preempts the most recently admitted running sequences (see :meth:`_grow`); nobody is admitted
        in that step. A running prefill the budget does not reach this step brings nothing (``0``)."""
        plan = []
        preempted = self.preemptions
        for r in list(self.running):  # admission order: the newest are preempted first
            # kv_slot None: preempted by an earlier sequence's _grow in this loop
            if r.prefilled and r.kv_slot is not None and self._grow(r):
                plan.append((r, 1))
        room = self.max_step_tokens - len(plan)
        if not plan and self.widen_idle_steps:  # nobody decodes: no stream's pace to protect
            room = max(room, self.max_prefill_tokens)
        budget = min(room, self.max_prefill_tokens)
        for r in self.running:
            if not r.prefilled:
                take = self._chunk(r, budget)
                budget -= take
                plan.append((r, take))
        if self.preemptions != preempted:  # the pool just ran dry: admit nobody this step
            return plan
        for r in self._admit(budget):
            plan.append((r, self._chunk(r, budget)))
            budget -= plan[-1][1]
        return plan

    @staticmethod
    def _chunk(r: Request, budget: int) -> int:
        """Prompt tokens ``r`` puts in the cache this step, out of ``budget``."""
        left = len(r.prefill_tokens) - r.prompt_done
        if r.scores_prompt:  # one-token rows, each reading the cache up to its position
            left = min(left, max(1, min(SCORED_PREFILL_CHUNK, SCORED_PREFILL_POSITIONS // len(r.prompt))))
        return max(0, min(left, budget))

    def _admit(self, budget: int) -> list[Request]:
        """Moves waiting requests that can start into ``running``, in arrival order, while ``budget``
        (prompt tokens this step) lasts and the KV pool holds their prefill and first token besides the
        blocks running sequences need for their next token (so that admitting does not force a
        preemption at once); returns them."""
        admitted = []
        keep = deque()
        # An older request waiting for a free delta slot (its delta is in host memory, every slot is
        # held by running requests) holds back later delta requests, so a stream of requests for
        # resident tenants cannot keep the slots busy forever. A delta still loading blocks nobody.
        slot_blocked = False
        pool_blocked = False  # the oldest waiting request does not fit the pool: later ones wait behind it
        reserved = sum(self._next_block_need(r) for r in self.running)
        while self.waiting:
            r = self.waiting.popleft()
            if not self.free_kv or budget < 1 or pool_blocked or (slot_blocked and r.tenant is not None):
                keep.append(r)
                continue
            if self.kv.blocks_needed(len(r.prefill_tokens) + 1) + reserved > self.kv.blocks_free:
                pool_blocked = True
                keep.append(r)
                continue
            if r.tenant is not None:
                state = self.slots.state(r.tenant)
                if state is None:
                    self._finish(r, "error", error=f"model {r.tenant!r} was removed")
                    continue
                if state is DeltaState.FAILED:
                    self._finish(r, "error", error=self.slots.error(r.tenant))
                    continue
                # A delta's copy into its slot (CUDA: a side stream) is waited for only when nothing runs:
                # otherwise the running streams decode on and the request is admitted once it landed.
                delta_slot = self.slots.acquire(r.tenant, wait=not self.running and not admitted)
                if delta_slot is None:  # loading, installing, or every delta slot is busy: wait
                    slot_blocked = slot_blocked or self.slots.state(r.tenant) is DeltaState.WAITING_FOR_SLOT
                    keep.append(r)
                    continue
                r.delta_slot = delta_slot
            r.kv_slot = heapq.heappop(self.free_kv)
            self.kv.release(r.kv_slot)  # (a slot is empty unless a caller drove the model in it directly)
            self.kv.ensure(r.kv_slot, len(r.prefill_tokens))
            reserved += self._next_block_need(r)
            budget -= self._chunk(r, budget)
            admitted.append(r)
        self.waiting = keep
        self.running += admitted
        return admitted

    def _next_block_need(self, r: Request) -> int:
        """Blocks running ``r`` lacks for its next generated token (0 or 1)."""
        return self.kv.missing(r.kv_slot, len(r.prompt) + len(r.output) + 1)

    @staticmethod
    def _entries(r: Request, take: int) -> list[tuple[int, int, list[int], int]]:
        """``r``'s sequences in this step, as :meth:`BatchMapping.build` takes them: its next token,
        or the next ``take`` prompt tokens (the first chunk a fresh prompt, later ones continuing)."""
        if r.prefilled:
            return [(r.kv_slot, len(r.prompt) + len(r.output) - 1, [r.output[-1]], r.delta_slot)]
        start, end = r.prompt_done, r.prompt_done + take
        if not r.scores_prompt:
            return [(r.kv_slot, start, list(r.prefill_tokens[start:end]), r.delta_slot)]
        # A scored prefill: one-token rows of the same sequence slot, each with its own logits. Every row
        # writes its key/value before any row attends, so each sees exactly the positions before it.
        return [(r.kv_slot, i, [r.prompt[i]], r.delta_slot) for i in range(start, end)]

    def step(self) -> None:
        """Admits what fits, runs one forward over this step's tokens (see :meth:`_schedule`),
        samples, emits, retires.

        With a step launched ahead by the previous call (:mod:`bitdelta.serving.lookahead`), its
        forward is this step's; either way the next decode step may be launched before this one's
        tokens are read.

        Raises (stopping the loop) only for a failure no single request explains."""
        ahead, self.ahead = self.ahead, None
        with self.cond:
            self._drop_cancelled()
        failed: list[tuple[Request, str]] = []
        if ahead is not None and ahead.live():  # the running batch, launched ahead with its tokens
            batch_reqs, groups, logits = ahead.reqs, ahead.groups, ahead.logits
            self.read_batch = ahead.batch
        else:
            plan = self._plan()
            if not plan:
                return
            batch_reqs = [r for r, _ in plan]
            groups = [self._entries(r, take) for r, take in plan]
            logits, batch_reqs, groups, failed = self._forward(batch_reqs, groups)
        due, rows, scores = self._read_rows(batch_reqs, groups)
        greedy = self._launch_ahead(batch_reqs, due, rows, logits) if not failed and not scores else None
        outcomes = sample_step(logits, rows, due, self.penalties, greedy=greedy) if due else []
        scored = self._score_prompts(logits, scores)
        self.steps += 1
        with self.cond:
            for r, msg in failed:
                if r.finish_reason is None:
                    self.request_errors += 1
                    self._finish(r, "error", error=msg, code="engine_error")
            for r, g in zip(batch_reqs, groups):
                if not r.prefilled:
                    r.prompt_done += sum(len(new) for _, _, new, _ in g)
                bad = scored.get(r.id)
                if bad is not None and r.finish_reason is None and r.id not in self.cancelled:
                    self.request_errors += 1
                    self._finish(r, "error", error=bad, code="invalid_output")
            for r, o in zip(due, outcomes):
                first = not r.prefilled
                r.prefilled = True
                if r.finish_reason is not None or r.id in self.cancelled:
                    continue
                if o.error is not None:
                    self.request_errors += 1
                    self._finish(r, "error", error=o.error, code=o.code)
                    continue
                tok = o.token
                r.output.append(tok)
                if self.metrics:
                    self.metrics.token(r)
                if first and r.scores_prompt:
                    self._emit(r, Event(prompt_logprobs=[None, *r.prompt_scores]))
                p = r.params
                stop = tok in p.stop_token_ids or (tok in p.eos_token_ids and not p.ignore_eos)
                if not stop:
                    self._emit(r, Event(token=tok, logprob=o.logprob))
                if stop:
                    self._finish(r, "stop")
                elif len(r.output) >= p.max_tokens or len(r.prompt) + len(r.output) >= self.max_len:
                    self._finish(r, "length")
            self._drop_cancelled()

    def _plan(self) -> list[tuple[Request, int]]:
        """This step's schedule (requests with at least one token each); penalty rows of newly
        admitted requests started."""
        with self.cond:
            before = set(map(id, self.running))
            plan = self._schedule()
        for r, _ in plan:
            if id(r) not in before and r.params.penalized:
                self.penalties.start(r.kv_slot, r.prompt)
                if r.output:  # readmitted after a preemption: what it generated so far counts again
                    self.penalties.record([r.kv_slot] * len(r.output), r.output)
        return [(r, take) for r, take in plan if take > 0]

    def _forward(self, batch_reqs: list[Request], groups):
        """The step's forward (a graph replay when it fits one: its prompt chunks then become one-token
        rows, each with its logits). Returns the logits, the requests and entry groups they cover, and
        (request, message) for those that failed on their own."""
        try:
            batch = None
            rows = self.graphs.token_rows(groups) if self.graphs is not None else None
            if rows is not None:
                batch = self.graphs.prepare([e for g in rows for e in g])
            if batch is None:  # not graphable
                batch = BatchMapping.build([e for g in groups for e in g], self.model.device, self.kv)
            else:
                if rows is not groups:
                    self.prompt_graph_steps += 1
                groups = rows
            self.read_batch = batch
            return self._run(batch), batch_reqs, groups, []
        except Exception as e:  # noqa: BLE001 (find the request that caused it; the rest go on)
            return self._isolate(batch_reqs, groups, e)

    def _run(self, batch) -> torch.Tensor:
        if self.wrap_forward is None:
            return self.model.forward(batch, self.kv, self.slots)
        return self.wrap_forward(lambda: self.model.forward(batch, self.kv, self.slots), batch)

    def _launch_ahead(self, batch_reqs: list[Request], due: list[Request], rows: list[int],
                      logits: torch.Tensor) -> torch.Tensor | None:
        """Launches the next decode step before this one's tokens are read, when it may (see
        :mod:`bitdelta.serving.lookahead`); returns this step's greedy tokens, computed on the device
        and already copied to the host (which this step's sampling then reads), or None when it
        launched nothing."""
        if not due or len(due) != len(batch_reqs) or not lookahead_allowed(self.lookahead, self.graphs):
            return None
        if not all(greedy_only(r) for r in due):
            return None
        with self.cond:
            if self.cancelled or self._admissible():
                return None
            keep, entries = next_entries(due, self.max_len)
        greedy = device_greedy(logits, rows)
        if not entries:
            return greedy
        # This step's tokens start for the host now, ahead of the next step in the stream: reading
        # them later waits for this step's work only, not for the step launched below.
        read = greedy
        if greedy.is_cuda:
            read = torch.empty(greedy.shape, dtype=greedy.dtype, pin_memory=True)
            read.copy_(greedy, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record()
        tokens = greedy if len(keep) == len(due) else greedy.index_select(0, on_device(keep, greedy.device))
        # a row that is not finite (-1) fails its request when this step is read; its row ahead is dropped
        batch = self.graphs.prepare(entries, device_tokens=tokens.clamp(min=0))
        if batch is not None:  # else no graph for it, or the KV pool is out of blocks: the next step schedules
            try:
                logits_ahead = self._run(batch)
            except Exception:  # noqa: BLE001 (the next step schedules and runs it the usual way)
                logger.warning("a decode step launched ahead failed; running it the usual way", exc_info=True)
            else:
                self.ahead = Ahead([due[i] for i in keep], [[e] for e in entries], logits_ahead, batch)
                self.ahead_steps += 1
        if greedy.is_cuda:
            landed.synchronize()
        return read

    @staticmethod
    def _read_rows(reqs: list[Request], groups):
        """Which logits rows this step reads: (requests due a token, their rows) and, for scored
        prefills, (request, row, the prompt token that row predicts) per prompt position. A request
        is due a token when it decodes, or when this step's chunk completes its prompt."""
        due, rows, scores, at = [], [], [], 0
        for r, g in zip(reqs, groups):
            n = len(g)
            if not r.prefilled:
                if r.scores_prompt:
                    for j in range(n):
                        pos = r.prompt_done + j
                        if pos + 1 < len(r.prompt):
                            scores.append((r, at + j, r.prompt[pos + 1]))
                if r.prompt_done + sum(len(new) for _, _, new, _ in g) < len(r.prefill_tokens):  # more to come
                    at += n
                    continue
            due.append(r)
            rows.append(at + n - 1)
            at += n
        return due, rows, scores

    @staticmethod
    def _score_prompts(logits: torch.Tensor | None, scores) -> dict[int, str]:
        """Appends each scored prompt position's log-probabilities to its request; returns an error
        message per request whose rows were not finite (or could not be scored)."""
        if not scores:
            return {}
        bad: dict[int, str] = {}
        try:
            k = max(r.params.prompt_logprobs for r, _, _ in scores)
            results = token_logprobs(logits, [row for _, row, _ in scores], [t for _, _, t in scores], k)
        except Exception as e:  # noqa: BLE001 (fail the scored requests, not the step)
            logger.warning("scoring prompts failed", exc_info=True)
            return {r.id: f"scoring the prompt failed: {type(e).__name__}: {e}" for r, _, _ in scores}
        for (r, _, _), lp in zip(scores, results):
            if lp is None:
                bad[r.id] = non_finite_message(r.tenant)
            elif r.id not in bad:
                lp.top = lp.top[:r.params.prompt_logprobs]
                r.prompt_scores.append(lp)
        return bad

    def _isolate(self, reqs: list[Request], groups, exc: Exception):
        """After a batched forward raised: runs each request's sequences alone. Returns the logits of
        those that succeeded, those requests and their entry groups, and (request, error message) for
        those that failed. Raises :class:`EngineFailure` when every one failed and so does a probe on
        the plain base (the model or device is broken, not a request)."""
        logger.warning("a forward of %d sequences failed (%s: %s); running each alone", len(reqs),
                       type(exc).__name__, exc)
        rows, ok, ok_groups, failed = [], [], [], []
        for r, group in zip(reqs, groups):
            try:
                rows.append(self.model.forward(BatchMapping.build(group, self.model.device, self.kv), self.kv,
                                               self.slots))
                ok.append(r)
                ok_groups.append(group)
            except Exception as e:  # noqa: BLE001
                logger.warning("request %d (model %s) fails on its own: %s: %s", r.id, r.tenant or "base",
                               type(e).__name__, e)
                failed.append((r, f"the model's forward failed on this request: {type(e).__name__}: {e}"))
        if not ok:
            # One token of the plain base, written into a slot a failed request holds (it is freed
            # anyway): if even this fails, no request is to blame.
            probe = [(failed[0][0].kv_slot, 0, [0], -1)]
            try:
                self.model.forward(BatchMapping.build(probe, self.model.device, self.kv), self.kv, self.slots)
            except Exception as e:
                raise EngineFailure(f"the model's forward fails even on a one-token probe: {type(e).__name__}: {e}") \
                    from exc
        return (torch.cat(rows) if rows else None), ok, ok_groups, failed
