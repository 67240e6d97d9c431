"""Loading and saving plain Hugging Face models and tokenizers for the CLI and examples.

    model = load_model("models/tiny/base", dtype="float32")
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


def load_model(name_or_path, dtype=None, device: str | None = None, revision: str | None = None):
    """A causal LM from a local directory or hub id, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    model_dir, _ = resolve_model_dir(name_or_path, revision)
    torch_dtype = parse_dtype(dtype) or "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise FormatError(f"could not load a model from {name_or_path}: {e}") from None
    model.config._name_or_path = str(name_or_path)
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
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if do_sample:
        kwargs["temperature"] = temperature
    out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
