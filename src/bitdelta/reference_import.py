"""Import of the original BitDelta research code's ``diff.pt`` into a bitdelta artifact.

That file is a ``torch.save``d dict: for each compressed linear ``<m>``, ``<m>.mask`` is an int32
tensor ``[in/32, out]`` whose bit j (LSB first) of word w in column o is the sign of input row
``32w + j`` (bit 1 means +1, set where Δ ≥ 0), and ``<m>.coeff`` is its fp32 scalar scale; every
other entry (embeddings, lm_head, norms, which the reference trained) is a dense parameter.
We read it with ``torch.load(weights_only=True)`` (no arbitrary unpickling), repack the bits to
our uint8 layout, and fingerprint the base so the result is checked like any other delta.
Merging the import gives exactly what the reference's own ``load_diff`` produces.

    delta = import_reference("meta-llama/Llama-2-7b-hf", "diff.pt")
    delta.save_pretrained("vicuna.bitdelta")
"""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from ._version import __version__
from .delta import Delta, PackedModule
from .errors import FormatError, ShapeMismatchError
from .fingerprint import Fingerprint, sample_weight
from .pack import pack_signs
from .sources import WeightSource
from .targets import LINEAR, plan_targets


def unpack_reference_mask(mask: torch.Tensor) -> torch.Tensor:
    """int32 ``[in/32, out]`` (LSB first along in) -> bool ``[out, in]`` (True = +1)."""
    if mask.dtype != torch.int32 or mask.dim() != 2:
        raise FormatError(f"reference masks must be int32 [in/32, out], got {mask.dtype} {tuple(mask.shape)}")
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (mask.unsqueeze(1) >> shifts[None, :, None]) & 1  # [in/32, 32, out]
    return bits.reshape(-1, mask.shape[1]).t().bool()


def load_reference_diff(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except Exception as e:  # unpickling errors come in many types
        raise FormatError(
            f"{path} could not be read as a reference BitDelta diff.pt with weights_only=True "
            f"({type(e).__name__}: {e}); it may be corrupt or contain arbitrary Python objects"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise FormatError(f"{path} is not a reference diff (expected a dict of tensors)")
    return data


def import_reference(base, diff_path, finetuned_name: str | None = None, progress: bool = True) -> Delta:
    """Converts a reference ``diff.pt`` made against ``base`` into a :class:`Delta`."""
    data = load_reference_diff(diff_path)
    base_src = WeightSource.load(base)
    masked = sorted(k[: -len(".mask")] for k in data if k.endswith(".mask"))
    if not masked:
        raise FormatError(f"{diff_path} holds no '<module>.mask' entries; is it a BitDelta diff?")
    modules, samples = {}, {}
    for name in tqdm(masked, desc="importing", unit="module", disable=not progress):
        coeff_key = f"{name}.coeff"
        if coeff_key not in data:
            raise FormatError(f"{diff_path}: {name}.mask has no matching {coeff_key}")
        positive = unpack_reference_mask(data[f"{name}.mask"])
        w_base = base_src.get(f"{name}.weight")
        if tuple(w_base.shape) != tuple(positive.shape):
            raise ShapeMismatchError(
                f"{diff_path}: {name} is {tuple(positive.shape)} (out, in) in the diff but "
                f"{tuple(w_base.shape)} in base {base_src.name!r}; wrong base model?"
            )
        scale = data[coeff_key].detach().float().reshape(1)
        modules[name] = PackedModule(LINEAR, "scalar", pack_signs(positive)[None], scale, positive.shape[1])
        samples[name] = (tuple(w_base.shape), sample_weight(w_base).float())
    dense = {k: v.clone() for k, v in data.items() if not k.endswith((".mask", ".coeff"))}
    for k in dense:
        if not base_src.has(k):
            raise FormatError(f"{diff_path}: dense entry {k!r} is not a parameter of base {base_src.name!r}")
    plan = plan_targets(base_src.module_tree)
    num_params = 0
    for pname in [t.param for t in plan.targets] + plan.other_params:
        if base_src.has(pname):
            shape = dense[pname].shape if pname in dense else base_src.shape(pname)
            num_params += int(torch.Size(shape).numel())
    head_rows = [v.shape[0] for k, v in dense.items() if k.endswith(("lm_head.weight", "embed_tokens.weight"))]
    vocab = max(head_rows) if head_rows else getattr(base_src.config, "vocab_size", None)
    info = {
        "bitdelta_version": __version__,
        "base_model_name_or_path": base_src.name,
        "base_model_revision": base_src.revision,
        "finetuned_model_name_or_path": finetuned_name or str(diff_path),
        "finetuned_num_parameters": num_params,
        "model_type": getattr(base_src.config, "model_type", None),
        "architectures": getattr(base_src.config, "architectures", None),
        "vocab_size": vocab,
        "tied_parameters": dict(plan.ties),
        "compression": {"scale": "scalar", "bits": 1, "dense_embeddings": True},
        "imported_from": {"format": "bitdelta-reference-diff.pt", "path": str(diff_path)},
        "distillation": None,
    }
    return Delta(modules, dense, Fingerprint.from_samples(samples), info, {})
