"""DevicePool: the stacked per-tenant buffers of every multi-tenant module, and installing a delta into them.

Contract: each compressed matrix of the base has one stacked pool with ``num_slots`` delta slots,
``signs [slots, bits, out, ceil(in/8)]`` uint8 plus two scale tables, ``row [slots, bits, out]`` and
``col [slots, bits, in]``. Scale modes are normalised on load: a scalar scale is broadcast into the
row table (exact), row stays row, col goes to the col table, and a 1-bit delta in a 2-bit pool gets
zero-scale padding planes (exact). Per-tenant 1-D parameters (norm weights, biases) live in tables
``[slots + 1, dim]`` (row 0 = the base) gathered per token; added-vocabulary rows are padded to
``max_extra_vocab`` per slot.

Low-rank corrections (``bitdelta.lowrank``), when the pool is built with ``max_lowrank_rank > 0``:
each matrix but the embeddings gets ``lowrank_a [slots, r_max, in]`` and ``lowrank_b [slots, out,
r_max]`` in the model's dtype; a tenant's rank-r factors fill the first r rows of A and columns of B
and the rest stays zero (exact: the padded directions add ``0``), and a tenant without a correction
on a module has zeros there. :mod:`bitdelta.serving.dispatch` adds ``(x Aᵀ) Bᵀ`` per token.

Every device tensor is allocated once, here; :meth:`DevicePool.install` copies into its delta slot
in place and :meth:`DevicePool.clear` forgets it, so captured CUDA graphs
(:mod:`bitdelta.serving.graphs`) always read the live buffers. On CUDA an install copies on a side
stream and returns an :class:`~bitdelta.serving.install_ticket.InstallTicket`: the slot is readable
once the ticket is ready. ``col_slots`` (host) says which delta
slots are column-scaled on some module: their tokens take separate op calls
(:mod:`bitdelta.serving.dispatch`).

    pool = DevicePool(model, num_slots=8, bits=2, max_extra_vocab=4, max_lowrank_rank=16)
    ticket = pool.install(delta_slot, host_delta)     # engine thread, between steps
    ticket.ready()                                    # the slot may be read (always, on the CPU)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..scale_modes import scale_shape
from .install_ticket import InstallTicket


@dataclass
class HostDelta:
    """A delta prepared for the pools: per module (signs, scales, is_col), 1-D params, extra rows, and
    low-rank factors per module ``(B [out, r], A [r, in])`` in the model's dtype."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, bool]]
    params1d: dict[str, torch.Tensor]
    extra_embed: torch.Tensor | None
    extra_head: torch.Tensor | None
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def nbytes(self) -> int:
        n = sum(s.numel() + c.numel() * 4 for s, c, _ in self.modules.values())
        n += sum(t.numel() * t.element_size() for pair in self.lowrank.values() for t in pair)
        return n + sum(p.numel() * p.element_size() for p in self.params1d.values())


class DevicePool:
    """Stacked delta buffers for one model: ``pools[module]`` (signs, row, col, col_slots, k, and
    lowrank_a/lowrank_b with ``max_lowrank_rank``), 1-D tables, added-token rows."""

    def __init__(self, model, num_slots: int, bits: int = 1, max_extra_vocab: int = 0, max_lowrank_rank: int = 0):
        self.model, self.num_slots, self.bits, self.max_extra = model, num_slots, bits, max_extra_vocab
        self.max_lowrank_rank = max_lowrank_rank
        dev, s = model.device, num_slots
        self.pools: dict[str, dict] = {}
        for name, (n, k) in model.delta_modules().items():
            self.pools[name] = {
                "signs": torch.zeros((s, bits, n, (k + 7) // 8), dtype=torch.uint8, device=dev),
                # one table per scale layout (scalar scales are broadcast into the row table)
                "row": torch.zeros((s, *scale_shape("row", n, k, bits)), dtype=torch.float32, device=dev),
                "col": torch.zeros((s, *scale_shape("col", n, k, bits)), dtype=torch.float32, device=dev),
                "col_slots": set(),  # delta slots column-scaled on this module (host)
                "k": k,
            }
            if max_lowrank_rank and name != getattr(model, "embed_name", None):  # embeddings take none
                self.pools[name]["lowrank_a"] = torch.zeros((s, max_lowrank_rank, k), dtype=model.dtype, device=dev)
                self.pools[name]["lowrank_b"] = torch.zeros((s, n, max_lowrank_rank), dtype=model.dtype, device=dev)
                self.pools[name]["lowrank_slots"] = set()  # delta slots with a correction here (host)
        self.tables = {n: p.unsqueeze(0).repeat(s + 1, 1).contiguous() for n, p in model.params1d.items()}
        h = model.hidden
        self.extra_embed = torch.zeros((s, max_extra_vocab, h), dtype=model.dtype, device=dev)
        self.extra_head = torch.zeros((s, max_extra_vocab, h), dtype=model.dtype, device=dev)
        self.n_extra = torch.zeros(s, dtype=torch.long, device=dev)
        self.col_slots: set[int] = set()  # delta slots whose tenant is column-scaled on some module (host)
        # installs copy on a stream of their own, so decode steps never queue behind a delta's copy
        self.copy_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    @torch.no_grad()
    def install(self, delta_slot: int, host: HostDelta) -> InstallTicket:
        """Copies ``host`` into ``delta_slot`` of every buffer, in place; the ticket says when the slot
        may be read. On CUDA the copies run on :attr:`copy_stream` (non-blocking from pinned memory),
        after the work already queued on the current stream (a step may still read the slot's previous
        tenant); nothing on the current stream waits for them. All installs share that one stream, so
        a slot freed and installed again while a copy is in flight is written in order. On the CPU the
        copy is done on return."""
        if self.copy_stream is None:
            self._copy(delta_slot, host)
            return InstallTicket()
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(self.copy_stream):  # pinned sources record this stream: not reused mid-copy
            self._copy(delta_slot, host)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return InstallTicket(done)

    def _copy(self, delta_slot: int, host: HostDelta) -> None:
        for name, pool in self.pools.items():
            if "lowrank_a" in pool:
                self._install_lowrank(pool, delta_slot, host.lowrank.get(name))
            got = host.modules.get(name)
            if got is None:  # this tenant leaves the module unchanged: zero scales
                pool["row"][delta_slot].zero_()
                pool["col"][delta_slot].zero_()
                pool["col_slots"].discard(delta_slot)
                continue
            signs, scales, is_col = got
            pool["signs"][delta_slot].copy_(signs, non_blocking=True)
            (pool["col"] if is_col else pool["row"])[delta_slot].copy_(scales, non_blocking=True)
            (pool["row"] if is_col else pool["col"])[delta_slot].zero_()
            (pool["col_slots"].add if is_col else pool["col_slots"].discard)(delta_slot)
            if is_col:
                self.col_slots.add(delta_slot)
        for pname, table in self.tables.items():
            table[delta_slot + 1].copy_(host.params1d.get(pname, self.model.params1d[pname]), non_blocking=True)
        n = 0 if host.extra_embed is None else host.extra_embed.shape[0]
        if n:
            self.extra_embed[delta_slot, :n].copy_(host.extra_embed, non_blocking=True)
            self.extra_head[delta_slot, :n].copy_(host.extra_head, non_blocking=True)
        # fill_ takes n as a kernel argument; `n_extra[slot] = n` would copy it from pageable host memory,
        # and such a copy may wait for the copy stream's earlier work: the host would block until the
        # whole delta had landed
        self.n_extra[delta_slot].fill_(n)

    @staticmethod
    def _install_lowrank(pool: dict, delta_slot: int, factors) -> None:
        """A tenant's factors into the slot's first r directions, zeros in the rest (and everywhere
        for a tenant without a correction on this module)."""
        a_slot, b_slot = pool["lowrank_a"][delta_slot], pool["lowrank_b"][delta_slot]
        pool["lowrank_slots"].discard(delta_slot)
        if factors is None:
            a_slot.zero_()
            b_slot.zero_()
            return
        pool["lowrank_slots"].add(delta_slot)
        b, a = factors
        r = a.shape[0]
        a_slot[:r].copy_(a, non_blocking=True)
        a_slot[r:].zero_()
        b_slot[:, :r].copy_(b, non_blocking=True)
        b_slot[:, r:].zero_()

    def clear(self, delta_slot: int) -> None:
        """Forgets the host-side facts of ``delta_slot`` (its buffers are overwritten by the next install)."""
        self.col_slots.discard(delta_slot)
        for pool in self.pools.values():
            pool["col_slots"].discard(delta_slot)
            if "lowrank_slots" in pool:
                pool["lowrank_slots"].discard(delta_slot)

    def nbytes_per_slot(self) -> int:
        return sum(v[0].numel() * v.element_size() for p in self.pools.values() for v in p.values()
                   if isinstance(v, torch.Tensor))
