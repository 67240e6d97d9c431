"""Loading the served base on quantized weights, and refusing deltas made against another quantization.

``bitdelta serve --base-quant int8|fp8`` (or a base directory that is already quantized) serves the
base on 8-bit weights (:mod:`bitdelta.serving.quant_linear`):

* a plain base with ``--base-quant SCHEME``: each weight ``compress --base-quant`` quantizes
  (:func:`bitdelta.quant.quantized_keys`) is quantized as it is read, from the tensor as stored, by
  the same :func:`bitdelta.quant.quantize`: the served ``Q(W_base)`` is the artifact's, bit for bit;
* a quantized directory (compressed-tensors 8-bit as ``bitdelta quantize-base`` writes it, or
  transformers' FP8): its stored ``q`` and scales are served as they are, never re-quantized;
  ``--base-quant`` may repeat its scheme, and naming another one is an error;
* ``--base-quant none``: the dense base (a quantized directory is dequantized, as ``bitdelta merge``
  loads it).

Tensors are read one at a time from the checkpoint and moved to the device, so a large base is never
held dense; the rotary tables come from the family's own Hugging Face rotary module.

    if serves_quantized("base-fp8/", None):
        model = load_quantized_base("base-fp8/", None, dtype=None, device="cuda")
    refuse_other_quantization(delta_info, model, "zephyr")   # before registering a delta
"""

from __future__ import annotations

import logging

import torch

from ..errors import BitDeltaError, WrongBaseError
from ..quant import check_scheme, directory_quantization, quantized_keys
from .quant_linear import QuantizedWeight

logger = logging.getLogger(__name__)

BASE_QUANT_CHOICES = ("none", "int8", "fp8")


def serves_quantized(base, asked: str | None) -> bool:
    """Whether ``base`` is served on quantized weights: ``asked`` (``--base-quant``) int8/fp8, or
    nothing asked and the directory is quantized already."""
    if asked not in (None, *BASE_QUANT_CHOICES):
        raise BitDeltaError(f"--base-quant must be one of {', '.join(BASE_QUANT_CHOICES)} (got {asked!r})")
    if asked == "none":
        return False
    if asked is not None:
        return True
    from ..sources import resolve_model_dir

    return directory_quantization(resolve_model_dir(base)[0]) is not None


def _model_dtype(config, asked) -> torch.dtype:
    from ..compress import parse_dtype

    dtype = parse_dtype(asked)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _rotary_module(tree, config):
    """The family's rotary-embedding module, built for real (the module tree is on the meta device)."""
    rot = tree.model.rotary_emb
    with torch.device("cpu"):
        return type(rot)(config)


@torch.no_grad()
def load_quantized_base(base, asked: str | None, dtype=None, device=None):
    """The served model (:class:`~bitdelta.serving.models.DeltaModel`) of ``base`` on quantized weights.

    ``asked``: ``--base-quant`` (int8, fp8, or None for a directory that is already quantized);
    ``dtype``: the dtype of activations and unquantized tensors (default: the checkpoint's)."""
    from ..sources import WeightSource
    from .models import family_of
    from .models.common import DeltaModel, check_common, rotary_tables

    src = WeightSource.load(base)
    found = src.quantization
    if found is None:
        if asked in (None, "none"):
            raise BitDeltaError(f"{base} is not a quantized base; pass --base-quant int8 or fp8 to quantize it")
        scheme = check_scheme(asked)
        keys = quantized_keys(src)  # checkpoint key -> in-model name

        def stored(key):
            return QuantizedWeight.quantize(src.checkpoint_get(key), scheme)  # as compress quantizes it
    else:
        scheme = found["scheme"]
        if scheme not in ("int8", "fp8"):
            raise BitDeltaError(f"{base} mixes quantization schemes ({found['format']}); "
                                "serve it with --base-quant none")
        if asked not in (None, scheme):
            raise BitDeltaError(f"{base} is already quantized to {scheme} ({found['format']}), not {asked}: drop "
                                f"--base-quant to serve it as stored, or serve the unquantized base with "
                                f"--base-quant {asked}")
        ckpt = src._ckpt  # a quant.DequantizedCheckpoint: the stored q and scales, read as they are
        keys = {k: n for k, n in quantized_keys(src).items() if k in ckpt.quantized}

        def stored(key):
            return QuantizedWeight.from_stored(ckpt.read_quantized(key))

    cfg = src.config
    check_common(cfg)
    arch = family_of(cfg).arch(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _model_dtype(cfg, dtype)
    tree = src.module_tree
    emb, head = tree.get_input_embeddings().weight, tree.get_output_embeddings()
    tied = head is None or head.weight is emb
    quantized = {n.removesuffix(".weight"): k for k, n in keys.items()}
    tensors = {}
    for name in tree.state_dict():
        if name == "lm_head.weight" and tied:
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in quantized:
            tensors[name] = stored(quantized[module]).to(device)
        else:
            tensors[name] = src.get(name).to(device=device, dtype=dtype).contiguous()
    model = DeltaModel(cfg, arch, tensors, rotary_tables(_rotary_module(tree, cfg), arch), dtype, device)
    model.config._name_or_path = str(base)
    model._bitdelta_base_quantization = dict(found) if found else {
        "scheme": scheme, "format": "quantized as read (per-channel, round to nearest)", "quantized_tensors": len(keys)}
    return model


def describe(model) -> str:
    """The served base's quantization in a few words, for the start-up line."""
    from .quant_linear import ways_used

    q = model.base_quantization
    if not q:
        return "unquantized base"
    ways = ways_used(model)
    run = ", ".join(f"{n} {way}" for way, n in ways.items()) if ways else "dequantized at load"
    return f"{q.get('scheme')} base ({run})"


def refuse_other_quantization(delta_info: dict, model, delta_name: str) -> None:
    """Raises :class:`WrongBaseError`, naming both, unless the delta was compressed against the base
    quantization ``model`` serves (``compression.base_quantization`` of its ``delta_config.json``,
    as ``compress`` records it; None: an unquantized base)."""
    made = (delta_info.get("compression") or {}).get("base_quantization")
    made = made.get("scheme") if isinstance(made, dict) else None
    live = (model.base_quantization or {}).get("scheme")
    if made == live:
        return
    base = delta_info.get("base_model_name_or_path", "?")
    want = f"an {made}-quantized base" if made else "the unquantized base"
    how = (f"serve the unquantized base {base!r} with --base-quant {made} (or the directory `bitdelta quantize-base "
           f"--scheme {made}` writes from it)" if made
           else f"serve the unquantized base {base!r} with --base-quant none")
    raise WrongBaseError(
        f"delta {delta_name!r} was compressed against {want} ({made or 'no'} base quantization), but this server's "
        f"base is {'quantized to ' + live if live else 'unquantized'}: its weights are not the ones the delta "
        f"corrects. To serve it, {how}.")
