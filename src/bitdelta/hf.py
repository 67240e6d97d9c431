"""Loading and saving plain Hugging Face models and tokenizers for the CLI and examples.

A base directory quantized in a standard format (compressed-tensors 8-bit, transformers' FP8; see
``quant.py``) loads as a dense model holding its dequantized weights: bitdelta has no INT8/FP8 kernel
on these paths, so it dequantizes when loading, on any device. ``base_quant`` quantizes a plain
base's weights as ``compress --base-quant`` does.

    model = load_model("models/tiny/base", dtype="float32")
    model = load_model("base-fp8/")                       # quantized: dequantized weights
    tok = load_tokenizer("ft.bitdelta")          # an artifact carries its fine-tune's tokenizer
    save_model_atomic(model, tokenizer_files, "merged/")
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .atomic import atomic_directory
from .compress import parse_dtype
from .errors import BitDeltaError, FormatError
from .sources import resolve_model_dir

logger = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path, dtype=None, device: str | None = None, revision: str | None = None,
               base_quant: str | None = None):
    """A causal LM from a local directory or hub id, in eval mode on ``device``.

    A quantized base directory loads dequantized; ``base_quant`` (``int8``/``fp8``) quantizes a
    plain one's linear weights as it loads (each from its stored value, as compression does)."""
    from transformers import AutoModelForCausalLM

    from . import quant

    model_dir, _ = resolve_model_dir(name_or_path, revision)
    torch_dtype = parse_dtype(dtype) or "auto"
    if base_quant is not None:
        quant.check_scheme(base_quant)
    if quant.directory_quantization(model_dir) is not None:
        model = quant.load_dequantized_model(model_dir, dtype=parse_dtype(dtype), name=str(name_or_path))
        found = model._bitdelta_base_quantization["scheme"]
        if base_quant is not None and found != base_quant:
            raise BitDeltaError(f"{name_or_path} is already quantized to {found}, not {base_quant}; "
                                "drop --base-quant to use it as it is")
        return model.to(device or default_device()).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise FormatError(f"could not load a model from {name_or_path}: {e}") from None
    model.config._name_or_path = str(name_or_path)
    if base_quant is not None:
        quant.quantize_model_(model, model_dir, base_quant)
    return model.to(device or default_device()).eval()


def load_tokenizer(*candidates):
    """The first tokenizer found among ``candidates`` (artifact dirs, model dirs or hub ids)."""
    from transformers import AutoTokenizer

    errors = []
    for c in candidates:
        if c is None:
            continue
        try:
            path = Path(c) if Path(c).is_dir() else resolve_model_dir(c)[0]
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:  # tokenizer loading raises many types; try the next candidate
            errors.append(f"{c}: {type(e).__name__}: {e}")
    raise BitDeltaError("no tokenizer could be loaded from " + "; ".join(errors or ["(no candidates)"]))


def save_model_atomic(model, files: dict[str, bytes], out, overwrite: bool = False) -> Path:
    """``model.save_pretrained`` into a temporary sibling, add ``files``, then rename into place.

    ``files`` come from an artifact (untrusted): each name must be a plain file name, so nothing
    is written outside ``out``; anything else is refused before a byte is written."""
    from .safetensors_io import plain_name

    out = Path(out)
    for name in files:
        plain_name(name, "tokenizer/config file name")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose a new path or pass --overwrite")
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return out


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 40, do_sample: bool = False,
                  temperature: float = 0.8, seed: int = 0) -> str:
    """Greedy (or seeded sampled) continuation of ``prompt``; returns only the new text."""
    torch.manual_seed(seed)
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if do_sample:
        kwargs["temperature"] = temperature
    out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
