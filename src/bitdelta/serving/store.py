"""DeltaStore: where a scaled-out server finds its deltas, by tenant name, on demand.

A store is a root holding one artifact directory per tenant (``<root>/<name>/delta_config.json``;
names may contain ``/``, e.g. ``team-a/zephyr``). The root is a plain directory path (local disk or a
mounted network filesystem: artifacts load in place) or any fsspec URL (``s3://bucket/deltas``,
``gs://...``, ``file:///srv/deltas``, ``memory://...``): artifacts are copied into a local cache
directory first, since loading reads them with plain file I/O. Each replica fetches what it is
asked for and drops the cached copy when it stops serving that tenant.

    store = DeltaStore("s3://bucket/deltas", cache_dir="/tmp/bitdelta-cache")
    path = store.fetch("zephyr")      # local artifact directory (raises DeltaNotFound if absent)
    store.release("zephyr", path)     # deletes the cached copy (never an in-place directory)
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from ..errors import BitDeltaError
from .names import check_tenant_name

logger = logging.getLogger(__name__)

CONFIG = "delta_config.json"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# the store's directory names are tenant names, checked by the one rule every entry point uses
check_name = check_tenant_name


class DeltaNotFound(BitDeltaError):
    """No artifact of that name in the store."""


class DeltaStore:
    """A root of artifact directories: a local path, or an fsspec URL copied through ``cache_dir``."""

    def __init__(self, root: str, cache_dir: str | None = None, storage_options: dict | None = None,
                 owns_cache: bool = False):
        if not root:
            raise BitDeltaError("the delta store is empty: pass a directory or a URL such as s3://bucket/deltas")
        self.root = str(root)
        self.remote = bool(_SCHEME.match(self.root))
        self._own_cache = owns_cache
        if self.remote:
            try:
                import fsspec
            except ImportError:
                raise BitDeltaError(f"the delta store {root} is a URL: install fsspec (pip install 'bitdelta[ray]') "
                                    "and the filesystem's package (e.g. s3fs for s3://)") from None
            self.fs, self.path = fsspec.core.url_to_fs(self.root, **(storage_options or {}))
            self.path = self.path.rstrip("/")
            self.cache = None if cache_dir is None else Path(cache_dir)  # made on the first fetch
        else:
            self.fs, self.path, self.cache = None, str(Path(self.root).expanduser()), None
            if not Path(self.path).is_dir():
                raise BitDeltaError(f"the delta store {root} is not a directory; create it or pass a URL "
                                    "(s3://..., file://...)")

    def __repr__(self) -> str:
        return f"DeltaStore({self.root!r})"

    # ------------------------------------------------------------------ lookup

    def exists(self, name: str) -> bool:
        check_tenant_name(name)
        if self.remote:
            return self.fs.exists(f"{self.path}/{name}/{CONFIG}")
        return (Path(self.path) / name / CONFIG).is_file()

    def names(self, depth: int = 2) -> list[str]:
        """Artifact names in the store (directories holding ``delta_config.json``, up to ``depth`` levels)."""
        found = []
        for d in range(1, depth + 1):
            pattern = "/".join(["*"] * d) + "/" + CONFIG
            if self.remote:
                hits = [h[len(self.path) + 1:] for h in self.fs.glob(f"{self.path}/{pattern}")]
            else:
                hits = [p.relative_to(self.path).as_posix() for p in Path(self.path).glob(pattern)]
            for h in hits:
                name = h[: -len(CONFIG) - 1]
                try:
                    found.append(check_tenant_name(name))
                except BitDeltaError:
                    continue
        return sorted(set(found))

    # ------------------------------------------------------------------ fetch / release

    def fetch(self, name: str) -> str:
        """A local directory holding artifact ``name`` (the store's own for paths, a fresh cached copy for URLs)."""
        check_tenant_name(name)
        if not self.exists(name):
            where = f"{self.root.rstrip('/')}/{name}/{CONFIG}"
            raise DeltaNotFound(f"the model {name!r} does not exist: no artifact {where}")
        if not self.remote:
            return str(Path(self.path) / name)
        if self.cache is None:
            self.cache, self._own_cache = Path(tempfile.mkdtemp(prefix="bitdelta-deltas-")), True
        self.cache.mkdir(parents=True, exist_ok=True)
        src = f"{self.path}/{name}"
        # a unique directory per fetch: two replicas (or two loads) sharing a cache never collide
        out = self.cache / f"{name.replace('/', '__')}-{uuid.uuid4().hex[:8]}"
        tmp = out.with_name(out.name + ".part")
        try:
            for remote_file in self.fs.find(src):
                rel = remote_file[len(src) + 1:]
                if not rel or any(p in ("", ".", "..") for p in rel.split("/")):
                    continue
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open(remote_file, "rb") as fin, open(dst, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 22)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("fetched %s/%s into %s", self.root, name, out)
        return str(out)

    def release(self, name: str, path: str) -> None:
        """Deletes a cached copy made by :meth:`fetch`; in-place store directories are left alone."""
        if self.cache is None:
            return
        p = Path(path)
        if p.parent == self.cache:
            shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        """Removes the cache directory if this store owns it (created it, or was told so)."""
        if self._own_cache and self.cache is not None:
            shutil.rmtree(self.cache, ignore_errors=True)
