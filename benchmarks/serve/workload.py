"""The requests a serving run sends: prompts, tenant names, tenant counts that fit, Poisson arrivals.

    prompts = make_prompts(n, 128, vocab, seed=3)
    ns, skipped = tenant_counts("1,8,max", nmax=40)
    offsets = poisson_arrivals(rate=4.0, n=64)        # seconds after the start
"""

from __future__ import annotations

import torch

from bitdelta.serving.model import KVCache


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def tenant_names(n: int) -> list[str]:
    return [f"tenant-{i:03d}" for i in range(n)]


def kv_bytes_per_seq(model, max_len: int) -> int:
    return KVCache.bytes_per_sequence(model.num_layers, max_len, model.kv_heads, model.head_dim, model.dtype)


def tenant_counts(spec: str, nmax: int) -> tuple[list[int], list[str]]:
    """The sorted distinct N of ``spec`` ("1,8,max": max = the largest that fits; "": none, for a run
    of the other phases only) that fit, and a skip note for each that does not."""
    ns, skipped = [], []
    for tok in filter(None, (t.strip() for t in spec.split(","))):
        if tok != "max" and not (tok.isdigit() and int(tok) > 0):
            raise ValueError(f"tenant count {tok!r} is neither a positive integer nor 'max'")
        n = nmax if tok == "max" else int(tok)
        if n < 1:
            skipped.append("N=max: not even one tenant fits")
            continue
        if n > nmax:
            skipped.append(f"N={n}: does not fit (largest N {nmax})")
            continue
        if n not in ns:
            ns.append(n)
    return sorted(ns), skipped


def poisson_arrivals(rate: float, n: int, seed: int = 5) -> list[float]:
    """Offsets in seconds of ``n`` requests arriving at ``rate`` per second (seeded)."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(rate, generator=g).tolist()
    return [sum(gaps[:i]) for i in range(n)]
