"""Per-step dispatch: what a model module calls to apply each token's delta (vLLM's punica wrapper, for 1-bit deltas).

:class:`Dispatch` reads a :class:`~bitdelta.serving.layers.DevicePool` and offers the model
``linear`` (base + per-token delta of one matrix), ``gather1d`` (per-token 1-D parameters),
``embed`` (per-token embedding deltas and added-token rows) and ``extra_logits`` (added-token
logits). Its ``linear`` plans the step's op calls once per step and set of column-scaled tenants
(:mod:`bitdelta.serving.op_calls`, from host values: no device sync): every decode step whose
tenants are all row/scalar (the usual case, and every graph-captured step) makes one
:func:`bitdelta.ops.bitdelta_linear` call per module; prompts take the segmented op, column-scaled
tenants their own calls. A pool with low-rank capacity adds each token's ``(x Aᵀ) Bᵀ`` after the
sign-plane op (:func:`lowrank_gathered`, :func:`lowrank_by_sequence`). :class:`UnfusedDispatch` is
the reference-style baseline (:mod:`bitdelta.serving.unfused`: one base GEMM, then one binary matmul
per tenant), and
:class:`FunctionDispatch` runs any ``linear_fn(name, x, w, pool, batch)``.

    dispatch = Dispatch(pool, backend="auto")
    y = dispatch.linear("model.layers.0.mlp.down_proj", x, w, batch)
    qkv = dispatch.linear_group(["...q_proj", "...k_proj", "...v_proj"], x, w_qkv, batch)  # stacked rows
"""

from __future__ import annotations

import torch

from ..ops import DECODE_MAX_TOKENS, bitdelta_linear, bitdelta_linear_group, bitdelta_linear_segmented
from ..pack import unpack_signs
from .op_calls import has_long_sequences, plan_calls


class Dispatch:
    """The fused multi-tenant ops over one device pool."""

    graph_safe = True  # groups no tokens on the host: decode steps may be captured in CUDA graphs

    def __init__(self, pool, backend: str = "auto"):
        self.pool, self.backend = pool, backend

    def linear(self, name: str, x: torch.Tensor, w: torch.Tensor, batch) -> torch.Tensor:
        """``x Wᵀ`` plus each token's delta: sign planes, then the low-rank term where the pool has one."""
        y = self.sign_linear(name, x, w, batch)
        pool = self.pool.pools[name]
        if "lowrank_a" not in pool:
            return y
        if has_long_sequences(batch):  # prompt steps are never captured: host row ranges, active tenants only
            return lowrank_by_sequence(x, y, pool, batch)
        return y + lowrank_gathered(x, pool["lowrank_a"], pool["lowrank_b"], batch.delta_slots).to(y.dtype)

    def linear_group(self, names: list[str], x: torch.Tensor, w: torch.Tensor, batch) -> torch.Tensor:
        """:meth:`linear` of matrices that read the same input, ``w`` their base rows stacked in the
        order of ``names``: ``[T, N_1 + N_2 + ...]``. A decode step with no column-scaled tenant (every
        graph-captured step) makes one :func:`bitdelta_linear_group` call, then adds each member's
        low-rank term (if its pool has them) to its columns; any other step makes the per-matrix
        calls, side by side."""
        pools = [self.pool.pools[name] for name in names]
        if not self.grouped(pools, batch):
            parts = w.split([p["signs"].shape[2] for p in pools])
            return torch.cat([self.linear(name, x, part, batch) for name, part in zip(names, parts)], dim=-1)
        y = self._decode_group(x, w, pools, batch.delta_slots)
        at = 0
        for pool in pools:
            n = pool["signs"].shape[2]
            if "lowrank_a" in pool:
                low = lowrank_gathered(x, pool["lowrank_a"], pool["lowrank_b"], batch.delta_slots)
                y[:, at:at + n] += low.to(y.dtype)
            at += n
        return y

    def grouped(self, pools: list[dict], batch) -> bool:
        """Whether a step's group goes through the one grouped op (see :meth:`linear_group`)."""
        if has_long_sequences(batch):
            return False
        return all(not pool["col_slots"] or pool["col_slots"].isdisjoint(batch.seq_delta_slots) for pool in pools)

    def _decode_group(self, x, w, pools: list[dict], ids) -> torch.Tensor:
        """The grouped decode op, in calls of at most ``DECODE_MAX_TOKENS`` rows (as :meth:`_decode_op`)."""
        members = [(p["signs"], p["row"]) for p in pools]
        if x.shape[0] <= DECODE_MAX_TOKENS:
            return bitdelta_linear_group(x, w, members, "row", ids, self.backend)
        return torch.cat([bitdelta_linear_group(x[a:a + DECODE_MAX_TOKENS], w, members, "row",
                                                ids[a:a + DECODE_MAX_TOKENS], self.backend)
                          for a in range(0, x.shape[0], DECODE_MAX_TOKENS)])

    def sign_linear(self, name: str, x: torch.Tensor, w: torch.Tensor, batch) -> torch.Tensor:
        """``x Wᵀ`` plus each token's sign-plane delta (the fused ops)."""
        pool = self.pool.pools[name]
        cols = pool["col_slots"]
        col = frozenset(cols.intersection(batch.seq_delta_slots)) if cols else frozenset()
        if not col and not has_long_sequences(batch):  # every decode step (graph-captured ones too)
            return self._decode_op(x, w, pool, "row", batch.delta_slots)
        # Prompts and col-scaled tenants: one call per kind of row (serving/op_calls.py), from host values.
        y = None
        for call in plan_calls(batch, col):
            xs, ids = (x, batch.delta_slots) if call.rows is None else (x[call.rows], batch.delta_slots[call.rows])
            if call.segments is not None:
                out = bitdelta_linear_segmented(xs, w, None, pool["signs"], pool[call.mode], call.mode,
                                                *call.segments, self.backend, table=call.table)
            else:
                out = self._decode_op(xs, w, pool, call.mode, ids)
            if call.rows is None:
                return out
            if y is None:
                y = x.new_empty((x.shape[0], w.shape[0]))
            y[call.rows] = out
        return y

    def _decode_op(self, x, w, pool, mode: str, ids) -> torch.Tensor:
        """The decode op, in calls of at most ``DECODE_MAX_TOKENS`` rows: each stays on the decode
        kernel (no sort by tenant, no host read of a segment table, which cost over a second per step
        at 133 tenants of a 7B model); a tenant with rows in two calls has its bits read twice."""
        if x.shape[0] <= DECODE_MAX_TOKENS:
            return bitdelta_linear(x, w, None, pool["signs"], pool[mode], mode, ids, self.backend)
        return torch.cat([bitdelta_linear(x[a:a + DECODE_MAX_TOKENS], w, None, pool["signs"], pool[mode], mode,
                                          ids[a:a + DECODE_MAX_TOKENS], self.backend)
                          for a in range(0, x.shape[0], DECODE_MAX_TOKENS)])

    def gather1d(self, name: str, batch) -> torch.Tensor:
        return self.pool.tables[name][batch.gather]

    def param_table(self, name: str) -> torch.Tensor:
        """The ``[delta slots + 1, dim]`` table of a 1-D parameter (row 0 the base's), which
        ``gather1d`` reads at ``batch.gather``: for kernels that gather the rows themselves."""
        return self.pool.tables[name]

    def embed(self, x: torch.Tensor, batch) -> torch.Tensor:
        """Adds each token's tenant embedding delta (and added-token rows) to the base rows ``x``."""
        if not batch.any_delta:
            return x
        p, model = self.pool, self.pool.model
        pool, v = p.pools[model.embed_name], model.vocab_size
        ids, tok = batch.delta_slots.long(), batch.tokens
        has = ids >= 0
        slot = ids.clamp(min=0)
        row = tok.clamp(max=v - 1)
        signs = unpack_signs(pool["signs"][slot, :, row], pool["k"])  # [T, bits, H]
        scales = pool["row"][slot, :, row]  # [T, bits]
        d = (signs * scales[..., None]).sum(1) * has[:, None]
        x = x + d.to(x.dtype)
        if p.max_extra:
            is_extra = (tok >= v) & has
            extra = p.extra_embed[slot, (tok - v).clamp(min=0, max=p.max_extra - 1)]
            x = torch.where(is_extra[:, None], extra, x)
        return x

    def extra_logits(self, h: torch.Tensor, logits: torch.Tensor, batch) -> torch.Tensor:
        """Appends added-token logits (``-inf`` where a tenant has fewer, or none)."""
        p = self.pool
        if not p.max_extra:
            return logits
        ids = batch.delta_slots.long()
        slot = ids.clamp(min=0)
        extra = torch.einsum("th,teh->te", h.float(), p.extra_head[slot].float())
        valid = (torch.arange(p.max_extra, device=h.device)[None, :] < p.n_extra[slot][:, None]) & (ids >= 0)[:, None]
        return torch.cat([logits, extra.masked_fill(~valid, float("-inf"))], dim=-1)


class FunctionDispatch(Dispatch):
    """``linear`` through ``fn(name, x, w, pool, batch)`` (a module's pool dict); the rest as :class:`Dispatch`."""

    graph_safe = False  # such functions may group tokens on the host

    def __init__(self, pool, fn, backend: str = "auto"):
        super().__init__(pool, backend)
        self.fn = fn

    def sign_linear(self, name, x, w, batch):
        return self.fn(name, x, w, self.pool.pools[name], batch)

    def grouped(self, pools, batch) -> bool:
        return False  # the function sees one module at a time


class UnfusedDispatch(FunctionDispatch):
    """The reference-style baseline: one base GEMM, then per tenant a binary matmul, a scale and an add."""

    def __init__(self, pool, backend: str = "auto"):
        from .unfused import unfused_linear

        super().__init__(pool, unfused_linear, backend)


def lowrank_gathered(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, delta_slots: torch.Tensor) -> torch.Tensor:
    """Each token's ``(x Aᵀ) Bᵀ`` from its own slot's factors: ``a [slots, r, in]``, ``b [slots, out, r]``
    gathered per token (``delta_slots`` -1: no delta, a zero term), then two batched products.

    Per-token gathering rather than grouping tokens by tenant: the shapes depend only on the number of
    tokens and the pool's rank, with no host read of who is in the step, so a decode step stays
    capturable in a CUDA graph. The price: every token copies its tenant's factors at the pool's rank
    (``[T, out, r]`` and ``[T, r, in]``; at a budget of 1.0 about a sign plane's bytes per token), so a
    tenant with several tokens in the step has them read several times, where the sign-plane kernels
    read each tenant's bits once. A kernel that reads each slot's factors once is the next step if
    the serving benchmark shows this term's cost."""
    slots = delta_slots.long()
    has = (slots >= 0).to(x.dtype)
    slot = slots.clamp(min=0)
    h = torch.bmm(a[slot], x.unsqueeze(-1)) * has[:, None, None]  # [T, r, 1]
    return torch.bmm(b[slot], h).squeeze(-1)  # [T, out]


def lowrank_by_sequence(x: torch.Tensor, y: torch.Tensor, pool: dict, batch) -> torch.Tensor:
    """``y`` plus the low-rank term of each sequence whose tenant has one on this module, one pair of
    products per such sequence over its consecutive rows (prompt steps: gathering factors per token
    would copy them once per prompt token)."""
    active = pool["lowrank_slots"]
    at = 0
    for (_, _, n), slot in zip(batch.seqs, batch.seq_delta_slots):
        if slot >= 0 and slot in active:
            xs = x[at:at + n]
            y[at:at + n] += (xs @ pool["lowrank_a"][slot].t() @ pool["lowrank_b"][slot].t()).to(y.dtype)
        at += n
    return y
