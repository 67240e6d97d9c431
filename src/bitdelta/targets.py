"""Which weights of a model get a 1-bit delta, found by type and role, never by name.

Every ``nn.Linear``, every GPT-2-style ``Conv1D`` (weight stored as in × out) and every
``nn.Embedding`` is a candidate, and so are:

- mixture-of-experts weights: a module transformers marks as an experts implementation (it sets
  ``is_transposed``) holds fused 3-D parameters ``[E, a, b]``, one matrix per expert; each expert's
  matrix is its own target ``<param>[<e>]`` (``naming.entry_name``). transformers' flag says how the
  forward uses them: ``x @ W[e]`` (stored in × out, like Conv1D) or ``linear(x, W[e])`` (out × in);
- other 2-D parameters a module's forward multiplies its input with (MoE routers, which are not
  ``nn.Linear``), found by running that module once on a small input and watching the call.

``target``/``exclude`` patterns (globs or regular expressions over module names, or the parameter
name for fused experts) narrow the choice. Parameters shared between modules (tied embeddings) are
compressed once, under the first module that owns them. Anything not chosen is left to the dense
extras, so nothing is lost.

    plan = plan_targets(module_tree, target=None, exclude=["lm_head"])
    for t in plan.targets: print(t.name, t.kind)
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .naming import entry_name

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
    name: str  # delta entry: module FQN ("model.layers.0.self_attn.q_proj") or "<param>[<expert>]"
    kind: str  # LINEAR (stored out × in) or CONV1D (stored in × out) or EMBEDDING
    param: str  # FQN of the parameter holding the matrix
    # Input embedding or output head: rows are tokens, so they get per-row scales and rows
    # the base lacks (added tokens) are stored dense.
    vocab: bool = False
    index: int | None = None  # expert index along dim 0 of a fused 3-D parameter


@dataclass
class TargetPlan:
    targets: list[Target]
    ties: dict[str, str] = field(default_factory=dict)  # alias param FQN -> owner param FQN
    other_params: list[str] = field(default_factory=list)  # params and persistent buffers, kept dense when they differ


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
    hidden = _hidden_size(module_tree)
    probed: dict[tuple, dict[str, str]] = {}
    targets: list[Target] = []
    for mname, module in module_tree.named_modules():
        kind = module_kind(module)
        if kind is None:
            targets += _other_matrices(module, mname, ties, hidden, probed, target, exclude)
            continue
        if getattr(module, "weight", None) is None:
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
    # Persistent buffers are stored in checkpoints too, and training may change them (DeepSeek-V3's
    # e_score_correction_bias): kept dense like norms when they differ.
    params = set(owner_by_param.values()) | set(ties)
    others += [n for n in module_tree.state_dict(keep_vars=True) if n not in params]
    return TargetPlan(targets, ties, others)


def is_experts_module(module: nn.Module) -> bool:
    """True for a transformers mixture-of-experts implementation (fused 3-D expert weights)."""
    return isinstance(getattr(module, "is_transposed", None), bool) and any(
        p.dim() == 3 for p in module.parameters(recurse=False))


def _selected(mname: str, pname: str, target, exclude) -> bool:
    names = (mname, pname)
    if target is not None and not any(matches(n, target) for n in names):
        return False
    return not any(matches(n, exclude) for n in names)


def _other_matrices(module, mname, ties, hidden, probed, target, exclude) -> list[Target]:
    """Targets among a module's own parameters that are not a Linear/Conv1D/Embedding weight."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False)]
    prefix = f"{mname}." if mname else ""
    out = []
    if is_experts_module(module):
        # transformers' own flag: True when the forward computes x @ W[e] (W[e] stored in × out).
        kind = CONV1D if module.is_transposed else LINEAR
        for n, p in own:
            pname = prefix + n
            if p.dim() != 3 or pname in ties or not _selected(mname, pname, target, exclude):
                continue
            out += [Target(entry_name(pname, e), kind, pname, index=e) for e in range(p.shape[0])]
        return out
    mats = [(n, p) for n, p in own if p.dim() == 2 and prefix + n not in ties]
    if not mats or hidden is None:
        return out
    key = (type(module), tuple((n, tuple(p.shape)) for n, p in own))
    if key not in probed:
        probed[key] = _probe_roles(module, hidden)
    for n, _ in mats:
        role = probed[key].get(n)
        pname = prefix + n
        if role is None or not _selected(mname, pname, target, exclude):
            continue
        # a module owning one such matrix is named as the module, like an nn.Linear
        name = mname if (n == "weight" and len(mats) == 1) else pname
        out.append(Target(name, role, pname))
    return out


def _hidden_size(module_tree: nn.Module) -> int | None:
    cfg = getattr(module_tree, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    h = getattr(cfg, "hidden_size", None)
    return h if isinstance(h, int) else None


_PROBE_LIMIT = 1 << 24  # elements: probe small modules (routers), never materialise big ones


class _MatmulWatch(TorchFunctionMode):
    """Records which of the watched tensors a forward multiplies its input with, and how."""

    def __init__(self, watched: dict[str, torch.Tensor]):
        super().__init__()
        self.watched = {id(t): n for n, t in watched.items()}
        self.roles: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, torch._C._nn.linear):
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(w) in self.watched:
                self.roles.setdefault(self.watched[id(w)], LINEAR)  # linear(x, W): W is out × in
        elif func in (torch.matmul, torch.Tensor.__matmul__, torch.mm):
            if len(args) > 1 and id(args[1]) in self.watched:
                self.roles.setdefault(self.watched[id(args[1])], CONV1D)  # x @ W: W is in × out
        return func(*args, **kwargs)


def _probe_roles(module: nn.Module, hidden: int) -> dict[str, str]:
    """Runs ``module`` once on a one-token input with small stand-in weights (its own are often on
    the meta device) and returns, for each own 2-D parameter the forward multiplies the input with,
    its orientation. Modules whose forward needs more than one hidden-state tensor are skipped."""
    own = dict(module.named_parameters(recurse=False))
    if sum(p.numel() for p in module.parameters()) > _PROBE_LIMIT:
        return {}
    g = torch.Generator().manual_seed(0)
    stand_in = {n: torch.randn(p.shape, generator=g) for n, p in module.named_parameters()}
    for n, b in module.named_buffers():
        stand_in[n] = (torch.zeros(b.shape, dtype=b.dtype) if b is not None else b)
    watch = _MatmulWatch({n: stand_in[n] for n, p in own.items() if p.dim() == 2})
    x = torch.randn(1, 1, hidden, generator=g)
    try:
        with warnings.catch_warnings(), torch.no_grad(), watch:
            warnings.simplefilter("ignore")
            torch.func.functional_call(module, stand_in, (x,))
    except Exception:  # any module that cannot run this way keeps its matrices dense
        return {}
    return watch.roles


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


def vocab_parameter_names(module_tree: nn.Module) -> set[str]:
    """FQNs of the input embedding's and output head's weights."""
    return {f"{n}.weight" if n else "weight" for n in _vocab_module_names(module_tree)}


def output_head_name(module_tree: nn.Module) -> str | None:
    """FQN of the output head (``lm_head``) if the model exposes one."""
    fn = getattr(module_tree, "get_output_embeddings", None)
    head = fn() if fn else None
    for n, m in module_tree.named_modules():
        if m is head:
            return n
    return None
