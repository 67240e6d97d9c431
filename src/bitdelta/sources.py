"""Where model weights come from: a local directory, a Hugging Face hub id, or a live nn.Module.

A :class:`WeightSource` gives compression what it needs without ever holding a whole model:
the model's config, a weightless (meta-device) module tree to discover linear layers in, and
tensors read one at a time by their in-model parameter names (a checkpoint stored under other
names or layouts, such as per-expert MoE weights, is converted by transformers' own mapping,
see ``naming.py``), plus the stored tensors as they are for the coverage audit.

A base quantized in a standard format (compressed-tensors 8-bit, transformers' FP8) reads as the
plain model it stands for, its weights dequantized (``quant.DequantizedCheckpoint``); a plain base
can be quantized as it is read (``quantize_on_the_fly``, for ``compress --base-quant``). Either way
``quantization`` describes it, and every tensor read (compression, dense extras, the coverage audit)
sees the quantized base's values.

    src = WeightSource.load("HuggingFaceTB/SmolLM2-135M")      # or a local dir, or a model
    for name in src.parameter_names(): w = src.get(name)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import FormatError
from .safetensors_io import SafetensorsCheckpoint

# Files that describe a fine-tune's tokenizer and generation defaults; copied into artifacts.
TOKENIZER_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", *TOKENIZER_FILE_PATTERNS]


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[Path, str | None]:
    """Returns (local directory, resolved hub revision or None) for a path or a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path, None
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FormatError(f"{name} is not a model directory (expected a folder with config.json)")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(name, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise FormatError(
            f"{name} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Pass a local path, or check the id and your network."
        ) from None
    return local, local.name  # snapshot folders are named by commit sha


def load_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise FormatError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    return AutoConfig.from_pretrained(model_dir)


def meta_model(config) -> nn.Module:
    """Builds the model's module tree on the meta device: no memory, no initialisation."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config)


class WeightSource:
    """Named tensors of one model plus its module tree, read lazily where possible.

    Tensors are named as in the model (``naming.NAMING``): a checkpoint whose names or layout differ
    (per-expert MoE weights, legacy prefixes) is read through transformers' own weight conversion,
    one in-model tensor at a time. ``checkpoint_keys``/``checkpoint_get`` give the stored tensors
    as they are, for the structure check and the coverage audit.
    """

    def __init__(self, name: str, config, module_tree: nn.Module, model_dir: Path | None = None,
                 revision: str | None = None, checkpoint: SafetensorsCheckpoint | None = None,
                 live: nn.Module | None = None):
        from .naming import CheckpointNaming

        self.name = name
        self.config = config
        self.module_tree = module_tree
        self.model_dir = model_dir
        self.revision = revision
        self._ckpt = checkpoint
        self._live = dict(live.state_dict(keep_vars=False)) if live is not None else None
        if self._live is not None:
            self.naming = CheckpointNaming.identity(self._live)
        else:
            self.naming = CheckpointNaming.build(list(self._ckpt.entries), module_tree)
        self._last: tuple[str, torch.Tensor] | None = None  # a fused tensor read for several entries
        # {"scheme", "format", "quantized_tensors"} of a quantized base, else None
        self.quantization: dict | None = None
        self._fake_quant: dict[str, str] = {}  # checkpoint key -> scheme, quantized as it is read

    @classmethod
    def load(cls, model: "str | os.PathLike | nn.Module", revision: str | None = None) -> "WeightSource":
        if isinstance(model, nn.Module):
            config = getattr(model, "config", None)
            name = getattr(config, "_name_or_path", "") or type(model).__name__
            return cls(name, config, model, live=model)
        from .quant import DequantizedCheckpoint, dequantized_dtype, quant_format, strip_quantization

        model_dir, resolved = resolve_model_dir(model, revision)
        config = load_config(model_dir)
        ckpt = SafetensorsCheckpoint.open(model_dir)
        fmt = quant_format(config, str(model))
        if fmt is not None:  # a quantized base reads as the plain model it stands for
            ckpt = DequantizedCheckpoint(ckpt, fmt, dequantized_dtype(fmt, config), str(model))
            config = strip_quantization(config)
        src = cls(str(model), config, meta_model(config), model_dir, resolved or revision, ckpt)
        if fmt is not None:
            src.quantization = ckpt.describe()
        return src

    def quantize_on_the_fly(self, scheme: str) -> None:
        """From now on each weight a quantized base quantizes (``quant.quantized_keys``) reads as
        ``dequantize(quantize(W))`` with ``scheme``: the source stands for the quantized base."""
        from .errors import BitDeltaError
        from .quant import check_scheme, quantized_keys

        check_scheme(scheme)
        if self.quantization is not None:
            raise BitDeltaError(f"{self.name} is already quantized ({self.quantization['format']})")
        keys = quantized_keys(self)
        self._fake_quant = dict.fromkeys(keys, scheme)
        self._last = None
        self.quantization = {"scheme": scheme, "format": "quantized as read (per-channel, round to nearest)",
                             "quantized_tensors": len(keys)}

    def has(self, name: str) -> bool:
        """True if the model tensor ``name`` (in-model naming) can be read from this source."""
        return self.naming.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        if self.naming.converted(name):
            try:  # the model's own shape, without reading and converting the stored tensors
                return tuple(self.module_tree.get_parameter(name).shape)
            except AttributeError:
                return tuple(self.get(name).shape)
        return self.checkpoint_shape(self.naming.sources(name)[0])

    def get(self, name: str) -> torch.Tensor:
        """The model tensor ``name`` (in-model naming), converted from the checkpoint if needed."""
        self._require(name)
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        value = self.naming.materialize(name, self.checkpoint_get)
        # Fused experts: one read (and conversion) serves every expert's entry, which compression
        # asks for one after the other; holding one tensor back keeps memory at a few modules.
        self._last = (name, value)
        return value

    def _require(self, name: str) -> None:
        if not self.naming.has(name):
            where = self.model_dir or self.name
            raise FormatError(f"{where} has no tensor {name!r}; is it the same architecture?")

    # ------------------------------------------------------------------ stored tensors as they are

    def checkpoint_keys(self) -> list[str]:
        return self.naming.keys()

    def checkpoint_shape(self, key: str) -> tuple[int, ...]:
        if self._live is not None:
            return tuple(self._live[key].shape)
        return self._ckpt.shape(key)

    def checkpoint_get(self, key: str) -> torch.Tensor:
        if self._live is not None:
            value = self._live[key].detach().to("cpu")
        else:
            value = self._ckpt.get(key)
        if key in self._fake_quant:
            from .quant import fake_quantize

            value = fake_quantize(value, self._fake_quant[key])
        return value

    def tokenizer_files(self) -> dict[str, bytes]:
        """The fine-tune's tokenizer/generation files, by file name (empty for live models)."""
        if self.model_dir is None:
            return {}
        found: dict[str, bytes] = {}
        for pattern in TOKENIZER_FILE_PATTERNS:
            for f in self.model_dir.glob(pattern):
                if f.is_file():
                    found[f.name] = f.read_bytes()
        return found
