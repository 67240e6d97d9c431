"""Compression: a fine-tune and its base in, a :class:`Delta` out, one module at a time.

Checkpoints on disk are streamed tensor by tensor from their safetensors files, so peak host
memory is a few modules (plus the packed delta, 1/16 of the model), never two full models.
Every linear-like matrix (``nn.Linear``, GPT-2 ``Conv1D``, MoE routers), each expert's matrix of
fused mixture-of-experts weights, and the vocabulary matrices (embeddings, output head) become sign
planes with scales; every other parameter that differs from the base (norms, biases, excluded
modules) is kept dense with the fine-tune's value. Tensors are named as in the model (``naming.py``),
read from checkpoints through transformers' own weight conversion.

Against a quantized base (``base_quant="int8"|"fp8"``, or a base directory already quantized in a
standard format, see ``quant.py``) every matrix is compressed as ``Δ = W_ft − Q(W_base)``: the base
is read with its quantized weights, so the delta also absorbs the base's quantization error, and the
fingerprint (taken over the dequantized weights) refuses the unquantized base. The scheme is
recorded under ``compression.base_quantization`` in ``delta_config.json``.

Before any work, base and fine-tune must store the same tensors with the same shapes
(``coverage.check_structure``); after it, every stored tensor the fine-tune changed must be
compressed, dense, or excluded by the user (``coverage.audit``), or compression stops naming them.

    delta = compress("base_dir", "finetune_dir", CompressConfig(scale="row", exclude=("lm_head",)))
    delta = compress("base_dir", "finetune_dir", scale="row", exclude=["lm_head"])   # the same
    delta.save_pretrained("ft.bitdelta")
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ._version import __version__
from .binarize import binarize, reconstruct
from .configs import CompressConfig, fill
from .coverage import audit, check_structure
from .delta import Delta, PackedModule
from .errors import BitDeltaError, ShapeMismatchError
from .fingerprint import Fingerprint, sample_weight
from .lowrank import STORAGE_DTYPE, LowRankPlanner
from .naming import NAMING
from .scale_modes import ScaleMode
from .sources import WeightSource
from .targets import CONV1D, EMBEDDING, plan_targets, vocab_parameter_names

ModelLike = "str | os.PathLike | nn.Module"


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise BitDeltaError(f"unknown dtype {dtype!r}; use float16, bfloat16 or float32")
    return value


def compress(
    base: ModelLike,
    finetuned: ModelLike,
    config: CompressConfig | None = None,
    *,
    base_revision: str | None = None,
    finetuned_revision: str | None = None,
    progress: bool = True,
    **settings,
) -> Delta:
    """Compresses ``finetuned`` against ``base`` into a 1-bit (or ``bits``-bit) delta.

    Args:
        base, finetuned: local model directories, hub ids, or loaded ``nn.Module`` models.
        config: the settings (:class:`~bitdelta.configs.CompressConfig`; default: its defaults, scalar
            scales and one bit). ``scale="auto"`` needs distillation: see ``pipeline.compress_distilled``.
        base_revision, finetuned_revision: hub revisions of the two models.
        progress: show a progress bar.
        settings: fields of :class:`~bitdelta.configs.CompressConfig` as keywords (``scale="row",
            bits=2``), put over ``config``:

            - ``scale``: ``scalar`` (one per matrix, the paper), ``row`` or ``col``; vocabulary
              matrices always use per-row scales.
            - ``bits``: residual sign planes per matrix.
            - ``target``, ``exclude``: module-name patterns (globs or regexes) selecting what is
              compressed; by default every linear-like matrix and embedding.
            - ``dense_embeddings``: keep embeddings/output head dense, as the reference implementation did.
            - ``dtype``: dtype of the dense extras (default: the fine-tune's own).
            - ``base_quant``: ``"int8"`` or ``"fp8"``: compress against the base quantized per output
              channel (round to nearest), the base ``bitdelta quantize-base`` writes. A base that is
              already quantized is read as it is (its scheme must then match, if given).
            - ``lowrank_budget`` / ``lowrank_rank``: add a low-rank correction ``B·A`` of each matrix's
              sign-plane residual (``lowrank.py``): by a byte budget (a multiple of one sign plane's
              bytes) split across matrices by residual energy per byte, or a fixed rank.
    """
    if isinstance(config, str):  # compress(base, ft, "row"): the scale, as the third argument used to be
        config, settings = None, {"scale": config, **settings}
    if config is not None and not isinstance(config, CompressConfig):
        raise TypeError(f"config must be a CompressConfig, got {type(config).__name__}; pass settings as keywords")
    cfg = fill(config or CompressConfig(), settings, "compress")
    if cfg.needs_distillation:
        raise BitDeltaError(
            "scale='auto' picks scalar, row or col per module by the KL on held-out calibration data, "
            "so it needs distillation: use `bitdelta compress --recipe auto` (or "
            "bitdelta.pipeline.compress_distilled)."
        )
    scale, bits, dtype, base_quant = cfg.scale, cfg.bits, cfg.dtype, cfg.base_quant
    target = None if cfg.target is None else list(cfg.target)
    exclude = None if cfg.exclude is None else list(cfg.exclude)
    dense_embeddings = cfg.dense_embeddings
    dense_dtype = parse_dtype(dtype)

    base_src = WeightSource.load(base, base_revision)
    if base_quant is not None:
        _quantize_base(base_src, base_quant)
    ft_src = WeightSource.load(finetuned, finetuned_revision)
    _check_compatible(base_src, ft_src)
    plan = plan_targets(ft_src.module_tree, target, exclude, dense_embeddings)
    base_ties = plan_targets(base_src.module_tree).ties
    if set(plan.ties) != set(base_ties):
        raise BitDeltaError(
            f"base and fine-tune tie different weights (base: {sorted(base_ties) or 'none'}, "
            f"fine-tune: {sorted(plan.ties) or 'none'}); compress a fine-tune with the base's "
            "tie_word_embeddings setting."
        )

    check_structure(base_src, ft_src, vocab_parameter_names(ft_src.module_tree), plan.ties)

    planner = _planner(cfg)
    modules: dict[str, PackedModule] = {}
    samples: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
    bar = tqdm(plan.targets, desc="compressing", unit="module", disable=not progress)
    for t in bar:
        w_ft = _canonical(ft_src.get(t.param), t)
        w_base = _canonical(base_src.get(t.param), t)
        base_rows = _check_shapes(t, w_base, w_ft)
        mode = ScaleMode.ROW if t.vocab else scale
        delta = w_ft[:base_rows].float() - w_base.float()
        corrected = planner is not None and t.kind != EMBEDDING
        sign, scl = planner.binarize(delta, mode, bits) if corrected else binarize(delta, mode, bits)
        if planner is not None and t.kind == EMBEDDING:  # a row lookup, no product: counted, not corrected
            planner.count_signs(*delta.shape)
        elif planner is not None:
            planner.add(t.name, delta - reconstruct(sign, scl, delta.shape[1], mode))
        del delta
        extra = None
        if w_ft.shape[0] > base_rows:
            extra = w_ft[base_rows:].to(dense_dtype or w_ft.dtype).clone()
        modules[t.name] = PackedModule(t.kind, mode, sign, scl, w_ft.shape[1], t.vocab, extra)
        samples[t.name] = (tuple(w_base.shape), sample_weight(w_base).float())
        del w_ft, w_base
    lowrank_record = _add_lowrank(planner, modules) if planner is not None else None
    dense = _dense_extras(plan.other_params, base_src, ft_src, dense_dtype, progress)
    ft_params = _count_parameters(ft_src, plan)
    coverage = audit(base_src, ft_src, {t.param for t in plan.targets}, set(dense), plan.ties, exclude)

    info = {
        "bitdelta_version": __version__,
        "base_model_name_or_path": base_src.name,
        "base_model_revision": base_src.revision,
        "finetuned_model_name_or_path": ft_src.name,
        "finetuned_model_revision": ft_src.revision,
        "finetuned_num_parameters": ft_params,
        "model_type": getattr(ft_src.config, "model_type", None),
        "architectures": getattr(ft_src.config, "architectures", None),
        "vocab_size": _vocab_size(ft_src.config),
        "tied_parameters": dict(plan.ties),
        "compression": {
            "scale": scale.value,
            "bits": bits,
            "target": target,
            "exclude": exclude,
            "dense_embeddings": dense_embeddings,
            "dense_dtype": str(dense_dtype).replace("torch.", "") if dense_dtype else None,
            # tensors are keyed by the model's own parameter names; fused experts as "<param>[<e>]"
            "naming": NAMING,
            "transformers_version": _transformers_version(),
            "coverage": {"tensors": coverage["tensors"], "parameters": coverage["parameters"]},
            "excluded_tensors": coverage["excluded_tensors"],
            # None for a plain base; else the scheme, format and number of quantized tensors
            "base_quantization": dict(base_src.quantization) if base_src.quantization else None,
        },
        "distillation": None,
    }
    if lowrank_record is not None:  # its setting, budget and bytes (the ranks are per module, in "modules")
        info["compression"]["lowrank"] = lowrank_record
    return Delta(modules, dense, Fingerprint.from_samples(samples), info, ft_src.tokenizer_files())


def _planner(cfg: CompressConfig) -> LowRankPlanner | None:
    if not cfg.lowrank:
        return None
    return LowRankPlanner(budget=cfg.lowrank_budget, rank=cfg.lowrank_rank)


def _add_lowrank(planner: LowRankPlanner, modules: dict[str, PackedModule]) -> dict:
    """Puts each module's factors into its PackedModule; returns the compression record's entry."""
    factors = planner.factors()
    for name, (b, a) in factors.items():
        modules[name] = modules[name].copy(lowrank_b=b, lowrank_a=a)
    spent = sum(modules[n].lowrank_nbytes() for n in factors)
    return {"budget": planner.budget, "rank": planner.rank, "budget_bytes": planner.budget_bytes(),
            "sign_plane_bytes": planner.sign_bytes, "bytes": spent, "modules": len(factors),
            "dtype": str(STORAGE_DTYPE).replace("torch.", "")}


def _quantize_base(base_src: WeightSource, scheme: str) -> None:
    from .quant import check_scheme

    check_scheme(scheme)
    found = base_src.quantization
    if found is None:
        base_src.quantize_on_the_fly(scheme)
    elif found["scheme"] != scheme:
        raise BitDeltaError(
            f"base {base_src.name!r} is already quantized to {found['scheme']} ({found['format']}), but "
            f"--base-quant {scheme} was asked for; drop --base-quant to use it as it is, or pass the unquantized base.")


def _canonical(weight: torch.Tensor, t) -> torch.Tensor:
    """One matrix out × in: an expert's slice of a fused parameter; Conv1D-like storage
    (GPT-2 Conv1D, experts computing x @ W) is in × out."""
    if t.index is not None:
        weight = weight[t.index]
    return weight.t() if t.kind == CONV1D else weight


def _transformers_version() -> str | None:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover
        return None


def _check_shapes(t, w_base: torch.Tensor, w_ft: torch.Tensor) -> int:
    if w_base.dim() != 2 or w_ft.dim() != 2:
        raise ShapeMismatchError(f"{t.param}: expected 2-D weights, got {tuple(w_base.shape)} and {tuple(w_ft.shape)}")
    same_in = w_base.shape[1] == w_ft.shape[1]
    if t.vocab and same_in and w_ft.shape[0] >= w_base.shape[0]:
        return int(w_base.shape[0])  # extra fine-tune rows (added tokens) are stored dense
    if tuple(w_base.shape) != tuple(w_ft.shape):
        raise ShapeMismatchError(
            f"{t.param}: base is {tuple(w_base.shape)} but fine-tune is {tuple(w_ft.shape)}; "
            "the fine-tune must come from this base (only vocabulary matrices may grow)."
        )
    return int(w_base.shape[0])


def _check_compatible(base_src: WeightSource, ft_src: WeightSource) -> None:
    b = getattr(base_src.config, "model_type", None)
    f = getattr(ft_src.config, "model_type", None)
    if b != f:
        raise BitDeltaError(
            f"base {base_src.name!r} is a {b!r} model but fine-tune {ft_src.name!r} is {f!r}; "
            "a delta needs a fine-tune of the same base architecture."
        )


def _dense_extras(names, base_src, ft_src, dtype, progress) -> dict[str, torch.Tensor]:
    dense = {}
    for name in tqdm(names, desc="dense extras", unit="tensor", disable=not progress or len(names) < 200):
        if not ft_src.has(name):
            continue  # non-persistent or derived parameter absent from the checkpoint
        value = ft_src.get(name)
        if base_src.has(name):
            ref = base_src.get(name)
            if ref.shape == value.shape and ref.dtype == value.dtype and torch.equal(ref, value):
                continue  # unchanged by fine-tuning: the base already has it
        dense[name] = value.to(dtype or value.dtype).clone()
    return dense


def _count_parameters(src: WeightSource, plan) -> int:
    total = 0
    for name in dict.fromkeys([t.param for t in plan.targets] + plan.other_params):
        if src.has(name):
            n = 1
            for s in src.shape(name):
                n *= s
            total += n
    return total


def _vocab_size(config) -> int | None:
    v = getattr(config, "vocab_size", None)
    if v is None and hasattr(config, "get_text_config"):
        v = getattr(config.get_text_config(), "vocab_size", None)
    return v
