"""Decode steps launched ahead: the next step goes to the GPU before this step's tokens reach the host.

Why: between two decode steps the GPU would wait for the host, which reads the step's tokens back,
emits them, retires what finished, schedules the next step, packs its inputs and launches its graph.
With a step launched ahead that host work overlaps the GPU's next step: as soon as step i's forward
is queued, its greedy tokens are taken on the device and step i+1 is queued with them as its inputs
(:meth:`~bitdelta.serving.graphs.DecodeGraphs.prepare` with ``device_tokens``); only then does the
host wait for step i's tokens, emit them and retire what finished. The next
:meth:`~bitdelta.serving.engine.Engine.step` takes step i+1's logits as its forward and launches
step i+2 the same way, so the GPU always has the next step queued.

When: a step launched ahead is the running batch again, one token each, so it is launched only
when that is what the scheduler would do next: every sequence of step i is due a token (no prompt
part way through), every one greedy without penalties or log-probabilities (its next input is the
argmax, known on the device), nothing waiting that could be admitted now (admission changes the
batch: that request is admitted at the step after, at most one step later than without), no
cancellation pending, the step fits a captured graph and the KV pool has its blocks. A sequence
whose token i ends it (``max_tokens``, the context length) is left out; one that stops on a stop or
EOS token, fails or is cancelled had a row in the step ahead, whose result is dropped.

Switch: ``Engine(lookahead=)``, else env ``BITDELTA_LOOKAHEAD``: ``auto`` (default: on with
captured CUDA graphs), ``1`` (also with graphs run eagerly, as the CPU tests do), ``0`` (off).

    ahead = Ahead(reqs, groups, logits, batch)    # what Engine.step consumes next instead of scheduling
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .sampling import MIN_TEMPERATURE

LOOKAHEAD_ENV = "BITDELTA_LOOKAHEAD"


def lookahead_choice() -> str:
    """Env ``BITDELTA_LOOKAHEAD``: ``auto`` (default), ``1`` or ``0``."""
    choice = os.environ.get(LOOKAHEAD_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "1", "0"):
        raise ValueError(f"{LOOKAHEAD_ENV} must be auto, 1 or 0 (got {choice!r})")
    return choice


def lookahead_allowed(asked: bool | None, graphs) -> bool:
    """Whether an engine with decode ``graphs`` (None: none) launches steps ahead; ``asked`` is the
    engine's ``lookahead`` argument (None: the env's choice)."""
    if graphs is None:
        return False
    if asked is not None:
        return asked
    choice = lookahead_choice()
    return choice == "1" or (choice == "auto" and graphs.capture)


def greedy_only(r) -> bool:
    """Whether ``r``'s next token is its logits' argmax, with nothing else read from them."""
    p = r.params
    return (not p.temperature >= MIN_TEMPERATURE and not p.penalized and p.logprobs is None
            and not r.scores_prompt)


@dataclass
class Ahead:
    """A decode step in flight: its requests, their entries (one each), its logits (on the device)
    and the step's mapping."""

    reqs: list
    groups: list[list[tuple[int, int, list[int], int]]]
    logits: torch.Tensor
    batch: object

    def live(self) -> bool:
        """Whether some sequence of the step is still running (else its result is of no use)."""
        return any(r.finish_reason is None for r in self.reqs)


def next_entries(due: list, max_len: int) -> tuple[list[int], list[tuple[int, int, list[int], int]]]:
    """For requests due a token this step: the indices (into ``due``) of those that go on after it,
    and their entries of the next step, token 0 standing for the one the device fills in. A request
    that ended already or whose coming token ends it (``max_tokens``, ``max_len``) has none."""
    keep, entries = [], []
    for i, r in enumerate(due):
        if r.finish_reason is not None or r.kv_slot is None:
            continue
        pos = len(r.prompt) + len(r.output)  # where this step's token goes in the cache
        if len(r.output) + 1 >= r.params.max_tokens or pos + 1 >= max_len:
            continue
        keep.append(i)
        entries.append((r.kv_slot, pos, [0], r.delta_slot))
    return keep, entries
