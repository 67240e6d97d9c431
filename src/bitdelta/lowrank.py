"""A low-rank correction of the sign-plane residual: ``Δ − Δ̂ ≈ B·A``, ranks chosen by energy per byte.

Sign planes spend the same bits on every entry; where a fine-tune's delta has a few strong directions
(as LoRA-style updates do), most of what they miss lies in a few singular vectors of the residual
``R = Δ − Δ̂``. A rank-``r`` term ``B [out, r] · A [r, in]`` (stored in float16) keeps
the ``r`` strongest: by Eckart–Young it removes ``σ_1² + … + σ_r²`` of ``‖R‖²``.

The sign planes are fitted around the strong directions rather than through them: for each matrix,
``Δ̂ = binarize(Δ − L₀)`` where ``L₀`` is Δ's own rank-``r₀`` part (``r₀``: the rank the matrix's even
share of the budget buys, or the fixed rank), and ``B·A`` is then the truncated SVD of the residual
``Δ − Δ̂`` (which holds ``L₀`` and what the signs miss). Binarizing Δ first and correcting after
spends the correction badly: sign planes turn a low-rank delta into a high-rank error (its sign
pattern is not low-rank), so the residual's leading directions hold little of the missing energy
(the weight errors of both orders are in docs/distillation.md, "Beyond one bit").

Two ways to choose ``r``:

- a byte budget (``lowrank_budget = X``): ``X`` times the bytes of one sign plane of every compressed
  matrix (``X = 1`` costs as much as one more plane: equal bytes with ``bits + 1``), spent greedily on
  the singular direction with the most residual energy per byte over all modules (one direction of
  an ``out × in`` matrix costs ``2 (out + in)`` bytes). Singular values fall within a module, so the
  greedy order is the best split of the budget up to the last direction that does not fit; the
  spent bytes never exceed it.
- a fixed rank (``lowrank_rank = r``) for every module (at most ``min(out, in)``).

Embeddings take none: their delta is a row lookup, added row by row in ``apply`` and in the serving
engine, not a product (their sign bytes still count in the budget).

Factors are computed on the CPU in float32: an exact SVD for matrices up to :data:`EXACT_SVD_MAX`
on their short side, ``torch.svd_lowrank`` (randomised) for larger ones. ``B = U √σ`` and
``A = √σ Vᵀ`` split the magnitude evenly between the two, so neither leaves float16's range.

With scale distillation the term is computed once, from the initial scales, and stays fixed while
the scales train with ``B·A`` in the student's forward: the scales learn around the correction
rather than the correction being fitted to scales it never saw. (Refitting it after distillation
would need ``Δ`` again, a second pass over both models.)

    planner = LowRankPlanner(budget=1.0)                  # or LowRankPlanner(rank=8)
    sign, scale = planner.binarize(delta, "row", bits=1)  # signs fitted around Δ's strong directions
    planner.add("model.layers.0.mlp.up_proj", delta - reconstruct(sign, scale, delta.shape[1], "row"))
    planner.count_signs(out, in)                          # an embedding: in the budget, no correction
    factors = planner.factors()                           # name -> (B [out, r], A [r, in]) float16
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .pack import packed_width

STORAGE_DTYPE = torch.float16
VALUE_BYTES = 2  # float16
EXACT_SVD_MAX = 1024  # short side up to which the exact SVD is cheap enough on a CPU
CANDIDATE_SHARE = 4  # under a budget, a module is offered directions worth up to 4x its even share
_OVERSAMPLE = 8
_POWER_ITERATIONS = 4


def sign_plane_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one packed sign plane of an ``out × in`` matrix."""
    return out_features * packed_width(in_features)


def direction_bytes(out_features: int, in_features: int) -> int:
    """Bytes one rank of ``B·A`` costs (a column of B and a row of A in float16)."""
    return (out_features + in_features) * VALUE_BYTES


def factor_bytes(out_features: int, in_features: int, rank: int) -> int:
    return rank * direction_bytes(out_features, in_features)


def truncated_svd(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` strongest singular triplets of a float matrix, in float32 on the CPU:
    ``U [out, r]``, ``S [r]`` (descending), ``Vh [r, in]``."""
    r = residual.detach().float().cpu()
    short = min(r.shape)
    rank = max(0, min(rank, short))
    if short <= EXACT_SVD_MAX or rank * 2 >= short:
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(short, rank + _OVERSAMPLE)
    u, s, v = torch.svd_lowrank(r, q=q, niter=_POWER_ITERATIONS)
    return u[:, :rank], s[:rank], v[:, :rank].t()


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U √σ`` [out, rank] and ``A = √σ Vᵀ`` [rank, in], stored in float16."""
    root = s[:rank].clamp(min=0).sqrt()
    b = (u[:, :rank] * root[None, :]).to(STORAGE_DTYPE).contiguous()
    a = (vh[:rank] * root[:, None]).to(STORAGE_DTYPE).contiguous()
    return b, a


def allocate_ranks(spectra: dict[str, tuple[torch.Tensor, int]], budget_bytes: int) -> dict[str, int]:
    """Ranks per module from ``name -> (singular values, bytes per rank)`` under ``budget_bytes``.

    Greedy by energy gain per byte (``σ² / bytes``): the next direction taken is always the one with the
    most residual energy per byte that still fits. A module whose next direction does not fit takes no
    more (its later ones cost the same and gain less)."""
    ranks = {name: 0 for name in spectra}
    heap = []
    for name, (s, cost) in spectra.items():
        if len(s) and cost > 0:
            heap.append((-float(s[0]) ** 2 / cost, name))
    heapq.heapify(heap)
    left = int(budget_bytes)
    while heap:
        _, name = heapq.heappop(heap)
        s, cost = spectra[name]
        if cost > left:
            continue
        left -= cost
        ranks[name] += 1
        if ranks[name] < len(s):
            heapq.heappush(heap, (-float(s[ranks[name]]) ** 2 / cost, name))
    return ranks


@dataclass
class _Candidate:
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    out_features: int
    in_features: int


class LowRankPlanner:
    """Collects each module's residual directions during compression, then chooses the ranks.

    ``budget``: extra bytes as a multiple of one sign plane of every module added; ``rank``: the same
    rank for every module. Exactly one of the two. Only the candidate directions of each module are
    kept (never the residual itself), so memory stays a few times the budget."""

    def __init__(self, budget: float | None = None, rank: int | None = None):
        if (budget is None) == (rank is None):
            raise ValueError("give exactly one of budget and rank")
        self.budget, self.rank = budget, rank
        self.candidates: dict[str, _Candidate] = {}
        self.sign_bytes = 0

    def share_rank(self, out_features: int, in_features: int) -> int:
        """The rank one module gets before the split: the fixed rank, or what its even share of the
        budget buys (0 when that is less than one direction)."""
        short = min(out_features, in_features)
        if self.rank is not None:
            return min(self.rank, short)
        share = self.budget * sign_plane_bytes(out_features, in_features)
        return min(short, int(share // direction_bytes(out_features, in_features)))

    def binarize(self, delta: torch.Tensor, mode, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sign planes and scales of ``delta`` fitted around its rank-``share_rank`` part (see the
        module docstring), in :func:`bitdelta.binarize.binarize`'s layout."""
        from .binarize import binarize

        delta = delta.float()
        r0 = self.share_rank(*delta.shape)
        if r0 == 0:
            return binarize(delta, mode, bits)
        u, s, vh = truncated_svd(delta, r0)
        return binarize(delta - (u * s[None, :]) @ vh, mode, bits)

    def candidate_rank(self, out_features: int, in_features: int) -> int:
        """Directions worth keeping for one module before the global split is known."""
        short = min(out_features, in_features)
        if self.rank is not None:
            return min(self.rank, short)
        share = self.budget * sign_plane_bytes(out_features, in_features)
        return min(short, max(1, math.ceil(CANDIDATE_SHARE * share / direction_bytes(out_features, in_features))))

    def count_signs(self, out_features: int, in_features: int) -> None:
        """Counts a compressed matrix that takes no correction (an embedding) into the budget's base:
        ``bits + 1`` would give it a plane too, so equal bytes count it."""
        self.sign_bytes += sign_plane_bytes(out_features, in_features)

    def add(self, name: str, residual: torch.Tensor) -> None:
        """Records ``residual = Δ − Δ̂`` of module ``name`` (out × in)."""
        out_features, in_features = (int(d) for d in residual.shape)
        self.count_signs(out_features, in_features)
        u, s, vh = truncated_svd(residual, self.candidate_rank(out_features, in_features))
        self.candidates[name] = _Candidate(u, s, vh, out_features, in_features)

    def budget_bytes(self) -> int | None:
        """The byte budget of the modules added so far (None for a fixed rank)."""
        return None if self.budget is None else int(math.floor(self.budget * self.sign_bytes))

    def ranks(self) -> dict[str, int]:
        if self.rank is not None:
            return {n: int(len(c.s)) for n, c in self.candidates.items()}
        spectra = {n: (c.s, direction_bytes(c.out_features, c.in_features)) for n, c in self.candidates.items()}
        return allocate_ranks(spectra, self.budget_bytes())

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``name -> (B, A)`` of every module given a rank of at least one."""
        out = {}
        for name, r in self.ranks().items():
            if r > 0:
                c = self.candidates[name]
                out[name] = split_factors(c.u, c.s, c.vh, r)
        return out


def lowrank_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Float32 ``B·A`` (out × in)."""
    return b.float() @ a.float()


def lowrank_bound(b: torch.Tensor, a: torch.Tensor) -> float:
    """An upper bound on ``max |B·A|`` without forming the product: ``max_i Σ_r |B_ir| max_j |A_rj|``."""
    if b.numel() == 0:
        return 0.0
    return float((b.detach().float().abs() @ a.detach().float().abs().amax(dim=1)).max())
