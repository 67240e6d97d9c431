"""Scale distillation: train only a delta's scales so base + delta matches the fine-tune's logits.

The student is the base model with the delta applied on the fly (no third model copy); its only
trainable tensors are the scales, and every base parameter is frozen and left bit-identical.
The teacher's logits come from the fine-tune batch by batch, or from a cache precomputed to disk
(:func:`precompute_teacher_logits`) for machines that cannot hold both models. The loss (MSE on
logits as the paper, or KL) counts real tokens only, never padding. Gradients flow through the
1-bit path (``delta_matmul``) into earlier layers. Mixture-of-experts matrices (each expert's slice of
a fused parameter, routers) are trained the same way through their parametrization (``layers.py``):
``W + Δ̂`` is built once per step from the bits and the current scales.

``choose_modes`` implements ``--scale auto``: given the scalar, row and col deltas, each distilled
on its own, it keeps per module the mode whose scales give the lowest KL(fine-tune ‖ model) on the
held-out split of the calibration source the distillation used (not the training loss, and KL
rather than MSE: KL is what the fidelity measures score, MSE on logits also counts shifts that
softmax ignores). It starts from the best uniform choice, so on that split ``auto`` is never worse
than the best of scalar/row/col. ``choose_auto`` is the earlier row/col-only search on the
distillation loss, kept so its results can be reproduced.

    cal = load_calibration("calibration.jsonl", tok)
    delta = distill_scales(delta, base_model, finetuned_model, cal, DistillConfig(steps=200, lr=1e-4))
    delta = distill_scales(delta, base_model, finetuned_model, cal, steps=200, lr=1e-4)   # the same
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .apply import apply, set_applied_packed, unapply
from .calibration import Calibration, TokenBatches
from .configs import LR_MODES, DistillConfig, fill
from .delta import Delta, PackedModule
from .errors import BitDeltaError
from .layers import DeltaParametrization, DeltaWrapper

logger = logging.getLogger(__name__)


def logits_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Loss over real tokens: student/teacher ``[B, L, V]``, mask ``[B, L]`` (0 = padding)."""
    keep = mask.bool()
    s = student[keep].float()
    t = teacher[keep].float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "kl":
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    raise BitDeltaError(f"loss must be 'mse' or 'kl', got {kind!r}")


class TeacherLogits:
    """Teacher logits for a fixed set of samples: from a live model, a float16 cache on disk,
    or a tensor held in memory."""

    def __init__(self, model: nn.Module | None = None, cache: Path | None = None, shape=None,
                 tensor: torch.Tensor | None = None, samples: TokenBatches | None = None):
        self.model, self.cache, self._mm, self.tensor = model, cache, None, tensor
        self.samples = samples  # what a cache or tensor holds logits for
        if cache is not None:
            self._mm = np.memmap(cache, dtype=np.float16, mode="r", shape=shape)

    def covers(self, samples: TokenBatches) -> bool:
        return self.model is not None or samples is self.samples

    @torch.no_grad()
    def get(self, samples: TokenBatches, index: torch.Tensor, device) -> torch.Tensor:
        if not self.covers(samples):
            raise BitDeltaError("these teacher logits were precomputed for other samples")
        if self.tensor is not None:
            return self.tensor[index.to(self.tensor.device)].to(device)
        if self._mm is not None:
            return torch.from_numpy(np.asarray(self._mm[index.cpu().numpy()])).to(device)
        ids, mask = samples.batch(index)
        dev = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.to(device)


@torch.no_grad()
def precompute_teacher_logits(model: nn.Module, samples: TokenBatches, path, batch_size: int = 8,
                              progress: bool = True) -> TeacherLogits:
    """Writes the teacher's logits for every sample to ``path`` (float16 memmap) and returns a
    :class:`TeacherLogits` reading them, so the fine-tune can be freed before distillation."""
    dev = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    shape = (len(samples), samples.input_ids.shape[1], vocab)
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=shape)
    for start in tqdm(range(0, len(samples), batch_size), desc="teacher logits", disable=not progress):
        idx = torch.arange(start, min(start + batch_size, len(samples)))
        ids, mask = samples.batch(idx)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        mm[start:start + len(idx)] = logits.float().clamp(-65000, 65000).cpu().numpy().astype(np.float16)
    mm.flush()
    del mm
    return TeacherLogits(cache=Path(path), shape=shape, samples=samples)


def _applied_packed(model: nn.Module) -> list[PackedModule]:
    """Every packed module applied to ``model``: wrapped layers and parametrized (expert, router)
    matrices alike, each once."""
    out = []
    for m in model.modules():
        if isinstance(m, DeltaWrapper):
            out.append(m.packed)
        elif isinstance(m, DeltaParametrization):
            out += m.packed
    return out


class _TrainableScales:
    """Every distinct packed module's scale as a trainable leaf (tied users share it).

    ``absolute``: the scale itself is the parameter, as the paper trains it; AdamW moves it by
    about ``lr`` per step whatever its size. ``relative``: the parameter is a multiplier ``m``
    (starting at 1) of the initial scale, ``scale = s0 * m``, so ``lr`` is a step relative to each
    scale and one lr suits deltas of any magnitude. :meth:`refresh` writes the current scales into
    the packed modules; call it before every forward.
    """

    def __init__(self, model: nn.Module, mode: str):
        if mode not in LR_MODES:
            raise BitDeltaError(f"unknown lr mode {mode!r}; expected one of {', '.join(LR_MODES)}")
        self.relative = mode == "relative"
        self.packed, seen = [], set()
        for pk in _applied_packed(model):
            if id(pk) not in seen:
                seen.add(id(pk))
                self.packed.append(pk)
        self.initial = [pk.scale.detach().float().clone() for pk in self.packed]
        self.params = [nn.Parameter(self._start(s0)) for s0 in self.initial]
        self.refresh()

    def _start(self, s0: torch.Tensor) -> torch.Tensor:
        """The parameter's starting value: a multiplier of 1, or the initial scale itself."""
        return torch.ones_like(s0) if self.relative else s0.clone()

    def refresh(self) -> None:
        for pk, s0, param in zip(self.packed, self.initial, self.params):
            pk.scale = s0 * param if self.relative else param

    @torch.no_grad()
    def reset(self) -> None:
        for s0, param in zip(self.initial, self.params):
            param.copy_(self._start(s0))
        self.refresh()


@torch.no_grad()
def heldout_loss(model: nn.Module, teacher: TeacherLogits, samples: TokenBatches, batch_size: int, kind: str) -> float:
    """Mean loss over ``samples`` (weighted by real tokens)."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(samples)))
        ids, mask = samples.batch(idx)
        ids, mask = ids.to(dev), mask.to(dev)
        s = model(input_ids=ids, attention_mask=mask).logits
        n = int(mask.sum())
        total += float(logits_loss(s, teacher.get(samples, idx, dev), mask, kind)) * n
        count += n
    return total / max(count, 1)


def distill_scales(
    delta: Delta,
    base: nn.Module,
    finetuned: nn.Module | None,
    calibration: Calibration | TokenBatches,
    config: DistillConfig | None = None,
    *,
    teacher: TeacherLogits | None = None,
    progress: bool = True,
    **settings,
) -> Delta:
    """Returns a copy of ``delta`` whose scales minimise the logit distance to the fine-tune.

    Args:
        base: the base model (modules are swapped during training and restored after; its
            weights are never written).
        finetuned: the teacher, or None when ``teacher`` holds precomputed logits.
        calibration: samples (``Calibration.train`` is used for training and ``.heldout`` for
            the held-out loss recorded before and after).
        config: the settings (:class:`DistillConfig`; default: its field defaults, the paper's).
            Of it, ``steps``, ``lr``, ``lr_mode``, ``batch_size``, ``loss``, ``seed``, ``keep_better``
            and ``train_dense`` are used here; the calibration fields made ``calibration``.
        settings: fields of :class:`DistillConfig` as keywords (``steps=60, lr=1e-3``), put over ``config``.

    Settings:
        train_dense: the reference recipe, for comparison only: also train the delta's dense
            extras that are embeddings, the output head or norms (as the reference code did by
            accident; with ``compress(dense_embeddings=True)`` these are the embedding/lm_head
            and every norm). The trained values are stored as the returned delta's dense extras;
            the base's own parameters are still never written.
        keep_better: when the calibration has a held-out split and the trained scales score worse
            on it than the initial ones, return the initial scales (recorded as ``kept:
            "initial"``). AdamW's steps are about ``lr`` in absolute size, so scales much smaller
            than ``lr`` (tiny deltas) can be thrown about rather than fitted; this keeps such a run
            from making a delta worse. Off for ``train_dense`` (the reference recipe had no guard).
        lr_mode: ``"absolute"`` (default, the paper's: AdamW on the scales, each step about ``lr``
            in size) or ``"relative"`` (AdamW on a multiplier of each initial scale, each step
            about ``lr`` times the scale; e.g. ``lr=1e-2``). With absolute steps, scales of a few
            ``lr`` (small models, light fine-tunes, the second plane of ``bits=2``) move by tens of
            percent per step and runs with the same seed can end far apart.
    """
    if config is not None and not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}; pass steps, lr... as keywords")
    cfg = fill(config or DistillConfig(), settings, "distill_scales")
    steps, lr, lr_mode, batch_size, loss, seed = cfg.steps, cfg.lr, cfg.lr_mode, cfg.batch_size, cfg.loss, cfg.seed
    train_dense, keep_better = cfg.train_dense, cfg.keep_better
    train = calibration.train if isinstance(calibration, Calibration) else calibration
    held = calibration.heldout if isinstance(calibration, Calibration) else None
    if teacher is None:
        if finetuned is None:
            raise BitDeltaError("distillation needs the fine-tuned model or precomputed teacher logits")
        teacher = TeacherLogits(model=finetuned.eval())
    # Fresh PackedModules (own scale tensors) that training writes into: moved in place to the model's
    # device first, so that apply() installs these very objects (apply.py, "Aliasing") and the
    # scales trained through the model are this delta's.
    work = delta.copy(modules={k: m.copy(scale=m.scale.detach().clone()) for k, m in delta.modules.items()})
    home = next(iter(delta.modules.values())).sign.device if delta.modules else torch.device("cpu")
    work.to(next(base.parameters()).device)
    frozen = {p: p.requires_grad for p in base.parameters()}
    for p in base.parameters():
        p.requires_grad_(False)
    was_training = base.training
    base.eval()
    apply(base, work)
    try:
        scales = _TrainableScales(base, lr_mode)
        dense_params = _trainable_dense(base, work) if train_dense else {}
        dev = next(base.parameters()).device
        opt = torch.optim.AdamW(scales.params + list(dense_params.values()), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        can_hold = held is not None and len(held) and teacher.covers(held)
        held_before = heldout_loss(base, teacher, held, batch_size * 4, loss) if can_hold else None
        order = torch.randperm(len(train), generator=gen)
        cursor, history = 0, []
        started = time.perf_counter()
        bar = tqdm(range(steps), desc="distilling scales", disable=not progress)
        for _ in bar:
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(train), generator=gen), 0
            idx = order[cursor:cursor + batch_size]
            cursor += batch_size
            ids, mask = train.batch(idx)
            ids, mask = ids.to(dev), mask.to(dev)
            target = teacher.get(train, idx, dev)
            scales.refresh()  # relative mode: scale = s0 * m, rebuilt for this step's graph
            with parametrize.cached():  # expert weights (W + Δ̂) built once per step, however often read
                logits = base(input_ids=ids, attention_mask=mask).logits
            value = logits_loss(logits, target, mask, loss)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            history.append(float(value.detach()))
            bar.set_postfix(loss=f"{history[-1]:.5f}")
        elapsed = time.perf_counter() - started
        scales.refresh()
        held_after = heldout_loss(base, teacher, held, batch_size * 4, loss) if held_before is not None else None
        kept = "distilled"
        if keep_better and not train_dense and held_after is not None and held_after > held_before:
            scales.reset()
            kept = "initial"
            logger.warning("distillation raised the held-out loss (%.4g -> %.4g); keeping the initial scales "
                           "(try a lower --distill-lr)", held_before, held_after)
        for name, param in dense_params.items():
            work.dense[name] = param.detach().to(work.dense[name].dtype).clone()
    finally:
        unapply(base)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        base.train(was_training)
    for m in work.modules.values():
        m.scale = m.scale.detach().float()
        if not torch.isfinite(m.scale).all():
            raise BitDeltaError("distillation diverged (non-finite scales); lower --distill-lr")
    work.to(home)
    tail = history[-max(1, min(10, len(history))):]
    work.info["distillation"] = {
        "steps": steps, "lr": lr, "lr_mode": lr_mode, "batch_size": batch_size,
        "seq_len": int(train.input_ids.shape[1]),
        "num_samples": len(train), "loss": loss, "seed": seed,
        "dataset": getattr(calibration, "source", None),
        "initial_loss": history[0], "final_loss": sum(tail) / len(tail),
        "heldout_loss_before": held_before, "heldout_loss_after": held_after,
        "kept": kept, "seconds": round(elapsed, 2),
    }
    if train_dense:
        work.info["distillation"]["train_dense"] = sorted(dense_params)
    return work


def _is_reference_dense(name: str) -> bool:
    lowered = name.lower()
    return any(k in lowered for k in ("embed", "wte", "wpe", "lm_head", "norm", "ln_"))


def _trainable_dense(model: nn.Module, work: Delta) -> dict[str, nn.Parameter]:
    """The applied copies of ``work``'s dense extras that the reference recipe trains
    (embeddings, output head, norms), made trainable. ``apply`` installed them as new
    parameters, so training them never touches the base's own tensors."""
    owned = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name in work.dense:
        if not _is_reference_dense(name) or name not in owned:
            continue
        param = owned[name]
        if not param.is_floating_point():
            continue
        param.data = param.data.clone()  # apply() may share storage with the caller's delta
        param.requires_grad_(True)
        out[name] = param
    return out


@torch.no_grad()
def choose_auto(row_delta: Delta, col_delta: Delta, base: nn.Module, teacher: TeacherLogits,
                heldout: TokenBatches, batch_size: int = 16, loss: str = "mse", progress: bool = True) -> Delta:
    """Per module, keeps row or col scales, whichever lowers the held-out loss: greedy, in module
    order, starting from the better of all-row and all-col (so the result is never worse on the
    held-out split than either uniform choice). Vocabulary matrices always keep per-row scales."""
    if heldout is None or not len(heldout):
        raise BitDeltaError("--scale auto needs a held-out calibration split")
    dev = next(base.parameters()).device
    row_delta.to(dev)
    col_delta.to(dev)
    chosen = row_delta.copy()
    # The held-out teacher logits are reused for every trial: compute them once.
    cached = torch.cat([teacher.get(heldout, torch.arange(i, min(i + batch_size, len(heldout))), dev)
                        for i in range(0, len(heldout), batch_size)])
    teacher = TeacherLogits(tensor=cached, samples=heldout)
    apply(base, chosen)
    choices = {}
    try:
        names = [n for n, m in chosen.modules.items() if not m.vocab]
        source = {"row": row_delta, "col": col_delta}

        def use(name, mode):
            set_applied_packed(base, name, source[mode].modules[name])
            chosen.modules[name] = source[mode].modules[name]
            choices[name] = mode

        start_loss = heldout_loss(base, teacher, heldout, batch_size, loss)
        for name in names:
            use(name, "col")
        all_col_loss = heldout_loss(base, teacher, heldout, batch_size, loss)
        start = "col" if all_col_loss < start_loss and math.isfinite(all_col_loss) else "row"
        if start == "row":
            for name in names:
                use(name, "row")
        best = all_col_loss if start == "col" else start_loss
        other = "row" if start == "col" else "col"
        for name in tqdm(names, desc="auto: row or col", disable=not progress):
            use(name, other)
            trial = heldout_loss(base, teacher, heldout, batch_size, loss)
            if trial < best and math.isfinite(trial):
                best = trial
            else:
                use(name, start)
    finally:
        unapply(base)
    chosen.info["compression"] = dict(chosen.info.get("compression") or {}, scale="auto")
    chosen.info["distillation"] = dict(row_delta.info.get("distillation") or {}, auto={
        "heldout_loss_all_row": start_loss, "heldout_loss_all_col_here": all_col_loss, "start": start,
        "heldout_loss_chosen": best,
        "col_modules": sum(v == "col" for v in choices.values()),
        "row_modules": sum(v == "row" for v in choices.values()),
        "col_heldout_loss_all_col": (col_delta.info.get("distillation") or {}).get("heldout_loss_after"),
    })
    return chosen


@torch.no_grad()
def choose_modes(candidates: dict[str, Delta], base: nn.Module, teacher: TeacherLogits, heldout: TokenBatches,
                 batch_size: int = 16, criterion: str = "kl", min_gain: float = 1e-3, progress: bool = True) -> Delta:
    """Per module, keeps the candidate mode (e.g. ``{"scalar": d1, "row": d2, "col": d3}``, each
    distilled on its own) whose scales give the lowest ``criterion`` loss on ``heldout``.

    Greedy, in module order, from the best uniform candidate (that whole delta, vocabulary matrices
    and dense extras included, since its scales were trained together): each other mode is tried
    for each non-vocabulary module and kept when it lowers the held-out loss by more than a fraction
    ``min_gain`` of it (smaller gains are within what a few held-out samples can tell apart, and
    chasing them fits the split rather than the fine-tune). The result is never worse on
    ``heldout`` than the best uniform candidate. Recorded under ``distillation.auto``.
    """
    if heldout is None or not len(heldout):
        raise BitDeltaError("--scale auto needs a held-out calibration split (--heldout-samples >= 1)")
    if not candidates:
        raise BitDeltaError("choose_modes needs at least one candidate delta")
    dev = next(base.parameters()).device
    for d in candidates.values():
        d.to(dev)
    cached = torch.cat([teacher.get(heldout, torch.arange(i, min(i + batch_size, len(heldout))), dev)
                        for i in range(0, len(heldout), batch_size)])
    teacher = TeacherLogits(tensor=cached, samples=heldout)
    uniform = {}
    for mode, d in candidates.items():
        apply(base, d)
        try:
            uniform[mode] = heldout_loss(base, teacher, heldout, batch_size, criterion)
        finally:
            unapply(base)
    finite = {m: v for m, v in uniform.items() if math.isfinite(v)}
    if not finite:
        raise BitDeltaError("every candidate's held-out loss is non-finite; lower --distill-lr")
    start = min(finite, key=finite.get)
    first = candidates[start]
    chosen = first.copy()
    names = [n for n, m in chosen.modules.items() if not m.vocab]
    choices = {n: start for n in names}
    best = uniform[start]
    started = time.perf_counter()
    apply(base, chosen)
    try:
        for name in tqdm(names, desc="auto: scalar, row or col", disable=not progress):
            for mode, d in candidates.items():
                if mode == choices[name] or name not in d.modules:
                    continue
                set_applied_packed(base, name, d.modules[name])
                trial = heldout_loss(base, teacher, heldout, batch_size, criterion)
                if math.isfinite(trial) and trial < best * (1 - min_gain):
                    best, choices[name] = trial, mode
                    chosen.modules[name] = d.modules[name]
                else:
                    set_applied_packed(base, name, chosen.modules[name])
    finally:
        unapply(base)
    counts = {f"{m}_modules": sum(v == m for v in choices.values()) for m in candidates}
    chosen.info["compression"] = dict(chosen.info.get("compression") or {}, scale="auto")
    record = dict(first.info.get("distillation") or {})
    record["auto"] = {
        "method": "greedy per module from the best uniform mode", "criterion": criterion, "min_gain": min_gain,
        "candidates": list(candidates), "start": start, "heldout_samples": len(heldout),
        **{f"heldout_loss_all_{m}": v for m, v in uniform.items()},
        "heldout_loss_all_col_here": uniform.get("col"),  # the earlier record's name for all-col
        "heldout_loss_chosen": best, **counts,
        "distilled_heldout_loss_after": {m: (d.info.get("distillation") or {}).get("heldout_loss_after")
                                         for m, d in candidates.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
    chosen.info["distillation"] = record
    return chosen
