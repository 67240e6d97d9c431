"""The on-disk artifact: ``delta_config.json`` + ``delta.safetensors`` (+ shards) + tokenizer files.

Layout (format_version 1)::

    ft.bitdelta/
      delta_config.json           format, versions, model ids, fingerprint hash, per-module modes
      delta.safetensors           <module>.sign (uint8 [bits,out,ceil(in/8)]), <module>.scale (f32),
                                  <module>.extra_rows, dense <param> values, base fingerprint samples
      tokenizer files, generation_config.json   copied from the fine-tune
      README.md                   model card

Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves
a half-written artifact under the final name. Loading validates everything it reads and raises
:class:`FormatError` with the file name on any inconsistency; it never unpickles anything.

    save_delta(delta, "ft.bitdelta"); delta = load_delta("ft.bitdelta")
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_directory
from .delta import Delta, PackedModule
from .errors import FormatError
from .fingerprint import SAMPLES_PER_MODULE, Fingerprint
from .model_card import model_card
from .safetensors_io import SafetensorsCheckpoint, write_sharded
from .sources import resolve_model_dir

logger = logging.getLogger(__name__)

FORMAT_NAME = "bitdelta"
FORMAT_VERSION = 1
CONFIG_NAME = "delta_config.json"
WEIGHTS_STEM = "delta"
FINGERPRINT_KEY = "__bitdelta__.base_fingerprint_samples"
PACKING = {"dtype": "uint8", "axis": "in_features", "bit_order": "little", "one_means": "+1",
           "zero_means": "-1", "sign_of_zero": "-1"}
_MODULE_KEYS = {"kind", "scale", "bits", "shape", "extra_rows", "vocab"}
_REQUIRED = ("format", "format_version", "modules", "base_fingerprint")
_KNOWN = set(_REQUIRED) | {
    "bitdelta_version", "base_model_name_or_path", "base_model_revision", "finetuned_model_name_or_path",
    "finetuned_model_revision", "finetuned_num_parameters", "model_type", "architectures", "vocab_size",
    "tied_parameters", "compression", "distillation", "packing", "dense_parameters", "files",
    "imported_from", "fidelity",
}


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / int -> bytes (decimal units as Hugging Face uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def delta_to_config(delta: Delta) -> dict:
    modules = {}
    for name, m in sorted(delta.modules.items()):
        entry = {"kind": m.kind, "scale": m.mode, "bits": m.bits, "shape": [m.out_features, m.in_features]}
        if m.vocab:
            entry["vocab"] = True
        if m.extra_rows is not None:
            entry["extra_rows"] = int(m.extra_rows.shape[0])
        modules[name] = entry
    fp = delta.fingerprint
    cfg = {k: v for k, v in delta.info.items() if k in _KNOWN}
    cfg.update({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "bitdelta_version": __version__,
        "packing": PACKING,
        "base_fingerprint": {"sha256": fp.sha256, "num_modules": len(fp.names),
                             "samples_per_module": SAMPLES_PER_MODULE},
        "modules": modules,
        "dense_parameters": sorted(delta.dense),
        "files": sorted(delta.files),
    })
    return cfg


def delta_tensors(delta: Delta) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, m in delta.modules.items():
        tensors[f"{name}.sign"] = m.sign.cpu()
        tensors[f"{name}.scale"] = m.scale.detach().float().cpu()
        if m.extra_rows is not None:
            tensors[f"{name}.extra_rows"] = m.extra_rows.cpu()
    for name, value in delta.dense.items():
        if name in tensors:
            raise FormatError(f"dense parameter {name!r} collides with a packed tensor name")
        tensors[name] = value.detach().cpu()
    tensors[FINGERPRINT_KEY] = delta.fingerprint.samples.float().cpu()
    return tensors


def save_delta(delta: Delta, save_directory, max_shard_size: int | str = "5GB", overwrite: bool = True) -> Path:
    """Writes ``delta`` to ``save_directory`` atomically. Refuses to replace a directory that is
    not a bitdelta artifact, so a wrong path never destroys other data."""
    out = Path(save_directory)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
            raise FileExistsError(f"{out} exists and is not a bitdelta artifact; choose an empty or new path")
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    with atomic_directory(out) as tmp:
        cfg = delta_to_config(delta)
        metadata = {"format": "pt", "bitdelta_format_version": str(FORMAT_VERSION)}
        written = write_sharded(delta_tensors(delta), tmp, WEIGHTS_STEM, parse_size(max_shard_size), metadata)
        for fname, data in delta.files.items():
            if fname in (CONFIG_NAME, "README.md") or fname in written:
                continue
            (tmp / fname).write_bytes(data)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(delta, cfg, artifact_bytes=_dir_bytes(tmp)))
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FormatError(f"{path} is not a bitdelta artifact: {CONFIG_NAME} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{cfg_path} is corrupt (not valid JSON: {e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path} is corrupt (not a JSON object)")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise FormatError(f"{cfg_path} lacks required keys {missing}; it is not a valid bitdelta artifact")
    if cfg["format"] != FORMAT_NAME:
        raise FormatError(f"{cfg_path} is format {cfg['format']!r}, not {FORMAT_NAME!r}")
    version = cfg["format_version"]
    if not isinstance(version, int) or version < 1:
        raise FormatError(f"{cfg_path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{path} uses artifact format_version {version}, newer than this bitdelta "
            f"{__version__} understands (up to {FORMAT_VERSION}); upgrade: pip install -U bitdelta"
        )
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        warnings.warn(f"{cfg_path}: ignoring unknown keys {unknown} (written by a newer bitdelta?)", stacklevel=3)
        for k in unknown:
            cfg.pop(k)
    return cfg


def load_delta(path, device="cpu", revision: str | None = None) -> Delta:
    """Loads and validates an artifact from a directory or a hub id."""
    local = Path(path)
    if not local.is_dir():
        local, _ = resolve_model_dir(path, revision)
    cfg = read_config(local)
    ckpt = SafetensorsCheckpoint.open(local, stem=WEIGHTS_STEM)

    def need(key: str) -> torch.Tensor:
        if key not in ckpt:
            raise FormatError(f"{local}: tensor {key!r} listed in {CONFIG_NAME} is missing from the weights")
        return ckpt.get(key)

    modules: dict[str, PackedModule] = {}
    for name, entry in cfg["modules"].items():
        try:
            kind, mode, bits = entry["kind"], entry["scale"], int(entry["bits"])
            out_f, in_f = (int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{local}/{CONFIG_NAME}: module {name!r} entry is malformed: {entry}") from None
        for k in set(entry) - _MODULE_KEYS:
            warnings.warn(f"{local}: module {name}: ignoring unknown key {k!r}", stacklevel=2)
        extra = need(f"{name}.extra_rows") if entry.get("extra_rows") else None
        try:
            m = PackedModule(kind, mode, need(f"{name}.sign"), need(f"{name}.scale"), in_f,
                             bool(entry.get("vocab", False)), extra)
        except ValueError as e:
            raise FormatError(f"{local}: module {name}: {e}") from None
        m.validate(name)
        if m.bits != bits or m.out_features != out_f:
            raise FormatError(
                f"{local}: module {name}: weights hold {m.bits} planes of {m.out_features} rows but "
                f"{CONFIG_NAME} says {bits} x {out_f}; the artifact is inconsistent"
            )
        modules[name] = m
    dense = {name: need(name) for name in cfg.get("dense_parameters", [])}
    samples = need(FINGERPRINT_KEY)
    names = sorted(modules)
    if samples.shape != (len(names), SAMPLES_PER_MODULE):
        raise FormatError(f"{local}: base fingerprint has shape {tuple(samples.shape)}, expected {(len(names), SAMPLES_PER_MODULE)}")
    fp = Fingerprint(names, [(modules[n].out_features, modules[n].in_features) for n in names], samples.float())
    recorded = cfg["base_fingerprint"].get("sha256")
    if recorded and recorded != fp.sha256:
        raise FormatError(f"{local}: base fingerprint does not match its recorded hash; the weights file is corrupt")
    files = {}
    for fname in cfg.get("files", []):
        f = local / fname
        if f.is_file():
            files[fname] = f.read_bytes()
        else:
            logger.warning("%s: listed file %s is missing; continuing without it", local, fname)
    info = {k: v for k, v in cfg.items() if k not in ("modules", "base_fingerprint", "packing", "dense_parameters", "files")}
    info["artifact_path"] = str(local)
    delta = Delta(modules, dense, fp, info, files)
    return delta.to(device) if str(device) != "cpu" else delta
