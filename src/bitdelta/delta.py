"""The in-memory delta: packed 1-bit modules, dense extras, base fingerprint, and metadata.

A :class:`Delta` is what :func:`bitdelta.compress` returns and what ``apply``/``merge`` consume.
It knows nothing about any particular model class; it is keyed by the base model's own module
and parameter names. Saving and loading live in ``artifact.py``; the metadata written beside the
tensors is a :class:`~bitdelta.artifact_info.DeltaInfo`.

Copies: ``delta.copy()`` and ``packed.copy(scale=...)`` (both ``dataclasses.replace``) share tensors
unless a field is given anew; nothing here copies fields by hand, so a field added to the dataclass is
carried by every copy.

    delta = bitdelta.compress(base, finetuned)
    delta.modules["model.layers.0.self_attn.q_proj"].dense()   # float32 Δ̂, out × in
    delta.nbytes()                                             # bytes of tensors it stores
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .artifact_info import DeltaInfo
from .binarize import check_mode, reconstruct
from .fingerprint import Fingerprint
from .pack import packed_width
from .scale_modes import ScaleMode, scale_shape
from .targets import CONV1D, EMBEDDING, LINEAR


@dataclass
class PackedModule:
    """One compressed matrix, in canonical out × in orientation.

    ``sign`` is uint8 ``[bits, out, ceil(in/8)]``; ``scale`` float32 ``[bits]`` (scalar),
    ``[bits, out]`` (row) or ``[bits, in]`` (col). ``out`` counts the base's rows; for
    vocabulary matrices ``extra_rows`` holds, dense, the fine-tune's rows beyond them.
    ``lowrank_b`` [out, r] and ``lowrank_a`` [r, in] (float16, both or neither) are a low-rank
    correction of the sign planes' residual (``lowrank.py``): Δ̂ = Σ_p scale_p ⊙ S_p + B·A.
    """

    kind: str
    mode: ScaleMode  # scalar, row or col (a str: compares equal to "row" etc.)
    sign: torch.Tensor
    scale: torch.Tensor
    in_features: int
    vocab: bool = False
    extra_rows: torch.Tensor | None = None
    lowrank_b: torch.Tensor | None = None
    lowrank_a: torch.Tensor | None = None

    def __post_init__(self):
        self.mode = check_mode(self.mode)
        if self.kind not in (LINEAR, CONV1D, EMBEDDING):
            raise ValueError(f"unknown module kind {self.kind!r}")

    @property
    def bits(self) -> int:
        return int(self.sign.shape[0])

    @property
    def out_features(self) -> int:
        """Rows of the base matrix this delta applies to."""
        return int(self.sign.shape[1])

    @property
    def lowrank_rank(self) -> int:
        """Rank of the low-rank correction (0: none)."""
        return 0 if self.lowrank_a is None else int(self.lowrank_a.shape[0])

    @property
    def total_rows(self) -> int:
        extra = 0 if self.extra_rows is None else int(self.extra_rows.shape[0])
        return self.out_features + extra

    def validate(self, name: str) -> None:
        """Checks internal shape consistency (used after loading untrusted files)."""
        from .errors import FormatError

        bits, out = self.sign.shape[0], self.sign.shape[1]
        want_scale = scale_shape(self.mode, int(out), self.in_features, int(bits))
        problems = []
        if self.sign.dtype != torch.uint8 or self.sign.dim() != 3:
            problems.append(f"sign must be uint8 [bits, out, in/8], got {self.sign.dtype} {tuple(self.sign.shape)}")
        elif self.sign.shape[2] != packed_width(self.in_features):
            problems.append(f"sign has {self.sign.shape[2]} bytes per row, {self.in_features} columns need "
                            f"{packed_width(self.in_features)}")
        if tuple(self.scale.shape) != want_scale:
            problems.append(f"{self.mode} scale must have shape {want_scale}, got {tuple(self.scale.shape)}")
        if self.extra_rows is not None and (self.extra_rows.dim() != 2 or self.extra_rows.shape[1] != self.in_features):
            problems.append(f"extra_rows must be [n, {self.in_features}], got {tuple(self.extra_rows.shape)}")
        if not torch.isfinite(self.scale).all():
            problems.append("scale holds NaN or inf")
        problems += self._lowrank_problems(int(out))
        if problems:
            raise FormatError(f"module {name}: " + "; ".join(problems))

    def _lowrank_problems(self, out: int) -> list[str]:
        b, a = self.lowrank_b, self.lowrank_a
        if b is None and a is None:
            return []
        if b is None or a is None:
            return ["lowrank_b and lowrank_a come together; one is missing"]
        if self.kind == EMBEDDING:
            return ["an embedding takes no low-rank correction"]
        problems = []
        if not (b.is_floating_point() and a.is_floating_point()):
            problems.append(f"low-rank factors must be floating point, got {b.dtype} and {a.dtype}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] < 1 or tuple(b.shape) != (out, a.shape[0]) \
                or a.shape[1] != self.in_features:
            problems.append(f"low-rank factors must be B [{out}, r] and A [r, {self.in_features}], got "
                            f"B {tuple(b.shape)} and A {tuple(a.shape)}")
        elif not (torch.isfinite(b).all() and torch.isfinite(a).all()):
            problems.append("low-rank factors hold NaN or inf")
        return problems

    def sign_dense(self) -> torch.Tensor:
        """Float32 Σ_p scale_p ⊙ S_p (the sign planes' part of Δ̂), out × in."""
        return reconstruct(self.sign, self.scale, self.in_features, self.mode)

    def dense(self) -> torch.Tensor:
        """Float32 Δ̂ for the base's rows, out × in (sign planes plus the low-rank term, if any)."""
        total = self.sign_dense()
        if self.lowrank_a is not None:
            total = total + self.lowrank_b.float() @ self.lowrank_a.float()
        return total

    def copy(self, **changes) -> "PackedModule":
        """A copy with ``changes`` (e.g. ``scale=...``); tensors not given are shared, not cloned."""
        return dataclasses.replace(self, **changes)

    def to(self, device: str | torch.device) -> "PackedModule":
        """A copy with every tensor on ``device`` (self when they already are: no copy)."""
        device = torch.device(device)
        optional = {k: getattr(self, k) for k in ("extra_rows", "lowrank_b", "lowrank_a")
                    if getattr(self, k) is not None}
        if all(t.device == device for t in [self.sign, self.scale, *optional.values()]):
            return self
        return self.copy(sign=self.sign.to(device), scale=self.scale.to(device),
                         **{k: t.to(device) for k, t in optional.items()})

    def lowrank_nbytes(self) -> int:
        """Bytes of the low-rank factors (0 without them)."""
        if self.lowrank_a is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.lowrank_a, self.lowrank_b))

    def nbytes(self) -> int:
        n = self.sign.numel() + self.scale.numel() * self.scale.element_size() + self.lowrank_nbytes()
        if self.extra_rows is not None:
            n += self.extra_rows.numel() * self.extra_rows.element_size()
        return n


@dataclass
class Delta:
    """A fine-tune expressed as 1-bit modules plus dense extras against one base model.

    Attributes:
        modules: module FQN -> :class:`PackedModule`.
        dense: parameter FQN -> the fine-tune's full value (norms, biases, modules kept dense).
        fingerprint: samples of the base weights, checked before applying.
        info: metadata recorded in ``delta_config.json`` (model ids, options, distillation...), a
            :class:`DeltaInfo` (a plain dict given here is read into one; it still reads like a dict).
        files: tokenizer and generation-config files of the fine-tune, by file name.
    """

    modules: dict[str, PackedModule]
    dense: dict[str, torch.Tensor]
    fingerprint: Fingerprint
    info: DeltaInfo = field(default_factory=DeltaInfo)
    files: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.info, DeltaInfo):
            self.info = DeltaInfo.from_dict(dict(self.info or {}))

    def copy(self, **changes) -> "Delta":
        """A new Delta with its own module/dense/file dicts and info (``changes`` replace fields). The
        packed modules and tensors themselves are shared: replace a module to change it."""
        fields = {"modules": dict(self.modules), "dense": dict(self.dense), "info": self.info.copy(),
                  "files": dict(self.files)}
        return dataclasses.replace(self, **{**fields, **changes})

    @property
    def artifact_path(self) -> str | None:
        """Where this delta was loaded from (None when made in memory); never written to the artifact."""
        return self.info.artifact_path

    @artifact_path.setter
    def artifact_path(self, path: str | None) -> None:
        self.info.artifact_path = None if path is None else str(path)

    @property
    def base_model_name_or_path(self) -> str:
        return self.info.get("base_model_name_or_path", "?")

    @property
    def finetuned_model_name_or_path(self) -> str:
        return self.info.get("finetuned_model_name_or_path", "?")

    @property
    def ties(self) -> dict[str, str]:
        """Fine-tune parameter aliases (e.g. ``lm_head.weight`` -> ``model.embed_tokens.weight``)."""
        return self.info.get("tied_parameters", {})

    def nbytes(self) -> int:
        """Bytes of all tensors the delta stores (what dominates the artifact on disk)."""
        packed = sum(m.nbytes() for m in self.modules.values())
        dense = sum(t.numel() * t.element_size() for t in self.dense.values())
        return packed + dense + self.fingerprint.samples.numel() * 4

    def to(self, device: str | torch.device) -> "Delta":
        """Moves every tensor to ``device`` in place (the PackedModule objects stay the same objects,
        which ``distill_scales`` relies on, see ``apply``) and returns self."""
        for m in self.modules.values():
            m.sign, m.scale = m.sign.to(device), m.scale.to(device)
            if m.extra_rows is not None:
                m.extra_rows = m.extra_rows.to(device)
            if m.lowrank_a is not None:
                m.lowrank_a, m.lowrank_b = m.lowrank_a.to(device), m.lowrank_b.to(device)
        self.dense = {k: v.to(device) for k, v in self.dense.items()}
        return self

    def save_pretrained(self, save_directory, max_shard_size: int | str = "5GB", overwrite: bool = True) -> None:
        """Writes the artifact directory atomically (see ``artifact.py``)."""
        from .artifact import save_delta

        save_delta(self, save_directory, max_shard_size=max_shard_size, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu", revision: str | None = None) -> "Delta":
        """Loads an artifact directory (or hub id), validating every file."""
        from .artifact import load_delta

        return load_delta(path, device=device, revision=revision)

    def summary(self) -> dict:
        """Counts by kind/mode/bits, for ``inspect`` and model cards."""
        by = {}
        for m in self.modules.values():
            key = f"{m.kind}/{m.mode}/{m.bits}bit" + ("+lowrank" if m.lowrank_rank else "")
            by[key] = by.get(key, 0) + 1
        return by

    def __repr__(self) -> str:
        return (
            f"Delta(base={self.base_model_name_or_path!r}, finetuned={self.finetuned_model_name_or_path!r}, "
            f"modules={len(self.modules)}, dense={len(self.dense)}, bytes={self.nbytes():,})"
        )
