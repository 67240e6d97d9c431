"""RaySettings: everything a scaled-out server's replicas build themselves from, as plain values.

The engine's settings (:class:`~bitdelta.serving.config.EngineConfig`, declared once) plus Ray's
own (replica count and resources, the delta store, API keys). They travel to every Ray worker as a
dict, and ``serve run ... key=value`` gives them as strings, which :meth:`RaySettings.from_dict`
converts. No Ray and no torch needed to read them.

    s = RaySettings(base="models/tiny/base", store="s3://bucket/deltas", replicas=2).resolved()
    RaySettings.from_dict(s.to_dict()) == s
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

from ...errors import BitDeltaError
from ..config import EngineConfig

APP_NAME = "bitdelta"


@dataclass(kw_only=True)
class RaySettings(EngineConfig):
    """Everything a replica needs to build itself (plain values: it travels to every Ray worker): the
    engine's settings (:class:`~bitdelta.serving.config.EngineConfig`, declared once) and Ray's own."""

    base: str
    store: str
    base_name: str | None = None
    replicas: int | None = None  # None: one per GPU of the cluster (1 without GPUs)
    gpus_per_replica: float | None = None  # None: 1 if the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    deltas_per_replica: int | None = None  # None: max_gpu_deltas (each tenant keeps its device slot)
    cache_dir: str | None = None
    storage_options: dict | None = None
    api_keys: dict[str, list[str]] | None = None
    api_keys_file: str | None = None
    max_ongoing_requests: int | None = None  # None: max_batch; beyond it Serve may send a tenant to a second replica
    ingress_replicas: int = 1
    retries: int = 3
    report_interval_s: float = 1.0
    torch_threads: int | None = None
    name: str = APP_NAME

    @classmethod
    def from_dict(cls, d: dict) -> "RaySettings":
        """Builds settings from a dict whose values may be strings (``serve run ... key=value``)."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BitDeltaError(f"unknown Ray serve setting(s) {sorted(unknown)}; known: {sorted(known)}")
        out = {}
        for k, v in d.items():
            out[k] = _coerce(k, v, hints[k])
        if "base" not in out or "store" not in out:
            raise BitDeltaError("Ray serving needs base=<base model> and store=<delta directory or URL>")
        return cls(**out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def served_base_name(self) -> str:
        return self.base_name or Path(str(self.base)).name or "base"

    @property
    def capacity(self) -> int:
        return self.deltas_per_replica or self.max_gpu_deltas

    def key_scopes(self) -> dict[str, set[str]] | None:
        return None if self.api_keys is None else {k: set(v) for k, v in self.api_keys.items()}

    def resolved(self) -> "RaySettings":
        """Fills cluster-dependent defaults (GPUs per replica, replica count) and loads the key file."""
        s = dataclasses.replace(self)
        gpus = _cluster_gpus()
        if s.gpus_per_replica is None:
            s.gpus_per_replica = 1.0 if gpus >= 1 else 0.0
        if s.replicas is None:
            s.replicas = max(1, int(gpus // s.gpus_per_replica)) if s.gpus_per_replica else 1
        if s.api_keys_file and s.api_keys is None:
            from ..http.auth import load_api_keys

            s.api_keys = {k: sorted(v) for k, v in load_api_keys(s.api_keys_file).items()}
        s.validate()
        return s

    def validate(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise BitDeltaError(f"replicas must be at least 1 (got {self.replicas})")
        if self.gpus_per_replica is not None and not 0 <= self.gpus_per_replica <= 1:
            raise BitDeltaError(f"gpus_per_replica is {self.gpus_per_replica}: each replica's engine uses one device, "
                                "so use a value in [0, 1] (fractions share a GPU) and more replicas instead")
        if self.capacity < 1:
            raise BitDeltaError("deltas_per_replica must be at least 1")
        if self.ingress_replicas < 1:
            raise BitDeltaError("ingress_replicas must be at least 1")


def _coerce(name, value, hint):
    if value is None or not isinstance(value, str):
        return value
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    target = args[0]
    if value.lower() in ("none", "null", "") and type(None) in typing.get_args(hint):
        return None
    try:
        if target is bool:
            return value.lower() in ("1", "true", "yes", "on")
        if target in (int, float):
            return target(value)
        if typing.get_origin(target) is dict or target is dict:
            return json.loads(value)
    except ValueError as e:
        raise BitDeltaError(f"setting {name}={value!r}: {e}") from None
    return value


def _cluster_gpus() -> float:
    try:
        import ray

        return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    except Exception:  # no Ray connection yet: decide as on a CPU cluster
        return 0.0
