"""One naming for every tensor of a delta: the model's own (in-model) parameter names.

A checkpoint on disk and the model built from it may name and shape tensors differently. In
transformers 5 a Mixtral checkpoint stores ``block_sparse_moe.experts.3.w1.weight`` one expert at a
time while the model holds all experts fused in one 3-D ``mlp.experts.gate_up_proj``; legacy
checkpoints lack the ``model.`` prefix. transformers maps one to the other with its weight
conversion (``conversion_mapping``: renamings and converters such as MergeModulelist/Concatenate),
applied when loading and reversed when saving. bitdelta records every tensor under the in-model
names (``NAMING``) and reads checkpoints through that same conversion (:class:`CheckpointNaming`),
so ``apply``/``merge``/distillation work on the loaded model directly and a merged model saved with
``save_pretrained`` is written back under the checkpoint names, like the fine-tune.

A fused expert parameter ``[E, a, b]`` holds one matrix per expert; each is its own delta entry,
named ``<parameter>[<expert>]`` (:func:`entry_name`, :func:`split_entry`).

    naming = CheckpointNaming.build(checkpoint_keys, module_tree)
    naming.sources("model.layers.0.mlp.experts.gate_up_proj")   # the checkpoint keys it is made of
    naming.targets("model.layers.0.block_sparse_moe.experts.0.w1.weight")  # -> in-model names
"""

from __future__ import annotations

import copy
import re
from typing import Callable

import torch
from torch import nn

NAMING = "in-model"  # recorded in delta_config.json: tensors are keyed by the model's parameter names

_ENTRY = re.compile(r"^(?P<param>.+)\[(?P<index>\d+)\]$")


def entry_name(param: str, index: int | None) -> str:
    """The delta entry name of expert ``index`` of a fused parameter (or the module name)."""
    return param if index is None else f"{param}[{index}]"


def split_entry(name: str) -> tuple[str, int | None]:
    """``"a.b.gate_up_proj[3]"`` -> ``("a.b.gate_up_proj", 3)``; a module name -> ``(name, None)``."""
    m = _ENTRY.match(name)
    if m is None:
        return name, None
    return m.group("param"), int(m.group("index"))


def _natural_key(key: str):
    """Orders ``experts.10`` after ``experts.9``, as transformers orders keys before merging lists."""
    try:
        from transformers.core_model_loading import dot_natural_key

        return dot_natural_key(key)
    except ImportError:  # pragma: no cover - older transformers
        return [int(p) if p.isdigit() else p for p in key.split(".")]


class CheckpointNaming:
    """How the tensors of one checkpoint become the in-model tensors, via transformers' conversion.

    ``targets(key)``: in-model names a checkpoint tensor feeds (empty if the model does not load it);
    ``sources(name)``: the checkpoint keys an in-model tensor is built from; ``materialize(name,
    read)`` builds it, reading checkpoint tensors with ``read(key)``.
    """

    def __init__(self, plan: dict[str, tuple[object | None, list[tuple[str, str | None]]]],
                 unplaced: list[str], module_tree: nn.Module | None):
        self._plan = plan  # in-model name -> (converter template or None, [(checkpoint key, pattern)])
        self._targets: dict[str, list[str]] = {}
        for name, (_, srcs) in plan.items():
            for key, _ in srcs:
                self._targets.setdefault(key, []).append(name)
        for key in unplaced:
            self._targets.setdefault(key, [])
        self._tree = module_tree
        self._pending: dict[str, torch.Tensor] = {}  # other outputs of a one-to-many converter

    @classmethod
    def identity(cls, keys) -> "CheckpointNaming":
        return cls({k: (None, [(k, None)]) for k in keys}, [], None)

    @classmethod
    def build(cls, keys, module_tree: nn.Module) -> "CheckpointNaming":
        """The conversion transformers would apply to load ``keys`` into ``module_tree``."""
        keys = sorted(keys, key=_natural_key)
        try:
            from transformers import PreTrainedModel
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:  # pragma: no cover - transformers without weight conversion
            return cls._by_prefix(keys, module_tree)
        if not isinstance(module_tree, PreTrainedModel):
            return cls._by_prefix(keys, module_tree)
        mapping = get_model_conversion_mapping(module_tree)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        state = module_tree.state_dict()
        prefix = getattr(module_tree, "base_model_prefix", None) or None
        plan: dict[str, tuple[object | None, list[tuple[str, str | None]]]] = {}
        unplaced = []
        for key in keys:
            name, pattern = rename_source_key(key, renamings, converters, prefix, state)
            if name not in state and key in state:  # transformers' own fallback: the key as it is
                name, pattern = rename_source_key(key, [], [], prefix, state)
            if name not in state:
                unplaced.append(key)
                continue
            template = copy.deepcopy(by_pattern[pattern]) if pattern is not None else None
            entry = plan.setdefault(name, (template, []))
            entry[1].append((key, pattern))
            # A one-to-many converter (one checkpoint tensor split in several) is named after its
            # first target; its other targets are built by the same conversion.
            if template is not None and len(template.target_patterns) > 1:
                first = template.target_patterns[0]
                for other in template.target_patterns[1:]:
                    alias = name.replace(first, other)
                    if alias != name and alias in state:
                        plan.setdefault(alias, (copy.deepcopy(template), []))[1].append((key, pattern))
        return cls(plan, unplaced, module_tree)

    @classmethod
    def _by_prefix(cls, keys, module_tree) -> "CheckpointNaming":
        """Without transformers' conversion: names as stored, adding or dropping the base prefix."""
        names = set(dict(module_tree.named_parameters(remove_duplicate=False))) if module_tree is not None else set()
        names |= set(dict(module_tree.named_buffers())) if module_tree is not None else set()
        prefix = (getattr(module_tree, "base_model_prefix", "") or "") + "."
        plan, unplaced = {}, []
        for key in keys:
            for cand in (key, prefix + key, key[len(prefix):] if key.startswith(prefix) else None):
                if cand and (cand in names or not names):
                    plan.setdefault(cand, (None, []))[1].append((key, None))
                    break
            else:
                unplaced.append(key)
        return cls(plan, unplaced, module_tree)

    # ------------------------------------------------------------------ queries

    def names(self) -> list[str]:
        """In-model tensor names the checkpoint provides."""
        return list(self._plan)

    def keys(self) -> list[str]:
        """Every checkpoint key."""
        return list(self._targets)

    def has(self, name: str) -> bool:
        return name in self._plan

    def converted(self, name: str) -> bool:
        """True if ``name`` is built by a converter (fused, split, transposed...), not just renamed."""
        return self._plan[name][0] is not None

    def sources(self, name: str) -> list[str]:
        return [k for k, _ in self._plan[name][1]]

    def targets(self, key: str) -> list[str]:
        return list(self._targets.get(key, []))

    def unplaced(self) -> list[str]:
        """Checkpoint keys the model does not load."""
        return [k for k, t in self._targets.items() if not t]

    def materialize(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The in-model tensor ``name``, built from the checkpoint tensors by transformers' own ops."""
        if name in self._pending:
            return self._pending.pop(name)
        template, srcs = self._plan[name]
        if template is None:
            return read(srcs[0][0])
        conv = copy.deepcopy(template)
        for key, pattern in srcs:
            conv.add_tensor(name, key, pattern, (lambda k=key: read(k)))
        out = conv.convert(name, model=self._tree, config=getattr(self._tree, "config", None))
        value = None
        for target, tensor in out.items():
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            if target == name:
                value = tensor
            elif target in self._plan:
                self._pending[target] = tensor
        if value is None:
            from .errors import FormatError

            raise FormatError(f"transformers' weight conversion did not produce {name!r} from {self.sources(name)}")
        return value
