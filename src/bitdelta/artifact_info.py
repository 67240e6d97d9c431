"""DeltaInfo: the metadata of ``delta_config.json``, typed, and its migrations between format versions.

``delta_config.json`` holds two kinds of keys. What the tensors imply (``modules``, ``base_fingerprint``,
``dense_parameters``, ``files``, ``packing``, ``format``, ``format_version``) is derived from a
:class:`~bitdelta.delta.Delta` when it is saved (``artifact.delta_to_config``). Everything else (model
ids and revisions, the compression and distillation records...) is a :class:`DeltaInfo`: one
attribute per key, ``to_dict`` for writing and ``from_dict`` for reading (migrating older
``format_version``\\ s first). A key that was never set is absent from the file, not null.

It also reads like the dict it replaces (``info["distillation"]``, ``info.get("vocab_size")``);
setting a key that is not in the schema is a ``KeyError`` naming the keys that are.

``artifact_path`` (where a loaded delta was read from) is an attribute only, never written: a loaded
delta's name in messages and its identity for servers sharing one artifact between tenants.

    info = DeltaInfo.from_dict(json.loads(Path("ft.bitdelta/delta_config.json").read_text()))
    info.compression["scale"], info.distillation["recipe"]
    json.dumps(info.to_dict())          # exactly the metadata keys that were set
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import FormatError

logger = logging.getLogger(__name__)

FORMAT_NAME = "bitdelta"
FORMAT_VERSION = 2
# The oldest format_version that holds a delta: an artifact is written with the lowest version whose
# readers apply it correctly, so a plain 1-bit delta stays readable by every bitdelta. Version 2 adds
# low-rank factors (``<module>.lowrank_a``/``.lowrank_b``, ``modules.<m>.lowrank_rank``): a version-1
# reader ignores module keys and tensors it does not know, so it would apply such a delta without its
# correction; it refuses version 2 instead ("upgrade").
PLAIN_FORMAT_VERSION = 1
LOWRANK_FORMAT_VERSION = 2

# Keys derived from the tensors when saving; a DeltaInfo never holds them.
LAYOUT_KEYS = ("format", "format_version", "packing", "base_fingerprint", "modules", "dense_parameters", "files")

# ``MIGRATIONS[v]`` turns a whole ``delta_config.json`` of format_version ``v`` into one of ``v + 1``.
# A change to the format bumps FORMAT_VERSION and adds the step from the previous version here.
# 1 -> 2: version 2 only adds optional low-rank factors; a version-1 file is a version-2 file without them.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: lambda cfg: cfg}


class _Unset:
    """A key never set: left out of the file (where None is written as null)."""

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()
# The old dict's name for the runtime path; still accepted by item access, never a schema key.
_RUNTIME_PATH_KEY = "artifact_path"


def _key(default=UNSET):
    return field(default=default)


@dataclass(eq=False)
class DeltaInfo(MutableMapping):
    """The metadata keys of ``delta_config.json`` (see the module docstring)."""

    bitdelta_version: str | None = _key()
    base_model_name_or_path: str | None = _key()
    base_model_revision: str | None = _key()
    finetuned_model_name_or_path: str | None = _key()
    finetuned_model_revision: str | None = _key()
    finetuned_num_parameters: int | None = _key()
    model_type: str | None = _key()
    architectures: list[str] | None = _key()
    vocab_size: int | None = _key()
    tied_parameters: dict[str, str] | None = _key()  # fine-tune parameter -> the parameter it is tied to
    compression: dict | None = _key()  # compress's record: scale, bits, targets, coverage, base quantization
    distillation: dict | None = _key()  # distill's record: settings, losses, recipe, auto's choice
    imported_from: dict | None = _key()  # reference_import's record
    fidelity: dict | None = _key()  # measured fidelity, when recorded
    artifact_path: str | None = field(default=None, repr=False)  # runtime only: where it was loaded from

    # ------------------------------------------------------------------ schema

    @classmethod
    def schema_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != _RUNTIME_PATH_KEY)

    def to_dict(self) -> dict:
        """The keys that were set, as written to ``delta_config.json``."""
        return {k: getattr(self, k) for k in self.schema_keys() if getattr(self, k) is not UNSET}

    @classmethod
    def from_dict(cls, data: dict, unknown: str = "error") -> "DeltaInfo":
        """The metadata of ``data`` (a whole ``delta_config.json``, migrated first when it names an older
        ``format_version``, or just its metadata keys). Layout keys are skipped; other keys the schema
        lacks are an error (``unknown="error"``) or dropped (``"drop"``, for files already checked)."""
        if "format_version" in data:
            data = migrate(data)
        known = set(cls.schema_keys())
        extra = sorted(str(k) for k in data if k not in known and k not in LAYOUT_KEYS and k != _RUNTIME_PATH_KEY)
        if extra and unknown == "error":
            raise KeyError(f"not delta_config.json keys: {', '.join(extra)}; valid keys: {', '.join(sorted(known))}")
        info = cls(**{k: v for k, v in data.items() if k in known})
        if data.get(_RUNTIME_PATH_KEY) is not None:
            info.artifact_path = data[_RUNTIME_PATH_KEY]
        return info

    def copy(self) -> "DeltaInfo":
        """A copy whose records (nested dicts) can be changed without changing this one."""
        return dataclasses.replace(self, **{k: copy.deepcopy(v) for k, v in self.to_dict().items()})

    # ------------------------------------------------------------------ dict access (the old interface)

    def __getitem__(self, key: str):
        if key == _RUNTIME_PATH_KEY and self.artifact_path is not None:
            return self.artifact_path
        if key not in self.schema_keys() or getattr(self, key) is UNSET:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value) -> None:
        if key == _RUNTIME_PATH_KEY:
            self.artifact_path = value
            return
        if key not in self.schema_keys():
            raise KeyError(f"{key!r} is not a delta_config.json key; valid keys: {', '.join(self.schema_keys())}")
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        self[key]  # KeyError when absent
        if key == _RUNTIME_PATH_KEY:
            self.artifact_path = None
        else:
            setattr(self, key, UNSET)

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __repr__(self) -> str:
        return f"DeltaInfo({self.to_dict()!r})"


def migrate(cfg: dict, where: str = "delta_config.json") -> dict:
    """``cfg`` brought from its ``format_version`` to :data:`FORMAT_VERSION`, one step at a time (a new
    dict; ``cfg`` is left as it is). A newer version than this bitdelta knows is a :class:`FormatError`."""
    version = cfg.get("format_version")
    if type(version) is not int or version < 1:
        raise FormatError(f"{where} has an invalid format_version {str(version)[:80]!r}")
    if version > FORMAT_VERSION:
        from ._version import __version__

        raise FormatError(f"{where} uses artifact format_version {version}, newer than this bitdelta {__version__} "
                          f"understands (up to {FORMAT_VERSION}); upgrade: pip install -U bitdelta")
    out = cfg
    while version < FORMAT_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise FormatError(f"{where}: format_version {version} cannot be read by this bitdelta (no migration "
                              f"to {version + 1}); convert it with the bitdelta version that wrote it")
        out = step(dict(out))
        logger.info("%s: migrated from format_version %d to %d", where, version, version + 1)
        version += 1
        out["format_version"] = version
    return out
