"""The on-disk artifact: ``delta_config.json`` + ``delta.safetensors`` (+ shards) + tokenizer files.

Layout (format_version 1, or 2 when a module has a low-rank correction)::

    ft.bitdelta/
      delta_config.json           format, versions, model ids, fingerprint hash, per-module modes
                                  (and ``lowrank_rank`` r of modules with a low-rank correction)
      delta.safetensors           <module>.sign (uint8 [bits,out,ceil(in/8)]), <module>.scale (f32),
                                  <module>.extra_rows, <module>.lowrank_b ([out, r]) and
                                  <module>.lowrank_a ([r, in]) (float16; Δ̂ adds B·A), dense <param>
                                  values, base fingerprint samples

A delta with low-rank factors is written as format_version 2, which readers of version 1 refuse
("upgrade") rather than apply without its correction; every other delta stays version 1
(``artifact_info.PLAIN_FORMAT_VERSION``).
      tokenizer files, generation_config.json   copied from the fine-tune
      README.md                   model card

Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves
a half-written artifact under the final name. Loading validates everything it reads and raises
:class:`FormatError` with the file name on any inconsistency; it never unpickles anything.

Artifacts are untrusted input (a server may load any artifact from an allow-listed directory), so
loading also guarantees:

- it never reads outside the artifact: every entry of its directory, the weights file, its shards
  and the files listed in ``files`` must resolve, after symlinks, inside the artifact's directory
  (and inside ``root=`` when given, e.g. a server's ``--delta-dir``); listed names must be plain
  file names. A Hugging Face cache snapshot (``models--org--name/snapshots/<rev>``) counts as its
  repository folder, since the cache links snapshot files to ``../../blobs``.
- it never reads a tensor whose size does not follow from the config: every tensor's dtype and
  shape are checked against ``modules`` in the header before a byte of data is read, tensors the
  config does not name are never read, and ``precheck`` (e.g. a server comparing shapes with its
  base) sees the whole layout before anything is read.
- it never returns non-finite values; bounds relative to the base live in :mod:`bitdelta.validate`
  (checked by apply, merge and serving registration, which have the base).

    save_delta(delta, "ft.bitdelta"); delta = load_delta("ft.bitdelta")
    delta = load_delta("deltas/zephyr", root="deltas")    # refuse anything outside deltas/
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ._version import __version__
from .artifact_info import FORMAT_NAME, LAYOUT_KEYS, LOWRANK_FORMAT_VERSION, PLAIN_FORMAT_VERSION, DeltaInfo, migrate
from .atomic import atomic_directory
from .bulk_read import read_tensors
from .delta import Delta, PackedModule
from .errors import FormatError
from .fingerprint import SAMPLES_PER_MODULE, Fingerprint
from .model_card import model_card
from .pack import packed_width
from .safetensors_io import SafetensorsCheckpoint, confined, plain_name, write_sharded
from .scale_modes import MATRIX_MODES, scale_shape
from .sources import resolve_model_dir
from .targets import CONV1D, EMBEDDING, LINEAR

logger = logging.getLogger(__name__)

CONFIG_NAME = "delta_config.json"
WEIGHTS_STEM = "delta"
FINGERPRINT_KEY = "__bitdelta__.base_fingerprint_samples"
PACKING = {"dtype": "uint8", "axis": "in_features", "bit_order": "little", "one_means": "+1",
           "zero_means": "-1", "sign_of_zero": "-1"}
_MODULE_KEYS = {"kind", "scale", "bits", "shape", "extra_rows", "vocab", "lowrank_rank"}
_REQUIRED = ("format", "format_version", "modules", "base_fingerprint")
_KNOWN = set(LAYOUT_KEYS) | set(DeltaInfo.schema_keys())
MAX_BITS = 8  # compress accepts 1..8 sign planes
# Largest dimension a config may declare (2**31 rows of a matrix is beyond any model); keeps shape
# arithmetic small before anything is compared with the file.
_MAX_DIM = 2**31 - 1
_MAX_CONFIG_BYTES = 64_000_000
# Tokenizer and generation files are at most tens of MB (a 256k-token tokenizer.json is ~35 MB); a
# listed file beyond this is refused rather than read into memory.
MAX_LISTED_FILE_BYTES = 512_000_000
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STR_OR_NONE = ("base_model_name_or_path", "base_model_revision", "finetuned_model_name_or_path",
                "finetuned_model_revision", "model_type", "bitdelta_version")
_DICT_OR_NONE = ("compression", "distillation", "imported_from", "fidelity")


@dataclass(frozen=True)
class ModuleLayout:
    """What the config says one compressed module holds (checked against the weights' header)."""

    kind: str
    mode: str
    bits: int
    out_features: int
    in_features: int
    extra_rows: int = 0
    vocab: bool = False
    lowrank_rank: int = 0  # rank of the low-rank correction B·A (0: none)


@dataclass(frozen=True)
class Layout:
    """Every tensor a delta holds, by shape, known before any tensor data is read: what a server
    compares with its base to refuse a delta without reading it (``load_delta(precheck=...)``)."""

    modules: dict
    dense: dict  # parameter name -> shape
    ties: dict

    @classmethod
    def of(cls, delta: Delta) -> "Layout":
        modules = {n: ModuleLayout(m.kind, m.mode, m.bits, m.out_features, m.in_features,
                                   0 if m.extra_rows is None else int(m.extra_rows.shape[0]), m.vocab,
                                   m.lowrank_rank)
                   for n, m in delta.modules.items()}
        return cls(modules, {n: tuple(v.shape) for n, v in delta.dense.items()}, dict(delta.ties))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``, checked in slices so a large tensor needs no tensor-sized temporary."""
    flat = t.reshape(-1)
    step = 1 << 24
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


def check_file_name(name: str) -> str:
    """A name from an artifact's ``files`` must be a plain file name (no directories, no ``..``)."""
    return plain_name(name, f"{CONFIG_NAME} 'files' entry")


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
        if m.lowrank_rank:
            entry["lowrank_rank"] = m.lowrank_rank
        modules[name] = entry
    fp = delta.fingerprint
    cfg = delta.info.to_dict()
    cfg.update({
        "format": FORMAT_NAME,
        "format_version": format_version_of(delta),
        "bitdelta_version": __version__,
        "packing": PACKING,
        "base_fingerprint": {"sha256": fp.sha256, "num_modules": len(fp.names),
                             "samples_per_module": SAMPLES_PER_MODULE},
        "modules": modules,
        "dense_parameters": sorted(delta.dense),
        "files": sorted(delta.files),
    })
    return cfg


def format_version_of(delta: Delta) -> int:
    """The lowest format_version whose readers apply ``delta`` correctly (see the module docstring)."""
    if any(m.lowrank_rank for m in delta.modules.values()):
        return LOWRANK_FORMAT_VERSION
    return PLAIN_FORMAT_VERSION


def delta_tensors(delta: Delta) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, m in delta.modules.items():
        tensors[f"{name}.sign"] = m.sign.cpu()
        tensors[f"{name}.scale"] = m.scale.detach().float().cpu()
        if m.extra_rows is not None:
            tensors[f"{name}.extra_rows"] = m.extra_rows.cpu()
        if m.lowrank_rank:
            tensors[f"{name}.lowrank_b"] = m.lowrank_b.detach().cpu().contiguous()
            tensors[f"{name}.lowrank_a"] = m.lowrank_a.detach().cpu().contiguous()
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
        metadata = {"format": "pt", "bitdelta_format_version": str(cfg["format_version"])}
        written = write_sharded(delta_tensors(delta), tmp, WEIGHTS_STEM, parse_size(max_shard_size), metadata)
        for fname, data in delta.files.items():
            if fname in (CONFIG_NAME, "README.md") or fname in written:
                continue
            (tmp / check_file_name(fname)).write_bytes(data)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(delta, cfg, artifact_bytes=_dir_bytes(tmp)))
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def artifact_home(local: Path) -> Path:
    """The directory an artifact's files must stay in: the artifact directory itself, or, for a
    Hugging Face cache snapshot (``<repo>/snapshots/<rev>``), its repository folder, whose
    ``blobs/`` the snapshot's files link to."""
    local = Path(local)
    parent = local.parent
    if (parent.name == "snapshots" and parent.parent.name.startswith("models--")
            and (parent.parent / "blobs").is_dir()):
        return parent.parent
    return local


def _roots(local: Path, root) -> tuple:
    return (artifact_home(local),) if root is None else (artifact_home(local), Path(root))


def check_confined(local: Path, root=None) -> None:
    """Every entry of the artifact directory (files, links, the weights) must resolve inside the
    artifact (and ``root``): a link out of it is refused whatever its name, since tokenizer loading
    reads the directory too. Raises :class:`FormatError` naming the first offender."""
    local = Path(local)
    roots = _roots(local, root)
    for r in roots:
        confined(local, r)
    try:
        entries = sorted(local.iterdir())
    except OSError as e:
        raise FormatError(f"{local} cannot be listed ({e})") from None
    for entry in entries:
        for r in roots:
            confined(entry, r)


def _fail(cfg_path, field: str, why: str):
    raise FormatError(f"{cfg_path}: field {field!r} {why}; the artifact is corrupt or was not written by bitdelta")


def _int_in(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _check_module_entry(cfg_path, name, entry) -> None:
    field = f"modules.{name}"
    if not isinstance(name, str) or not name or len(name) > 1000:
        _fail(cfg_path, "modules", f"has an invalid module name {str(name)[:80]!r}")
    if not isinstance(entry, dict):
        _fail(cfg_path, field, f"must be an object, got {type(entry).__name__}")
    if entry.get("kind") not in (LINEAR, CONV1D, EMBEDDING):
        _fail(cfg_path, f"{field}.kind", f"must be one of {[LINEAR, CONV1D, EMBEDDING]}, "
                                         f"got {str(entry.get('kind'))[:80]!r}")
    if entry.get("scale") not in MATRIX_MODES:
        _fail(cfg_path, f"{field}.scale", f"must be one of {[m.value for m in MATRIX_MODES]}, "
                                          f"got {str(entry.get('scale'))[:80]!r}")
    if not _int_in(entry.get("bits"), 1, MAX_BITS):
        _fail(cfg_path, f"{field}.bits", f"must be an integer from 1 to {MAX_BITS}, "
                                         f"got {str(entry.get('bits'))[:80]!r}")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_int_in(d, 1, _MAX_DIM) for d in shape)):
        _fail(cfg_path, f"{field}.shape", f"must be [out, in] positive integers, got {str(shape)[:80]}")
    if not _int_in(entry.get("extra_rows", 0), 0, _MAX_DIM):
        _fail(cfg_path, f"{field}.extra_rows",
              f"must be a non-negative integer, got {str(entry.get('extra_rows'))[:80]!r}")
    if not isinstance(entry.get("vocab", False), bool):
        _fail(cfg_path, f"{field}.vocab", "must be true or false")
    rank = entry.get("lowrank_rank", 0)
    if not _int_in(rank, 0, min(shape)):
        _fail(cfg_path, f"{field}.lowrank_rank", f"must be an integer from 0 to {min(shape)} (the matrix's smaller "
                                                 f"side), got {str(rank)[:80]!r}")
    if rank and entry["kind"] == EMBEDDING:
        _fail(cfg_path, f"{field}.lowrank_rank", "must be 0 for an embedding (it takes no low-rank correction)")


def _check_fields(cfg_path, cfg: dict) -> None:
    """Types and ranges of every field bitdelta relies on (so no later step meets a list where it
    expects a dict, a string where it expects a number, or a path where it expects a name)."""
    modules = cfg["modules"]
    if not isinstance(modules, dict):
        _fail(cfg_path, "modules", f"must be an object of module entries, got {type(modules).__name__}")
    for name, entry in modules.items():
        _check_module_entry(cfg_path, name, entry)
    for field in ("dense_parameters", "files"):
        value = cfg.get(field, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            _fail(cfg_path, field, "must be a list of non-empty strings")
        if len(set(value)) != len(value):
            _fail(cfg_path, field, "lists a name twice")
    for fname in cfg.get("files", []):
        plain_name(fname, f"{cfg_path}: 'files' entry")
    fp = cfg["base_fingerprint"]
    if not isinstance(fp, dict):
        _fail(cfg_path, "base_fingerprint", f"must be an object, got {type(fp).__name__}")
    sha = fp.get("sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        _fail(cfg_path, "base_fingerprint.sha256", "must be a hex sha256")
    ties = cfg.get("tied_parameters", {}) or {}
    if not isinstance(ties, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items()):
        _fail(cfg_path, "tied_parameters", "must map parameter names to parameter names")
    for field in ("vocab_size", "finetuned_num_parameters"):
        v = cfg.get(field)
        if v is not None and not _int_in(v, 1 if field == "vocab_size" else 0, 2**62):
            _fail(cfg_path, field, f"must be a positive integer, got {str(v)[:80]!r}")
    for field in _STR_OR_NONE:
        if cfg.get(field) is not None and not isinstance(cfg[field], str):
            _fail(cfg_path, field, "must be a string")
    for field in _DICT_OR_NONE:
        if cfg.get(field) is not None and not isinstance(cfg[field], dict):
            _fail(cfg_path, field, "must be an object")
    arch = cfg.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        _fail(cfg_path, "architectures", "must be a list of strings")
    if cfg.get("packing") is not None and not isinstance(cfg["packing"], dict):
        _fail(cfg_path, "packing", "must be an object")


def read_config(path: Path, root=None) -> dict:
    """Reads and validates ``delta_config.json`` of the artifact at ``path`` (types and ranges of
    every field used); the file must resolve inside the artifact (and ``root``)."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FormatError(f"{path} is not a bitdelta artifact: {CONFIG_NAME} is missing")
    real = cfg_path
    for r in _roots(path, root):
        real = confined(real, r)
    try:
        if real.stat().st_size > _MAX_CONFIG_BYTES:
            raise FormatError(f"{cfg_path} is {real.stat().st_size} bytes, too large for a delta config")
        cfg = json.loads(real.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: JSON, or ints over 4300 digits
        raise FormatError(f"{cfg_path} is corrupt (not valid JSON: {type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path} is corrupt (not a JSON object)")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise FormatError(f"{cfg_path} lacks required keys {missing}; it is not a valid bitdelta artifact")
    if cfg["format"] != FORMAT_NAME:
        raise FormatError(f"{cfg_path} is format {str(cfg['format'])[:80]!r}, not {FORMAT_NAME!r}")
    version = cfg["format_version"]
    if type(version) is not int or version < 1:
        raise FormatError(f"{cfg_path} has an invalid format_version {str(version)[:80]!r}")
    cfg = migrate(cfg, where=str(path))  # an older format_version brought to this one; a newer one refused
    unknown = sorted(str(k)[:80] for k in set(cfg) - _KNOWN)
    if unknown:
        warnings.warn(f"{cfg_path}: ignoring unknown keys {unknown} (written by a newer bitdelta?)", stacklevel=3)
        for k in set(cfg) - _KNOWN:
            cfg.pop(k)
    _check_fields(cfg_path, cfg)
    return cfg


def load_delta(path, device="cpu", revision: str | None = None, *, root=None,
               precheck: Callable[[Layout], None] | None = None, pin_memory: bool = False,
               read_threads: int = 1) -> Delta:
    """Loads and validates an artifact from a directory or a hub id.

    Args:
        root: a directory the artifact and every file it reads must lie in (after symlinks), e.g.
            a server's allow-listed ``--delta-dir``; the artifact's own directory is always enforced.
        precheck: called with the artifact's :class:`Layout` after the config and the weights'
            headers are validated and before any tensor is read; raise in it to refuse the delta
            without reading it (a server compares shapes with its base).
        pin_memory: read the tensors straight into page-locked host memory (a server copies them to
            the GPU asynchronously from there; see :mod:`bitdelta.bulk_read`).
        read_threads: threads reading the tensors at once.

    Raises :class:`FormatError` for anything inconsistent, outside the artifact, or non-finite.
    """
    local = Path(path)
    if not local.is_dir():
        if root is not None:  # confined loading never reaches for the hub
            raise FormatError(f"{path} is not an artifact directory under {root}")
        local, _ = resolve_model_dir(path, revision)
    roots = _roots(local, root)
    check_confined(local, root)
    cfg = read_config(local, root)
    ckpt = SafetensorsCheckpoint.open(local, stem=WEIGHTS_STEM, root=roots)

    def header(key: str, dtypes: tuple, shape: tuple | None, what: str):
        """The header entry of ``key`` after checking its dtype and shape: nothing is read yet."""
        if key not in ckpt:
            raise FormatError(f"{local}: tensor {key!r} listed in {CONFIG_NAME} is missing from the weights")
        e = ckpt.entries[key]
        if e.dtype not in dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in dtypes)
            found = str(e.dtype).replace("torch.", "")
            raise FormatError(f"{local}: tensor {key!r} ({what}) is {found}, must be {names}")
        if shape is not None and tuple(e.shape) != tuple(shape):
            raise FormatError(f"{local}: tensor {key!r} ({what}) has shape {list(e.shape)}, but {CONFIG_NAME} "
                              f"implies {list(shape)}; the artifact is inconsistent")
        return e

    layouts: dict[str, ModuleLayout] = {}
    for name, entry in cfg["modules"].items():
        for k in set(entry) - _MODULE_KEYS:
            warnings.warn(f"{local}: module {name}: ignoring unknown key {str(k)[:80]!r}", stacklevel=2)
        mode, bits, (out_f, in_f) = entry["scale"], entry["bits"], entry["shape"]
        extra = entry.get("extra_rows", 0) or 0
        header(f"{name}.sign", (torch.uint8,), (bits, out_f, packed_width(in_f)), "sign planes")
        header(f"{name}.scale", FLOAT_DTYPES, scale_shape(mode, out_f, in_f, bits), "scales")
        if extra:
            header(f"{name}.extra_rows", FLOAT_DTYPES, (extra, in_f), "added-token rows")
        rank = entry.get("lowrank_rank", 0)
        if rank:
            header(f"{name}.lowrank_b", FLOAT_DTYPES, (out_f, rank), "low-rank factor B")
            header(f"{name}.lowrank_a", FLOAT_DTYPES, (rank, in_f), "low-rank factor A")
        layouts[name] = ModuleLayout(entry["kind"], mode, bits, out_f, in_f, extra, bool(entry.get("vocab", False)),
                                     rank)
    dense_shapes = {n: tuple(header(n, FLOAT_DTYPES, None, "dense parameter").shape)
                    for n in cfg.get("dense_parameters", [])}
    names = sorted(layouts)
    header(FINGERPRINT_KEY, FLOAT_DTYPES, (len(names), SAMPLES_PER_MODULE), "base fingerprint")
    if precheck is not None:
        precheck(Layout(layouts, dense_shapes, dict(cfg.get("tied_parameters") or {})))

    # Everything the config names, read at once (in file order, see bitdelta.bulk_read), then checked
    # as it is assembled; nothing else in the file is read.
    keys = [FINGERPRINT_KEY, *dense_shapes]
    for name, lay in layouts.items():
        keys += [f"{name}.sign", f"{name}.scale"]
        keys += [f"{name}.extra_rows"] if lay.extra_rows else []
        keys += [f"{name}.lowrank_b", f"{name}.lowrank_a"] if lay.lowrank_rank else []
    keys = sorted(set(keys), key=lambda k: (str(ckpt.entries[k].file), ckpt.entries[k].start))
    read = dict(zip(keys, read_tensors([ckpt.entries[k] for k in keys], threads=read_threads, pin=pin_memory)))
    modules: dict[str, PackedModule] = {}
    for name, lay in layouts.items():
        extra = read[f"{name}.extra_rows"] if lay.extra_rows else None
        b, a = ((read[f"{name}.lowrank_b"], read[f"{name}.lowrank_a"]) if lay.lowrank_rank
                else (None, None))
        m = PackedModule(lay.kind, lay.mode, read[f"{name}.sign"], read[f"{name}.scale"], lay.in_features,
                         lay.vocab, extra, b, a)
        m.validate(name)
        if extra is not None and not all_finite(extra):
            raise FormatError(f"{local}: tensor {name + '.extra_rows'!r} holds NaN or inf")
        modules[name] = m
    dense = {}
    for name in dense_shapes:
        value = read[name]
        if not all_finite(value):
            raise FormatError(f"{local}: dense parameter {name!r} holds NaN or inf")
        dense[name] = value
    samples = read[FINGERPRINT_KEY]
    fp = Fingerprint(names, [(modules[n].out_features, modules[n].in_features) for n in names], samples.float())
    recorded = cfg["base_fingerprint"].get("sha256")
    if recorded and recorded != fp.sha256:
        raise FormatError(f"{local}: base fingerprint does not match its recorded hash; the weights file is corrupt")
    files = {}
    for fname in cfg.get("files", []):
        f = local / fname
        if not f.exists():
            logger.warning("%s: listed file %s is missing; continuing without it", local, fname)
            continue
        real = f
        for r in roots:
            real = confined(real, r)
        if not real.is_file():
            raise FormatError(f"{local}: listed file {fname!r} is not a regular file")
        if real.stat().st_size > MAX_LISTED_FILE_BYTES:
            raise FormatError(f"{local}: listed file {fname!r} is {real.stat().st_size:,} bytes, more than a "
                              f"tokenizer or config file can be ({MAX_LISTED_FILE_BYTES:,}); remove it from 'files'")
        files[fname] = real.read_bytes()
    info = DeltaInfo.from_dict(cfg, unknown="drop")  # read_config already warned about and dropped unknown keys
    info.artifact_path = str(local)
    delta = Delta(modules, dense, fp, info, files)
    return delta.to(device) if str(device) != "cpu" else delta
