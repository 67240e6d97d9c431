"""Streaming safetensors reading and atomic, optionally sharded writing.

Reading uses plain positioned file reads rather than a memory map, so a tensor that has been
read and dropped leaves nothing resident: compression of two large checkpoints keeps only the
tensors in flight. Every read validates the header against the file size, so a truncated or
corrupt file is reported by name instead of failing deep inside torch.

Untrusted checkpoints (delta artifacts) are opened with ``root=``: every file read (the single
file, the index, each shard the index names) must then resolve, after symlinks, inside ``root``
(:func:`confined`), and shard names must be plain file names (:func:`plain_name`). Base models are
opened without a root, since the Hugging Face cache links snapshot files to blobs elsewhere.

    ckpt = SafetensorsCheckpoint.open("models/llama")        # a dir (single file or sharded index)
    ckpt = SafetensorsCheckpoint.open(art, stem="delta", root=art)   # refuse reads outside ``art``
    w = ckpt.get("model.layers.0.mlp.up_proj.weight")        # one tensor, read on demand
    write_sharded(tensors, out_dir, "delta", max_shard_bytes=5_000_000_000, metadata={...})
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FormatError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

_MAX_HEADER_BYTES = 100_000_000
_MAX_INDEX_BYTES = 100_000_000  # an index of a 1T-parameter model is a few MB
# Data offsets and dimensions beyond this are no real tensor (8 EiB); refusing them keeps every
# size computation exact and every seek valid.
_MAX_OFFSET = 2**63 - 1


def plain_name(name, what: str = "file name") -> str:
    """``name`` if it is a plain file name (no directory part, not ``.``/``..``, not absolute),
    else :class:`FormatError` naming it: names read from untrusted files must never point elsewhere."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or len(name) > 255):
        raise FormatError(f"{what} {name!r} is not a plain file name; an artifact may only name files in its own "
                          "directory")
    return name


def confined(path, root) -> Path:
    """``path`` resolved (symlinks followed) if it lies inside ``root`` (also resolved), else
    :class:`FormatError` naming both: what keeps an artifact from reading anything outside itself."""
    try:
        real = Path(path).resolve()
        base = Path(root).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, or a name the OS refuses
        raise FormatError(f"{path} cannot be resolved ({e}); remove the broken link") from None
    if real != base and not real.is_relative_to(base):
        raise FormatError(f"{path} resolves to {real}, outside {base}; an artifact may only read its own files")
    return real


def _confine_all(path, roots) -> Path:
    for r in roots:
        path = confined(path, r)
    return Path(path)


def _roots(root) -> tuple:
    if root is None:
        return ()
    return tuple(root) if isinstance(root, (list, tuple)) else (root,)


def _nonneg_int(v) -> int:
    # JSON gives ints, floats (1.5, 1e400 = inf), bools and strings; only a real int is a size.
    if type(v) is not int or v < 0 or v > _MAX_OFFSET:
        raise ValueError(v)
    return v


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parses and validates one safetensors file's header. Returns (entries, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise FormatError(f"{path} is truncated (shorter than a safetensors header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise FormatError(
                    f"{path} is truncated or not a safetensors file (header claims {header_len} "
                    f"bytes, file has {size})"
                )
            raw = f.read(header_len)
        header = json.loads(raw)
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise FormatError(f"{path} is a directory, not a safetensors file") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, 5000-digit ints
        raise FormatError(f"{path} has a corrupt safetensors header ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise FormatError(f"{path} has a corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
                raise TypeError
            offsets = info["data_offsets"]
            if not isinstance(offsets, list) or len(offsets) != 2:
                raise TypeError
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(_nonneg_int(s) for s in info["shape"])
            begin, stop = (_nonneg_int(o) for o in offsets)
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: corrupt header entry for tensor {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if stop - begin != numel * dtype.itemsize or begin > stop:
            raise FormatError(f"{path}: tensor {name!r} has inconsistent size in the header")
        if data_start + stop > size:
            raise FormatError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + stop} but the "
                f"file has {size} bytes; re-create or re-download it"
            )
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, data_start + stop)
    return entries, metadata


_bytes_read = 0  # bytes read by read_tensor/read_into in this process
_count_lock = threading.Lock()


def bytes_read() -> int:
    """Bytes of tensor data this process has read so far: lets a failure path tell whether it
    read enough to be worth a full garbage collection (see ``serving/residency.py``)."""
    return _bytes_read


def read_into(entry: TensorEntry, dst: torch.Tensor) -> None:
    """Reads ``entry``'s bytes into ``dst``, a contiguous uint8 CPU tensor of exactly that many bytes
    (e.g. a slice of a pinned buffer: the data lands there with no intermediate copy)."""
    global _bytes_read
    nbytes = entry.end - entry.start
    with _count_lock:
        _bytes_read += nbytes
    if nbytes == 0:
        return
    view = dst.numpy()
    done = 0
    # Unbuffered: readinto goes straight to the destination. One read can return less than asked
    # (Linux caps a read at about 2 GiB), so read until full or until the file ends early.
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.start)
        while done < nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise FormatError(f"{entry.file} is truncated (short read); re-create or re-download it")
            done += got


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Reads one tensor from disk into a fresh CPU tensor."""
    # Read straight into an uninitialised tensor: a zero-filled bytearray cost about 0.4 s more per
    # GB (the fill and its page faults), a large part of a delta's cold start.
    flat = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    read_into(entry, flat)
    return as_tensor(entry, flat)


def as_tensor(entry: TensorEntry, flat: torch.Tensor) -> torch.Tensor:
    """``flat`` (``entry``'s bytes, uint8) viewed as ``entry``'s dtype and shape, without a copy."""
    if entry.end == entry.start:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return flat.view(entry.dtype).reshape(entry.shape)


class SafetensorsCheckpoint:
    """Lazy view of a checkpoint made of one safetensors file or shards with an index."""

    def __init__(self, entries: dict[str, TensorEntry], metadata: dict[str, str], files: list[Path]):
        self.entries = entries
        self.metadata = metadata
        self.files = files

    @classmethod
    def open(cls, path: str | os.PathLike, stem: str | None = None, root=None) -> "SafetensorsCheckpoint":
        """Opens ``path`` (a directory or a ``.safetensors`` file). In a directory, looks for
        ``{stem}.safetensors`` or ``{stem}.safetensors.index.json``; with no stem, for
        ``model.safetensors`` (HF convention) or any single ``*.safetensors`` file.

        ``root`` (a directory, or several): every file read must resolve inside each of them,
        else :class:`FormatError`; tensors are then read from the resolved paths."""
        path = Path(path)
        roots = _roots(root)
        if path.is_file():
            real = _confine_all(path, roots)
            entries, meta = read_header(real)
            return cls(entries, meta, [real])
        if not path.is_dir():
            raise FormatError(f"{path} is neither a directory nor a safetensors file")
        stems = [stem] if stem else ["model"]
        for s in stems:
            index = path / f"{s}.safetensors.index.json"
            if index.is_file():
                return cls._open_index(_confine_all(index, roots), roots, path)
            single = path / f"{s}.safetensors"
            if single.is_file():
                real = _confine_all(single, roots)
                entries, meta = read_header(real)
                return cls(entries, meta, [real])
        if stem is None:
            indexes = sorted(path.glob("*.safetensors.index.json"))
            if len(indexes) == 1:
                return cls._open_index(indexes[0])
            singles = sorted(path.glob("*.safetensors"))
            if len(singles) == 1:
                entries, meta = read_header(singles[0])
                return cls(entries, meta, singles)
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise FormatError(
                f"{path} holds only pickled weights (*.bin/*.pt); bitdelta reads safetensors "
                "only. Convert it once with `model.save_pretrained(dir, safe_serialization=True)`."
            )
        want = f"{stem}.safetensors" if stem else "model.safetensors"
        raise FormatError(f"no safetensors weights found in {path} (looked for {want} or an index)")

    @classmethod
    def _open_index(cls, index: Path, roots: tuple = (), folder: Path | None = None) -> "SafetensorsCheckpoint":
        folder = index.parent if folder is None else folder
        try:
            if index.stat().st_size > _MAX_INDEX_BYTES:
                raise ValueError(f"{index.stat().st_size} bytes is too large for an index")
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise TypeError("weight_map must map tensor names to shard file names")
        except (KeyError, TypeError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise FormatError(f"{index} is not a valid safetensors index ({type(e).__name__}: {str(e)[:200]})"
                              ) from None
        entries: dict[str, TensorEntry] = {}
        metadata: dict[str, str] = {}
        if roots:  # an untrusted index: shard names are file names in its own folder, nothing else
            for f in set(weight_map.values()):
                plain_name(f, f"{index} shard name")
        files = sorted({folder / f for f in weight_map.values()})
        for i, file in enumerate(files):
            if not file.is_file():
                raise FormatError(f"{index} lists shard {file.name}, which is missing")
            files[i] = file = _confine_all(file, roots)
            file_entries, meta = read_header(file)
            entries.update(file_entries)
            metadata.update(meta)
        missing = [k for k in weight_map if k not in entries]
        if missing:
            raise FormatError(f"{index} lists tensors missing from its shards, e.g. {missing[0]!r}")
        return cls(entries, metadata, files)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def get(self, name: str) -> torch.Tensor:
        return read_tensor(self.entries[name])

    def total_bytes(self) -> int:
        return sum(e.end - e.start for e in self.entries.values())


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Writes a standard safetensors file deterministically (sorted keys and metadata), which
    the ``safetensors`` library's own writer does not guarantee for metadata order."""
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    blobs = []
    for name in names:
        t = tensors[name].detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        blobs.append(t)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # data starts 8-byte aligned, as the format recommends
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in blobs:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def write_sharded(
    tensors: dict[str, torch.Tensor],
    out_dir: Path,
    stem: str,
    max_shard_bytes: int,
    metadata: dict[str, str],
) -> list[str]:
    """Writes ``tensors`` as ``{stem}.safetensors``, or as numbered shards plus
    ``{stem}.safetensors.index.json`` when they exceed ``max_shard_bytes``. Keys are written in
    sorted order so the output is deterministic. Returns the file names written."""
    names = sorted(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out_dir = Path(out_dir)
    if len(shards) == 1:
        file = f"{stem}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / file), metadata)
        return [file]
    written, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        file = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, str(out_dir / file), metadata)
        written.append(file)
        weight_map.update({n: file for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return written + [f"{stem}.safetensors.index.json"]
