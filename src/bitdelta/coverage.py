"""Nothing lost: the structure check before compression and the coverage audit after it.

``check_structure`` compares the tensors of base and fine-tune (names and shapes, from checkpoint
headers and the model's own shapes) before any work: a fine-tune with other layers or shapes is an
error naming the tensors; only vocabulary matrices may gain rows (added tokens).

``audit`` accounts for every stored tensor of the fine-tune: it feeds a compressed model tensor,
or one kept dense, or it equals the base's (unchanged), or the user's ``--exclude`` names it and the
model does not load it (excluded, the only tensors a delta drops). Anything else stops compression
with an error naming the tensors, for any architecture, including ones bitdelta has never seen.
The counts (tensors and parameters per category) go into ``delta_config.json`` and ``inspect``.

    check_structure(base_src, ft_src, vocab_params={"model.embed_tokens.weight"}, ties={})
    cov = audit(base_src, ft_src, compressed={...}, dense={...}, ties={}, exclude=None)
"""

from __future__ import annotations

import math

import torch

from .errors import BitDeltaError, ShapeMismatchError
from .targets import matches

CATEGORIES = ("compressed", "dense", "excluded", "unchanged")
_SHOW = 8  # tensors named in an error message before "... and N more"


class CoverageError(BitDeltaError):
    """A tensor the fine-tune changed would be neither compressed, kept dense, nor excluded."""


def _names(items) -> str:
    items = list(items)
    shown = ", ".join(items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def check_structure(base_src, ft_src, vocab_params: set[str], ties: dict[str, str]) -> None:
    """Raises :class:`ShapeMismatchError` unless base and fine-tune hold the same tensors with the
    same shapes (vocabulary matrices may differ in rows; tied aliases may be stored or not).

    Compared as the model holds them (in-model names, after transformers' conversion), so a base
    stored one expert per tensor and a fine-tune stored with fused experts still match; stored
    tensors the model does not load are compared by their stored names."""
    def stored(src) -> dict[str, tuple]:
        out = {}
        for name in src.naming.names():
            if name not in ties:  # a tied alias (lm_head saved next to the embedding): same tensor
                out[name] = tuple(src.shape(name))
        for key in src.naming.unplaced():
            out[key] = tuple(src.checkpoint_shape(key))
        return out

    base, ft = stored(base_src), stored(ft_src)
    only_ft = sorted(set(ft) - set(base))
    only_base = sorted(set(base) - set(ft))
    shapes = []
    for key in sorted(set(base) & set(ft)):
        b, f = base[key], ft[key]
        if b == f:
            continue
        if key in vocab_params and len(b) == len(f) == 2 and b[1] == f[1]:
            continue  # rows added (or removed) in a vocabulary matrix: checked where it is compressed
        shapes.append(f"{key} (base {list(b)}, fine-tune {list(f)})")
    if not (only_ft or only_base or shapes):
        return
    parts = []
    if only_ft:
        parts.append(f"{len(only_ft)} tensors only in the fine-tune: {_names(only_ft)}")
    if only_base:
        parts.append(f"{len(only_base)} tensors only in the base: {_names(only_base)}")
    if shapes:
        parts.append(f"{len(shapes)} tensors of another shape: {_names(shapes)}")
    raise ShapeMismatchError(
        f"fine-tune {ft_src.name!r} does not have the structure of base {base_src.name!r}: " + "; ".join(parts)
        + ". The fine-tune must come from this base (same layers and shapes; only vocabulary rows may be "
        "added): check --base and --finetuned."
    )


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def audit(base_src, ft_src, compressed: set[str], dense: set[str], ties: dict[str, str],
          exclude: list[str] | None) -> dict:
    """Accounts for every stored tensor of the fine-tune; raises :class:`CoverageError` on any
    changed tensor that the delta would lose. Returns counts per category and the excluded keys."""
    tensors = dict.fromkeys(CATEGORIES, 0)
    params = dict.fromkeys(CATEGORIES, 0)
    excluded, lost = [], []
    base_keys = set(base_src.checkpoint_keys())
    for key in ft_src.checkpoint_keys():
        targets = [ties.get(t, t) for t in ft_src.naming.targets(key)]
        if any(t in compressed for t in targets):
            category = "compressed"
        elif any(t in dense for t in targets):
            category = "dense"
        elif _unchanged(base_src, ft_src, key, targets, base_keys):
            category = "unchanged"
        elif any(matches(n, exclude) for n in [key, *targets]):
            category = "excluded"
            excluded.append(key)
        else:
            lost.append(key)
            continue
        tensors[category] += 1
        params[category] += _numel(ft_src.checkpoint_shape(key))
    if lost:
        raise CoverageError(
            f"{len(lost)} tensors of fine-tune {ft_src.name!r} differ from the base but would be neither "
            f"compressed nor stored dense: {_names(lost)}. Nothing was written. bitdelta does not know how "
            "this architecture uses them; report it, or pass --exclude with a pattern naming them to drop "
            "their changes knowingly."
        )
    return {"tensors": tensors, "parameters": params, "excluded_tensors": sorted(excluded)}


def _unchanged(base_src, ft_src, key: str, targets: list[str], base_keys: set[str]) -> bool:
    """True if stored tensor ``key`` equals the base's: compared as stored when the base stores it
    under the same name, else as the model tensors it feeds (the base may store another layout)."""
    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)

    if key in base_keys:
        return same(base_src.checkpoint_get(key), ft_src.checkpoint_get(key))
    if not targets or not all(base_src.has(t) for t in targets):
        return False
    return all(same(base_src.get(t), ft_src.get(t)) for t in targets)
