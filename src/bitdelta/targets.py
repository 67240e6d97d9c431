"""Which weights of a model get a 1-bit delta, found by module type, never by name.

Every ``nn.Linear``, every GPT-2-style ``Conv1D`` (weight stored as in × out) and every
``nn.Embedding`` is a candidate; ``target``/``exclude`` patterns (globs or regular
expressions over module names) narrow the choice. Parameters shared between modules (tied
embeddings) are compressed once, under the first module that owns them.

    plan = plan_targets(module_tree, target=None, exclude=["lm_head"])
    for t in plan.targets: print(t.name, t.kind)
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # transformers without Conv1D: nothing of that kind can exist
        return ()


def module_kind(module: nn.Module) -> str | None:
    """The kind of compressible matrix ``module`` holds, or None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    conv1d = _conv1d_type()
    if conv1d and isinstance(module, conv1d):
        return CONV1D
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    return None


def matches(name: str, patterns: list[str] | None) -> bool:
    """True if ``name`` matches any pattern: a glob (``*.q_proj``) or a regular expression
    searched in the name (``q_proj|v_proj``, ``^model\\.layers\\.0\\.``)."""
    for p in patterns or []:
        if fnmatch.fnmatchcase(name, p):
            return True
        try:
            if re.search(p, name):
                return True
        except re.error:
            pass
    return False


@dataclass(frozen=True)
class Target:
    name: str  # module FQN, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # LINEAR, CONV1D or EMBEDDING
    param: str  # FQN of its weight parameter
    # Input embedding or output head: rows are tokens, so they get per-row scales and rows
    # the base lacks (added tokens) are stored dense.
    vocab: bool = False


@dataclass
class TargetPlan:
    targets: list[Target]
    ties: dict[str, str] = field(default_factory=dict)  # alias param FQN -> owner param FQN
    other_params: list[str] = field(default_factory=list)  # kept dense when they differ


def plan_targets(
    module_tree: nn.Module,
    target: list[str] | None = None,
    exclude: list[str] | None = None,
    dense_embeddings: bool = False,
) -> TargetPlan:
    """Lists the compressible matrices of ``module_tree`` (a real or meta-device model)."""
    owner_by_param: dict[int, str] = {}
    ties: dict[str, str] = {}
    for pname, p in module_tree.named_parameters(remove_duplicate=False):
        if id(p) in owner_by_param:
            ties[pname] = owner_by_param[id(p)]
        else:
            owner_by_param[id(p)] = pname
    vocab_modules = _vocab_module_names(module_tree)
    targets: list[Target] = []
    for mname, module in module_tree.named_modules():
        kind = module_kind(module)
        if kind is None or getattr(module, "weight", None) is None:
            continue
        param = f"{mname}.weight" if mname else "weight"
        if param in ties or module.weight.dim() != 2:
            continue
        if target is not None and not matches(mname, target):
            continue
        if matches(mname, exclude):
            continue
        if dense_embeddings and (kind == EMBEDDING or mname in vocab_modules):
            continue
        targets.append(Target(mname, kind, param, vocab=mname in vocab_modules or kind == EMBEDDING))
    compressed = {t.param for t in targets}
    others = [n for n in owner_by_param.values() if n not in compressed]
    return TargetPlan(targets, ties, others)


def _vocab_module_names(module_tree: nn.Module) -> set[str]:
    """Names of the input embedding and output head modules, from the HF accessors."""
    names = set()
    by_id = {id(m): n for n, m in module_tree.named_modules()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(module_tree, getter, None)
        try:
            m = fn() if fn else None
        except (NotImplementedError, AttributeError):
            m = None
        if m is not None and id(m) in by_id:
            names.add(by_id[id(m)])
    return names


def output_head_name(module_tree: nn.Module) -> str | None:
    """FQN of the output head (``lm_head``) if the model exposes one."""
    fn = getattr(module_tree, "get_output_embeddings", None)
    head = fn() if fn else None
    for n, m in module_tree.named_modules():
        if m is head:
            return n
    return None
