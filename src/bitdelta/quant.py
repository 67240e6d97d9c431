"""Quantized bases: 1-bit deltas on an INT8 or FP8 base model.

A delta compressed against a quantized base is ``Δ = W_ft − Q(W_base)``, so it also absorbs the
base's quantization error, and one quantized base serves many deltas at half (or a quarter) of the
base's bytes. This module holds everything bitdelta knows about such bases:

- the schemes: per-output-channel, symmetric, round-to-nearest **INT8** (``scale = max|row| / 127``)
  and **FP8** e4m3 (``scale = max|row| / 448``, ``torch.float8_e4m3fn``); :func:`quantize`,
  :func:`dequantize`, :func:`fake_quantize` (``dequantize(quantize(W))`` in ``W``'s dtype);
- which weights a quantized base quantizes (:func:`quantizable_parameters`): the ``nn.Linear``
  weights bitdelta compresses, not embeddings, the output head, norms, biases, MoE routers or
  fused expert tensors, as compressed-tensors/llm-compressor recipes do;
- reading a base that is already quantized in a standard format (:func:`quant_format`,
  :class:`DequantizedCheckpoint`): compressed-tensors checkpoints with 8-bit weights
  (``naive-quantized``, ``int-quantized``, ``float-quantized``; ``weight`` + ``weight_scale``
  [+ ``weight_zero_point``]) and transformers' own FP8 format (``quant_method: "fp8"``,
  ``FineGrainedFP8Config``: FP8 weights with block-wise ``weight_scale_inv``). Weights are
  dequantized as they are read, once, in a fixed order (float32 product, then rounded to the
  dtype the checkpoint keeps its scales in), so compression, the fingerprint and every loader see
  the same numbers;
- writing one (:func:`write_quantized_base`, ``bitdelta quantize-base``) in compressed-tensors'
  layout (``quant_method: "compressed-tensors"``, per-channel ``weight_scale`` [out, 1] in the
  model's dtype, weight-only);
- loading one as a dense ``nn.Module`` (:func:`load_dequantized_model`): there is no INT8/FP8
  kernel on the apply/merge/eval/distill paths, so the weights are dequantized when the model is
  loaded ("dequantize on the fly"), which works on any device, the CPU included.

    q, scale = quantize(w, "fp8")                  # float8_e4m3fn [out, in], scale [out, 1]
    w_hat = dequantize(q, scale)                   # in scale.dtype
    write_quantized_base("models/base", "fp8", "base-fp8/")
    model = load_dequantized_model("base-fp8/")    # dense, dequantized weights
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import BitDeltaError, FormatError

SCHEMES = ("int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}  # e4m3fn's largest finite value is 448
_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# compressed-tensors' name for the layout of each scheme's weights, and its weight "type"
CT_FORMATS = {"int8": "naive-quantized", "fp8": "float-quantized"}
_CT_READABLE = ("naive-quantized", "int-quantized", "float-quantized")

# Tensors quantized checkpoints store next to a weight (scales, zero points, activation and KV
# scales): none of them is a model parameter of the dequantized model.
QUANT_SUFFIXES = (
    "weight_scale", "weight_zero_point", "weight_global_scale", "weight_g_idx", "weight_shape",
    "weight_scale_inv", "activation_scale", "input_scale", "input_zero_point", "input_global_scale",
    "output_scale", "output_zero_point", "k_scale", "v_scale",
)
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise BitDeltaError(f"unknown base quantization {scheme!r}; use one of {', '.join(SCHEMES)}")
    return scheme


# ------------------------------------------------------------------------------ the arithmetic


def quantize(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric round-to-nearest: ``(q [out, in], scale [out, 1])``.

    ``q`` is int8 or float8_e4m3fn; ``scale`` is in ``weight``'s dtype (as compressed-tensors
    stores it) and ``q`` is computed against that stored scale, so ``dequantize(q, scale)`` is
    what anyone reading the checkpoint gets. A row of zeros gets scale 1."""
    check_scheme(scheme)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise BitDeltaError(f"quantize expects a 2-D floating-point weight, got {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise BitDeltaError("the base weight holds NaN or inf; it cannot be quantized (is the base corrupt?)")
    scale = (w.abs().amax(dim=1, keepdim=True) / _QMAX[scheme]).to(weight.dtype)
    # A zero row, or a scale too small for the dtype, would divide by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s = scale.float()
    qmax = _QMAX[scheme]
    # The clamp only matters for a row's largest value when the scale was rounded down into the
    # weight's dtype; it moves that value by less than the dtype's rounding.
    if scheme == "int8":
        q = torch.round(w / s).clamp_(-qmax, qmax).to(torch.int8)
    else:
        q = (w / s).clamp_(-qmax, qmax).to(torch.float8_e4m3fn)  # the cast rounds to nearest (even)
    return q, scale


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None = None) -> torch.Tensor:
    """``scale`` broadcast to ``shape``: per tensor (one value), per row ([out] or [out, 1]),
    per group along the input ([out, in/g]) or per block ([ceil(out/bm), ceil(in/bn)])."""
    rows, cols = shape
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1)
    if s.dim() == 1 and s.shape[0] == rows:
        return s.reshape(rows, 1)
    if s.dim() == 2:
        sr, sc = s.shape
        bm = block[0] if block else (rows // sr if sr and rows % sr == 0 else None)
        bn = block[1] if block else (cols // sc if sc and cols % sc == 0 else None)
        if bm and bn and math.ceil(rows / bm) == sr and math.ceil(cols / bn) == sc:
            return s.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    raise FormatError(f"a scale of shape {list(scale.shape)} does not fit a weight of shape {list(shape)}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None,
               zero_point: torch.Tensor | None = None, block: tuple[int, int] | None = None) -> torch.Tensor:
    """``(q − zero_point) · scale`` computed in float32, then rounded once to ``dtype`` (default:
    the scale's dtype when it is a 16/32-bit float, else float32)."""
    if dtype is None:
        dtype = scale.dtype if scale.is_floating_point() and scale.element_size() >= 2 else torch.float32
    x = q.float()
    if zero_point is not None:
        x = x - _expand(zero_point, tuple(q.shape), block)
    return (x * _expand(scale, tuple(q.shape), block)).to(dtype)


def fake_quantize(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in ``weight``'s dtype: the quantized base's weight."""
    q, scale = quantize(weight, scheme)
    return dequantize(q, scale, weight.dtype)


# ------------------------------------------------------------------------------ which weights


def _num_experts(config) -> int | None:
    for cfg in (config, config.get_text_config() if hasattr(config, "get_text_config") else None):
        for key in _EXPERT_COUNT_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def quantizable_parameters(module_tree: nn.Module) -> list[str]:
    """In-model names of the weights a quantized base quantizes: every ``nn.Linear`` weight
    bitdelta would compress except vocabulary matrices (output head, tied embeddings) and MoE
    routers (a Linear with one output per expert), which keep full precision as in the usual
    compressed-tensors recipes (``ignore: ["lm_head", "re:.*mlp.gate$"]``)."""
    from .targets import plan_targets

    experts = _num_experts(getattr(module_tree, "config", None))
    names = []
    for t in plan_targets(module_tree).targets:
        if t.vocab or t.index is not None:
            continue
        module = module_tree.get_submodule(t.name) if t.name else module_tree
        if not isinstance(module, nn.Linear) or module.weight.dim() != 2:
            continue
        if experts is not None and module.out_features == experts:
            continue
        names.append(t.param)
    return names


def quantized_keys(src) -> dict[str, str]:
    """Checkpoint key -> in-model name of each weight a quantized base quantizes, for a
    :class:`~bitdelta.sources.WeightSource`: the quantizable weights stored as they are (one
    checkpoint tensor each, not built by a weight conversion). Raises if there are none."""
    out = {}
    for name in quantizable_parameters(src.module_tree):
        if not src.has(name) or src.naming.converted(name):
            continue
        keys = src.naming.sources(name)
        if len(keys) == 1 and len(src.checkpoint_shape(keys[0])) == 2:
            out[keys[0]] = name
    if not out:
        raise BitDeltaError(
            f"{src.name} has no nn.Linear weight to quantize: a quantized base quantizes nn.Linear layers, as "
            "compressed-tensors does (GPT-2-style Conv1D layers and fused expert tensors stay unquantized)")
    return out


# ------------------------------------------------------------------------------ reading formats


@dataclass
class QuantFormat:
    """How a quantized checkpoint stores its weights (from its config's ``quantization_config``)."""

    method: str  # "compressed-tensors" or "fp8" (transformers' FineGrainedFP8)
    format: str  # compressed-tensors format, or "fp8-block"
    block: tuple[int, int] | None = None  # FP8 block size (None: derived from the scale's shape)
    config: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.method == "fp8":
            return f"transformers fp8 (weight_scale_inv, block {list(self.block) if self.block else 'per tensor'})"
        return f"compressed-tensors {self.format}"


def _config_dict(qc) -> dict:
    if qc is None:
        return {}
    if isinstance(qc, dict):
        return qc
    to_dict = getattr(qc, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(vars(qc))


def quant_format(config, where="the model") -> QuantFormat | None:
    """The quantization a model's config declares, or None for a plain model. Raises
    :class:`FormatError` for a quantization bitdelta cannot read, saying what it reads."""
    qc = _config_dict(getattr(config, "quantization_config", None))
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        fmt = qc.get("format") or "dense"
        groups = qc.get("config_groups") or {}
        bits = {((g or {}).get("weights") or {}).get("num_bits") for g in groups.values() if isinstance(g, dict)}
        formats = {fmt} | {g.get("format") for g in groups.values() if isinstance(g, dict) and g.get("format")}
        if not formats <= set(_CT_READABLE) | {"dense"} or not bits <= {8, None}:
            raise FormatError(
                f"{where} is quantized with compressed-tensors format {sorted(formats)} and "
                f"{sorted(b for b in bits if b)}-bit weights; bitdelta reads 8-bit compressed-tensors bases "
                f"({', '.join(_CT_READABLE)}). Use such a base, "
                "`bitdelta quantize-base` on the unquantized one, or the unquantized base itself.")
        return QuantFormat("compressed-tensors", fmt, None, qc)
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block is not None:
            two_positive_ints = (isinstance(block, (list, tuple)) and len(block) == 2
                                 and all(isinstance(b, int) and b > 0 for b in block))
            if not two_positive_ints:
                raise FormatError(f"{where}: quantization_config.weight_block_size must be two positive integers, "
                                  f"got {block!r}")
            block = (int(block[0]), int(block[1]))
        return QuantFormat("fp8", "fp8-block", block, qc)
    raise FormatError(
        f"{where} is quantized with quant_method {method or '?'!r}; bitdelta reads quantized bases in "
        "compressed-tensors (8-bit) or transformers' FP8 format only. Pass the unquantized base (with "
        "`compress --base-quant int8|fp8` to compress against its quantized weights).")


def strip_quantization(config):
    """A copy of ``config`` without ``quantization_config``: the dequantized model is a plain one."""
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def _is_quant_key(key: str) -> bool:
    return any(key == s or key.endswith("." + s) for s in QUANT_SUFFIXES)


@dataclass
class StoredQuantized:
    """One quantized weight as a checkpoint stores it: ``dequantize(q, scale, dtype, zero_point,
    block)`` is the weight every reader of the checkpoint sees."""

    q: torch.Tensor  # [out, in] int8 or float8_e4m3fn
    scale: torch.Tensor  # per tensor, per row, per group or per block (see _expand)
    zero_point: torch.Tensor | None
    block: tuple[int, int] | None  # transformers' FP8 block size, None: from the scale's shape
    dtype: torch.dtype  # what the weight dequantizes to
    scheme: str  # "int8" or "fp8"


class DequantizedCheckpoint:
    """A quantized safetensors checkpoint seen as the plain one it stands for: the scale, zero-point
    and activation-scale tensors are hidden and each quantized weight reads dequantized, in the
    dtype its scales are kept in (FP8-format checkpoints with float32 scales: the config's dtype).

    Offers what :class:`~bitdelta.sources.WeightSource` uses of a checkpoint (``entries``, ``shape``,
    ``get``, ``keys``, ``in``)."""

    def __init__(self, ckpt, fmt: QuantFormat, dtype: torch.dtype | None, where: str):
        self.inner = ckpt
        self.format = fmt
        self.where = where
        self.dtype = dtype
        self.quantized: dict[str, tuple[str, str | None]] = {}  # weight key -> (scale key, zero-point key)
        schemes = set()
        for key, entry in ckpt.entries.items():
            if _is_quant_key(key):
                continue
            prefix = key[: -len("weight")] if key.endswith("weight") else None
            scale_key = None
            if prefix is not None:
                name = "weight_scale_inv" if fmt.method == "fp8" else "weight_scale"
                scale_key = prefix + name if prefix + name in ckpt.entries else None
            if entry.dtype in (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2) and prefix is not None:
                if prefix + "weight_packed" in ckpt.entries or scale_key is None:
                    raise FormatError(f"{where}: quantized weight {key} ({entry.dtype}) has no "
                                      f"{'weight_scale_inv' if fmt.method == 'fp8' else 'weight_scale'} beside it")
            if scale_key is None:
                continue
            if len(entry.shape) != 2 or entry.dtype not in (torch.int8, torch.float8_e4m3fn):
                raise FormatError(f"{where}: {key} is {entry.dtype} {list(entry.shape)}; bitdelta reads 2-D int8 or "
                                  "float8_e4m3fn quantized weights only")
            zp = prefix + "weight_zero_point"
            self.quantized[key] = (scale_key, zp if zp in ckpt.entries else None)
            schemes.add("int8" if entry.dtype == torch.int8 else "fp8")
        packed = [k for k in ckpt.entries if k.endswith("weight_packed")]
        if packed:
            raise FormatError(f"{where}: {packed[0]} is a packed (sub-8-bit) weight; "
                              "bitdelta reads 8-bit quantized bases only")
        if not self.quantized:
            raise FormatError(f"{where} declares {fmt.describe()} quantization but stores no quantized weight "
                              "with its scale; is the checkpoint complete?")
        self.scheme = schemes.pop() if len(schemes) == 1 else "mixed"
        self.entries = {k: e for k, e in ckpt.entries.items() if not _is_quant_key(k)}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def get(self, key: str) -> torch.Tensor:
        if key not in self.quantized:
            return self.inner.get(key)
        stored = self.read_quantized(key)
        try:
            return dequantize(stored.q, stored.scale, stored.dtype, zero_point=stored.zero_point, block=stored.block)
        except FormatError as e:
            raise FormatError(f"{self.where}: {key}: {e}") from None

    def read_quantized(self, key: str) -> StoredQuantized:
        """The quantized weight ``key`` as stored (its 8-bit values, scale and zero point, read
        without dequantizing) and the dtype :meth:`get` dequantizes it to: what a server that
        multiplies by the quantized weights itself needs."""
        scale_key, zp_key = self.quantized[key]
        scale = self.inner.get(scale_key)
        if scale.dtype == torch.uint8:  # ue8m0 scales (transformers' fp8, scale_fmt "ue8m0"): 2^(b-127)
            scale = (scale.float() - 127.0).exp2()
        zp = self.inner.get(zp_key) if zp_key else None
        dtype = self.dtype
        if dtype is None:
            dtype = scale.dtype if scale.is_floating_point() and scale.element_size() >= 2 else torch.bfloat16
        q = self.inner.get(key)
        return StoredQuantized(q, scale, zp, self.format.block, dtype, "int8" if q.dtype == torch.int8 else "fp8")

    def describe(self) -> dict:
        return {"scheme": self.scheme, "format": self.format.describe(), "quantized_tensors": len(self.quantized)}


def dequantized_dtype(fmt: QuantFormat, config) -> torch.dtype | None:
    """The dtype quantized weights read as: compressed-tensors keeps scales in the model's dtype
    (None: use the scale's); transformers' FP8 keeps float32 scales, so the config's dtype."""
    if fmt.method != "fp8":
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


# ------------------------------------------------------------------------------ loading


def directory_quantization(model_dir) -> dict | None:
    """``quantization_config`` of a model directory's config.json, or None (cheap: no model built)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) and qc else None


def _causal_lm_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise FormatError(f"no causal LM class for model type {getattr(config, 'model_type', '?')!r}") from None


def load_dequantized_model(model_dir, dtype=None, name: str | None = None) -> nn.Module:
    """A quantized base directory as a dense model (CPU, eval mode) holding its dequantized weights,
    in ``dtype`` (default: the config's). Built by transformers from the dequantized tensors, so
    checkpoint naming, tied weights and buffers are handled as for any model; the config loses its
    ``quantization_config`` (a merged model saved from it is a plain one)."""
    from .sources import WeightSource

    src = WeightSource.load(model_dir)
    if src.quantization is None:
        raise FormatError(f"{model_dir} is not a quantized base")
    state = {key: src.checkpoint_get(key) for key in src.checkpoint_keys()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _causal_lm_class(src.config).from_pretrained(None, config=src.config, state_dict=state,
                                                              dtype=dtype or "auto")
    del state
    model.config._name_or_path = name or str(model_dir)
    object.__setattr__(model, "_bitdelta_base_quantization", dict(src.quantization))
    return model.eval()


@torch.no_grad()
def quantize_model_(model: nn.Module, model_dir, scheme: str) -> nn.Module:
    """Replaces, in place, each quantizable weight of ``model`` (loaded from the plain base
    ``model_dir``) by its quantized value, computed from the stored tensor exactly as
    ``compress --base-quant`` computes it, then cast to the model's dtype."""
    from .sources import WeightSource

    src = WeightSource.load(model_dir)
    src.quantize_on_the_fly(scheme)
    for name in quantized_keys(src).values():
        param = model.get_parameter(name)
        param.data.copy_(src.get(name).to(device=param.device, dtype=param.dtype))
    object.__setattr__(model, "_bitdelta_base_quantization", dict(src.quantization))
    return model


# ------------------------------------------------------------------------------ writing


def _ct_quantization_config(scheme: str, ignore: list[str]) -> dict:
    weights = {
        "num_bits": 8, "type": "int" if scheme == "int8" else "float", "symmetric": True, "strategy": "channel",
        "group_size": None, "block_structure": None, "dynamic": False, "actorder": None,
        "observer": "minmax", "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": CT_FORMATS[scheme],
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def write_quantized_base(base, scheme: str, out, overwrite: bool = False,
                         max_shard_bytes: int = 5_000_000_000, progress: bool = True) -> dict:
    """Writes ``base`` (a plain model directory or hub id) quantized with ``scheme`` to ``out``:
    safetensors in compressed-tensors' layout (quantized weight + ``weight_scale`` [out, 1]), the
    config with its ``quantization_config``, and the tokenizer/generation files. Tensors are
    quantized shard by shard, so memory holds one output shard. Returns a summary."""
    from tqdm.auto import tqdm

    from .atomic import atomic_directory
    from .safetensors_io import save_file
    from .sources import TOKENIZER_FILE_PATTERNS, WeightSource

    check_scheme(scheme)
    src = WeightSource.load(base)
    if src.quantization is not None:
        raise BitDeltaError(f"{base} is already quantized ({src.quantization['format']}); quantize the "
                            "unquantized base instead")
    keys = quantized_keys(src)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BitDeltaError(f"{out} already exists; pass --overwrite to replace it")

    def out_bytes(key: str) -> int:
        shape = src.checkpoint_shape(key)
        n = math.prod(shape)
        if key in keys:
            return n + shape[0] * 4
        return n * src._ckpt.entries[key].dtype.itemsize

    names = sorted(src.checkpoint_keys())
    shards: list[list[str]] = [[]]
    size = 0
    for key in names:
        b = out_bytes(key)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += b
    all_linear = [n for n, m in src.module_tree.named_modules() if isinstance(m, nn.Linear)]
    ignore = sorted(n for n in all_linear if f"{n}.weight" not in set(keys.values()))
    config = json.loads((src.model_dir / "config.json").read_text())
    config["quantization_config"] = _ct_quantization_config(scheme, ignore)
    in_bytes = sum(src._ckpt.entries[k].end - src._ckpt.entries[k].start for k in names)
    written_bytes = 0
    bar = tqdm(total=len(names), desc=f"quantizing to {scheme}", unit="tensor", disable=not progress)
    with atomic_directory(out) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for key in shard:
                value = src.checkpoint_get(key)
                if key in keys:
                    q, scale = quantize(value, scheme)
                    scale_key = key[: -len("weight")] + "weight_scale"
                    tensors[key], tensors[scale_key] = q, scale
                    weight_map[scale_key] = file
                else:
                    tensors[key] = value
                weight_map[key] = file
                bar.update(1)
            save_file(tensors, tmp / file, {"format": "pt"})
            written_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": written_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for pattern in TOKENIZER_FILE_PATTERNS:
            for f in src.model_dir.glob(pattern):
                if f.is_file():
                    (tmp / f.name).write_bytes(f.read_bytes())
    bar.close()
    return {"out": str(out), "scheme": scheme, "format": f"compressed-tensors {CT_FORMATS[scheme]}",
            "quantized_tensors": len(keys), "kept_tensors": len(names) - len(keys), "ignored_linear": ignore,
            "bytes_in": in_bytes, "bytes_out": written_bytes}


# ------------------------------------------------------------------------------ wrong-base advice


def mismatch_hint(delta_info: dict, model: nn.Module) -> str:
    """What to do when a delta's fingerprint does not match ``model`` and a quantized base is
    involved on either side ("" otherwise): the usual cause is the plain base given for a delta
    made against its quantized version, or the reverse."""
    made = (delta_info.get("compression") or {}).get("base_quantization")
    made = made if isinstance(made, dict) else None
    live = getattr(model, "_bitdelta_base_quantization", None)
    base = delta_info.get("base_model_name_or_path", "?")
    if made and not live:
        scheme = made.get("scheme", "?")
        if str(made.get("format", "")).startswith("quantized as read"):
            return (f" The delta was compressed against {base!r} quantized to {scheme}: write that base once with "
                    f"`bitdelta quantize-base {base} --scheme {scheme} --out DIR` and load DIR as the base.")
        return (f" The delta was compressed against a {scheme}-quantized base ({made.get('format', '?')}): "
                "load that base.")
    if live and not made:
        return (f" The model is a {live.get('scheme', '?')}-quantized base, but the delta was compressed against an "
                "unquantized base: load the unquantized base (or compress against the quantized one).")
    if live and made and live.get("scheme") != made.get("scheme"):
        return (f" The model is quantized to {live.get('scheme')} but the delta was compressed against a "
                f"{made.get('scheme')}-quantized base.")
    return ""
