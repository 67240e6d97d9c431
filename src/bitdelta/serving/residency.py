"""Residency: where each registered delta is (disk, host memory, a device slot), with an explicit state.

A registered delta is on disk (its artifact), optionally in host memory (prepared, pinned on CUDA,
at most ``max_cpu_deltas``, LRU), optionally in a delta slot of the device pool (LRU among slots no
running request uses). :meth:`DeltaSlots.state` says which of :class:`DeltaState` a delta is in, which
is all the engine needs to schedule it:

* ``READY``: in a delta slot; requests run;
* ``WAITING_FOR_SLOT``: in host memory, every delta slot held by running requests;
* ``INSTALLING``: given a delta slot, its copy from host memory still in flight (CUDA only);
* ``LOADING``: on its way from disk (a background thread), or on disk with a load about to start;
* ``FAILED``: its last load failed (the error says why; requests for it fail).

Disk loads run in a background thread and read the artifact straight into pinned host memory on
CUDA (:mod:`bitdelta.bulk_read`); the host copy then uses those buffers as they are. Installing host
-> slot (:meth:`~bitdelta.serving.layers.DevicePool.install`) is started by the engine thread between
steps, on CUDA as copies on a side stream: the slot is INSTALLING, not READY, until the copy's event
has completed (:mod:`bitdelta.serving.install_ticket`), so no step reads a slot being written and no
step waits for the copy. An INSTALLING delta holds its slot (eviction passes over it) and its
requests wait. The per-step ops the model calls (``linear``, ``gather1d``, ``embed``,
``extra_logits``) are the dispatch's (:mod:`bitdelta.serving.dispatch`), reached through this object.

Registration refuses a delta before reading its tensors when the config and headers already show
it cannot be served here (shapes unlike the base's, too many planes or added tokens), checks its
fingerprint and values against the base's samples and magnitudes read once at start-up
(:mod:`bitdelta.serving.base_reference`), and on any failure keeps nothing it read: the
error raised carries no frames holding tensors.

    slots = DeltaSlots(model, max_gpu_deltas=32, max_cpu_deltas=128)
    slots.register("zephyr", "deltas/zephyr", root="deltas")   # validates + checks the base; raises BitDeltaError
    delta_slot = slots.acquire("zephyr")          # None while it loads: try again next step
    slots.state("zephyr")                         # DeltaState.READY
"""

from __future__ import annotations

import enum
import gc
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BitDeltaError, ShapeMismatchError
from ..safetensors_io import bytes_read
from ..scale_modes import scale_shape
from ..validate import check_delta_values
from .base_reference import BaseReference
from .dispatch import Dispatch, FunctionDispatch
from .install_ticket import InstallTicket
from .layers import DevicePool, HostDelta

logger = logging.getLogger(__name__)

_COLLECT_AFTER_BYTES = 64 << 20  # a failed load that read this much is worth a full gc.collect()


class DeltaState(enum.Enum):
    """Where a registered delta stands, as the engine schedules it (see the module docstring)."""

    READY = "ready"
    INSTALLING = "installing"
    WAITING_FOR_SLOT = "waiting_for_slot"
    LOADING = "loading"
    FAILED = "failed"


@dataclass
class Entry:
    name: str
    path: str
    info: dict
    files: dict
    root: str | None = None  # the directory its files must stay in (a server's --delta-dir), reloads too
    host: HostDelta | None = None
    slot: int | None = None  # its delta slot in the device pool
    ticket: InstallTicket | None = None  # the slot's copy, while it may be in flight (CUDA)
    refs: int = 0
    loading: bool = False
    error: str | None = None
    removed: bool = False
    stats: dict = field(default_factory=lambda: {"loads": 0, "evictions": 0, "host_evictions": 0})


def _pool_attr(name: str) -> property:
    return property(lambda self: getattr(self.pool, name), lambda self, v: setattr(self.pool, name, v))


class DeltaSlots:
    """Device slot pools + host LRU + background loader, keyed by delta name."""

    def __init__(self, model, max_gpu_deltas: int = 32, max_cpu_deltas: int = 128, max_bits: int = 1,
                 max_extra_vocab: int = 0, backend: str = "auto", linear_fn=None, max_lowrank_rank: int = 0,
                 read_threads: int = 4):
        """``linear_fn(name, x, w, pool, batch) -> y`` replaces the fused op for every module when given
        (e.g. :func:`bitdelta.serving.unfused.unfused_linear`, the reference-style baseline that
        benchmarks compare against); None uses :func:`bitdelta.ops.bitdelta_linear`. ``max_lowrank_rank``:
        the largest low-rank correction a slot holds (0: none; such deltas are refused).
        ``read_threads``: threads reading an artifact from disk at once."""
        if max_gpu_deltas < 1:
            raise ValueError("max_gpu_deltas must be at least 1")
        self.model, self.backend = model, backend
        self.num_slots, self.max_cpu, self.bits = max_gpu_deltas, max_cpu_deltas, max_bits
        self.max_extra, self.max_lowrank_rank = max_extra_vocab, max_lowrank_rank
        self.pool = DevicePool(model, max_gpu_deltas, max_bits, max_extra_vocab, max_lowrank_rank)
        self.linear_fn = linear_fn  # sets self.dispatch
        self.pin = model.device.type == "cuda"
        self.read_threads = read_threads
        self.last_load: dict = {}  # seconds of the last load from disk, by phase (benchmarks split cold starts)
        self.entries: dict[str, Entry] = {}
        self.slot_owner: list[str | None] = [None] * max_gpu_deltas
        self.lru: OrderedDict[str, None] = OrderedDict()  # device-resident, least recent first
        self.host_lru: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.RLock()
        self.totals = {"loads": 0, "evictions": 0, "host_evictions": 0}
        self._jobs: queue.Queue = queue.Queue()
        self.on_ready = None  # callback(): wake the engine when a background load lands
        # the base's fingerprint samples and magnitudes, read once: registration checks deltas against
        # these, not the weights (the served base is frozen; see bitdelta.serving.base_reference)
        self.base_reference = BaseReference.read(model)
        self._thread = threading.Thread(target=self._loader, name="bitdelta-delta-loader", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ registry

    def register(self, name: str, path, delta=None, root=None) -> Entry:
        """Loads, validates and base-checks ``path`` now (raises on any problem); keeps it in host memory.

        ``root``: a directory the artifact and every file it reads must lie in, after symlinks (the
        server's ``--delta-dir``); kept for later reloads from disk. On failure nothing read is kept:
        the error is raised without the frames that held the delta's tensors."""
        with self.lock:
            if name in self.entries:
                why = ("is still finishing requests after its removal" if self.entries[name].removed
                       else "is already registered")
                raise BitDeltaError(f"a delta named {name!r} {why}; DELETE it first or pick another name")
        read_before = bytes_read()
        try:
            entry = self._register(name, path, delta, root)
            err = None
        except Exception as e:  # noqa: BLE001 - re-raised below, stripped of what it holds
            if not isinstance(e, BitDeltaError):
                logger.error("registering delta %s from %s failed unexpectedly", name, path, exc_info=True)
                err = BitDeltaError(f"delta {name!r} from {path} could not be loaded: {type(e).__name__}: {e}")
            else:
                err = e
        if err is not None:
            _release(err, bytes_read() - read_before)
            raise err
        return entry

    def _register(self, name: str, path, delta, root) -> Entry:
        delta = self._load(path, root, name) if delta is None else self._verify(delta, path)
        host = self._timed_prepare(delta, name)
        entry = Entry(name, str(path), dict(delta.info), dict(delta.files), None if root is None else str(root))
        with self.lock:
            if name in self.entries:  # registered by another thread meanwhile
                raise BitDeltaError(f"a delta named {name!r} is already registered; DELETE it first or pick another "
                                    "name")
            self.entries[name] = entry
            entry.stats["loads"] += 1
            self.totals["loads"] += 1
            self._put_host(entry, host)
        return entry

    def unregister(self, name: str) -> None:
        with self.lock:
            e = self.entries.get(name)
            if e is None or e.removed:
                raise KeyError(name)
            e.removed = True
            self.host_lru.pop(name, None)
            e.host = None
            if e.refs == 0:
                self._free_slot(e)
                del self.entries[name]

    def names(self) -> list[str]:
        with self.lock:
            return [n for n, e in self.entries.items() if not e.removed]

    def get(self, name: str) -> Entry | None:
        with self.lock:
            e = self.entries.get(name)
            return None if e is None or e.removed else e

    # ------------------------------------------------------------------ loading

    def _load(self, path, root=None, name: str = "?"):
        from ..artifact import load_delta

        if not Path(path).is_dir():
            raise BitDeltaError(f"{path} is not a delta artifact directory")
        # The layout is checked against the base before any tensor is read, so an artifact declaring
        # tensors this server cannot hold is refused without reading them. On CUDA the tensors land in
        # pinned memory, which prepare() then uses as the host copy.
        t0 = time.perf_counter()
        delta = load_delta(path, root=root, precheck=lambda layout: self._check_layout(layout, name),
                           pin_memory=self.pin, read_threads=self.read_threads)
        t1 = time.perf_counter()
        delta = self._verify(delta, path)
        self.last_load = {"read_validate_s": t1 - t0, "base_check_s": time.perf_counter() - t1}
        return delta

    def _verify(self, delta, path):
        """The base check: a comparison with the base's samples and magnitudes read once at start-up
        (:attr:`base_reference`); no base weight is read here."""
        if delta.artifact_path is None:  # an in-memory delta: name it by where it was registered from
            delta.artifact_path = str(path)
        ref = self.base_reference
        delta.fingerprint.verify(ref.samples, delta_name=str(path), base_name=delta.base_model_name_or_path,
                                 model_name=str(getattr(self.model.config, "_name_or_path", "base")))
        check_delta_values(delta, ref.values_for(delta))
        return delta

    def _timed_prepare(self, delta, name: str) -> HostDelta:
        t = time.perf_counter()
        host = self.prepare(delta, name)
        self.last_load = {**self.last_load, "host_copy_s": time.perf_counter() - t}
        return host

    def _check_layout(self, layout, name: str = "?") -> None:
        """Raises a clear error unless a delta of ``layout`` (an :class:`~bitdelta.artifact.Layout`) fits
        this server's base and pools; needs only shapes, so it runs before any tensor is read."""
        m = self.model
        shapes = m.delta_modules()
        rows = {}
        for fqn, ml in layout.modules.items():
            if fqn == "lm_head" and m.head_name == m.embed_name:
                raise BitDeltaError(f"delta {name!r} has its own lm_head, but the base ties it to the embeddings; "
                                    "this server cannot serve an untied fine-tune of a tied base")
            if fqn not in shapes:
                raise BitDeltaError(f"delta {name!r} compresses {fqn!r}, which the serving model does not have")
            n, k = shapes[fqn]
            if ml.out_features != n or ml.in_features != k:
                raise ShapeMismatchError(f"delta {name!r}: {fqn} is {ml.out_features}x{ml.in_features}, "
                                         f"base is {n}x{k}")
            if ml.bits > self.bits:
                raise BitDeltaError(f"delta {name!r} has {ml.bits} sign planes but the pool holds {self.bits}; "
                                    f"restart the server with --max-bits {ml.bits}")
            if ml.lowrank_rank:
                self._check_lowrank(fqn, ml.lowrank_rank, name)
            if fqn == m.embed_name and ml.mode == "col":
                raise BitDeltaError(f"delta {name!r}: column-scaled embeddings are not supported; use row scales")
            if ml.extra_rows:
                if fqn not in (m.embed_name, m.head_name):
                    raise BitDeltaError(f"delta {name!r}: {fqn} adds rows, but only the embeddings and the output "
                                        "head may grow (added tokens)")
                if ml.extra_rows > self.max_extra:
                    raise BitDeltaError(f"delta {name!r} adds {ml.extra_rows} tokens; the server was started with "
                                        f"--max-extra-vocab {self.max_extra}")
                rows[fqn] = ml.extra_rows
        embed_rows = rows.get(m.embed_name, 0)
        head_rows = embed_rows if m.head_name == m.embed_name else rows.get(m.head_name, 0)
        if embed_rows != head_rows:
            raise BitDeltaError(f"delta {name!r}: added-token rows of the embeddings and the head disagree")
        for pname, shape in layout.dense.items():
            key = layout.ties.get(pname, pname)
            if key not in m.params1d:
                raise BitDeltaError(f"delta {name!r} replaces {pname!r} densely; the server gathers only 1-D "
                                    "parameters (norms, biases) per tenant: compress without "
                                    "--dense-embeddings/--exclude")
            if tuple(shape) != tuple(m.params1d[key].shape):
                raise ShapeMismatchError(f"delta {name!r}: {pname} has shape {tuple(shape)}, "
                                         f"base has {tuple(m.params1d[key].shape)}")

    def _check_lowrank(self, fqn: str, rank: int, name: str) -> None:
        if self.max_lowrank_rank == 0:
            raise BitDeltaError(f"delta {name!r} has a rank-{rank} low-rank correction on {fqn}, but the server "
                                "holds none; restart it with --max-lowrank-rank (max_lowrank_rank) of at least "
                                "the delta's largest rank")
        if rank > self.max_lowrank_rank:
            raise BitDeltaError(f"delta {name!r} has a rank-{rank} low-rank correction on {fqn}; the pool holds "
                                f"rank {self.max_lowrank_rank}: restart the server with --max-lowrank-rank {rank}")
        if self.model.base_quantization:
            raise BitDeltaError(f"delta {name!r} has a low-rank correction; the server's quantized base does not "
                                "serve those yet: serve it on a dense base")

    def prepare(self, delta, name: str = "?") -> HostDelta:
        """Converts a :class:`Delta` to pool layout, or raises a clear error if it cannot be served."""
        from ..artifact import Layout

        self._check_layout(Layout.of(delta), name)
        m = self.model
        shapes = m.delta_modules()
        # The delta's own tensors serve as the host copy when they already have the pool's layout (and
        # are pinned, on CUDA: a load from disk reads them so). A delta with fewer sign planes than the
        # pool, or low-rank factors in another dtype than the model's, is copied whole: copies of some
        # tensors beside views of the rest would keep all the read buffers alive, the copied bytes too.
        reuse = all(pm.bits == self.bits and (not pm.lowrank_rank or pm.lowrank_a.dtype == m.dtype)
                    for pm in delta.modules.values())
        modules, extra_embed, extra_head, lowrank = {}, None, None, {}
        for fqn, pm in delta.modules.items():
            n, k = shapes[fqn]
            if pm.lowrank_rank:
                lowrank[fqn] = tuple(self._host_copy(t, m.dtype, reuse) for t in (pm.lowrank_b, pm.lowrank_a))
            is_col = pm.mode == "col"
            sc = pm.scale.float().cpu()
            sc = sc[:, None].expand(pm.bits, n) if pm.mode == "scalar" else sc
            modules[fqn] = (self._host_planes(pm.sign.cpu(), (self.bits, n, (k + 7) // 8), reuse),
                            self._host_planes(sc, scale_shape("col" if is_col else "row", n, k, self.bits), reuse),
                            is_col)
            if pm.extra_rows is not None:
                rows = self._host_copy(pm.extra_rows, m.dtype, reuse)
                if fqn == m.embed_name:
                    extra_embed = rows
                    if m.head_name == m.embed_name:
                        extra_head = rows
                else:
                    extra_head = rows
        params1d = {}
        for pname, value in delta.dense.items():
            key = delta.ties.get(pname, pname)
            params1d[key] = self._host_copy(value, m.dtype, reuse)
        return HostDelta(modules, params1d, extra_embed, extra_head, lowrank)

    def _usable(self, t: torch.Tensor, reuse: bool) -> bool:
        """Whether ``t`` can be the host copy itself: a contiguous CPU tensor, pinned on CUDA."""
        return reuse and t.device.type == "cpu" and t.is_contiguous() and (not self.pin or t.is_pinned())

    def _host_copy(self, t: torch.Tensor, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        """``t`` in ``dtype`` as a host tensor (pinned on CUDA): ``t`` itself when it is one already,
        else one copy (the dtype conversion included) straight into the destination."""
        if t.dtype == dtype and self._usable(t, reuse):
            return t
        buf = torch.empty(t.shape, dtype=dtype, pin_memory=self.pin)
        return buf.copy_(t)

    def _host_planes(self, planes: torch.Tensor, shape: tuple, reuse: bool = False) -> torch.Tensor:
        """``planes [bits, ...]`` as a host tensor of ``shape`` (the pool's planes, zero past the
        delta's): ``planes`` itself when it has that shape and :meth:`_usable` says so (a load from
        disk read it into pinned memory), else one copy straight into a (pinned) buffer."""
        if tuple(planes.shape) == tuple(shape) and (self._usable(planes, reuse) or not self.pin):
            return planes.contiguous()
        buf = torch.empty(shape, dtype=planes.dtype, pin_memory=self.pin)
        buf[:planes.shape[0]].copy_(planes)
        buf[planes.shape[0]:].zero_()
        return buf

    def _put_host(self, e: Entry, host: HostDelta) -> None:
        e.host = host
        self.host_lru[e.name] = None
        self.host_lru.move_to_end(e.name)
        while len(self.host_lru) > self.max_cpu:
            victim = next(iter(self.host_lru))
            self.host_lru.pop(victim)
            ve = self.entries.get(victim)
            if ve is not None:
                ve.host = None
                ve.stats["host_evictions"] += 1
                self.totals["host_evictions"] += 1

    def _loader(self) -> None:
        while True:
            name = self._jobs.get()
            with self.lock:
                e = self.entries.get(name)
                if e is None or e.removed or e.host is not None:
                    if e is not None:
                        e.loading = False
                    continue
                path = e.path
                root = e.root
            try:
                host = self._timed_prepare(self._load(path, root, name), name)
                err = None
            except Exception as ex:  # a file changed or vanished since registration
                host, err = None, f"could not load delta {name!r} from {path}: {ex}"
                logger.error(err)
                _release(ex, _COLLECT_AFTER_BYTES)
            with self.lock:
                e.loading = False
                if err:
                    e.error = err
                elif not e.removed:
                    e.stats["loads"] += 1
                    self.totals["loads"] += 1
                    self._put_host(e, host)
            if self.on_ready:
                self.on_ready()

    def prefetch(self, name: str) -> None:
        """Starts bringing ``name`` into host memory in the background (no-op if it is there)."""
        with self.lock:
            e = self.entries.get(name)
            if e is None or e.removed or e.host is not None or e.slot is not None or e.loading:
                return
            e.loading, e.error = True, None
        self._jobs.put(name)

    # ------------------------------------------------------------------ device slots (engine thread)

    def acquire(self, name: str, wait: bool = False) -> int | None:
        """The slot of ``name`` with a reference held, or None if it is not resident yet (loading
        starts) or its copy into the slot is still in flight (CUDA). ``wait``: block until such a copy
        has landed instead (for a caller with nothing else to run meanwhile)."""
        with self.lock:
            e = self.entries.get(name)
            if e is None or e.removed:
                raise KeyError(name)
            if e.slot is None:
                if e.host is None:
                    self.prefetch(name)
                    return None
                slot = self._take_slot()
                if slot is None:
                    return None
                self._install(slot, e)
            if e.ticket is not None:
                if wait:
                    e.ticket.wait()
                elif not e.ticket.ready():
                    return None
                e.ticket = None
            e.refs += 1
            self.lru[name] = None
            self.lru.move_to_end(name)
            return e.slot

    def release(self, name: str) -> None:
        with self.lock:
            e = self.entries.get(name)
            if e is None:
                return
            e.refs -= 1
            if e.removed and e.refs == 0:
                self._free_slot(e)
                del self.entries[name]

    def unload(self, name: str) -> bool:
        """Evicts ``name`` from its device slot; False if running requests use it."""
        with self.lock:
            e = self.entries.get(name)
            if e is None or e.removed:
                raise KeyError(name)
            if e.refs:
                return False
            if e.slot is not None:
                self._free_slot(e, count=True)
            return True

    def load(self, name: str) -> int | None:
        """Makes ``name`` device-resident now if possible (engine thread), without holding a reference;
        a copy into its slot is waited for."""
        slot = self.acquire(name, wait=True)
        if slot is not None:
            self.release(name)
        return slot

    def _take_slot(self) -> int | None:
        for i, owner in enumerate(self.slot_owner):
            if owner is None:
                return i
        for victim in self.lru:  # least recently used first
            ve = self.entries[victim]
            if ve.refs == 0 and (ve.ticket is None or ve.ticket.ready()):  # never a slot mid-copy
                slot = ve.slot
                self._free_slot(ve, count=True)
                return slot
        return None

    def _free_slot(self, e: Entry, count: bool = False) -> None:
        # An install may still be in flight (unload or unregister of an INSTALLING delta): the slot's
        # next install queues behind it on the pool's one copy stream, so it lands in order.
        if e.slot is None:
            return
        slot = e.slot
        self.slot_owner[slot] = None
        e.slot, e.ticket = None, None
        self.lru.pop(e.name, None)
        self.pool.clear(slot)
        if count:
            e.stats["evictions"] += 1
            self.totals["evictions"] += 1
            if e.host is None and not e.removed:
                logger.info("delta %s evicted to disk", e.name)

    def _install(self, slot: int, e: Entry) -> None:
        # In the eviction order at once (a delta whose requests were cancelled mid-copy must not hold
        # its slot for ever), but _take_slot passes over it while its copy is in flight.
        ticket = self.pool.install(slot, e.host)
        e.ticket = None if ticket.ready() else ticket
        self.slot_owner[slot] = e.name
        e.slot = slot
        self.lru[e.name] = None
        self.lru.move_to_end(e.name)
        if e.host is not None:
            self.host_lru[e.name] = None
            self.host_lru.move_to_end(e.name)

    # ------------------------------------------------------------------ state (engine thread)

    def state(self, name: str) -> DeltaState | None:
        """Where ``name`` stands (None: not registered, or removed)."""
        with self.lock:
            e = self.entries.get(name)
            if e is None or e.removed:
                return None
            if e.error:
                return DeltaState.FAILED
            if e.slot is not None:
                if e.ticket is not None and not e.ticket.ready():
                    return DeltaState.INSTALLING
                return DeltaState.READY
            if e.host is not None:
                return DeltaState.WAITING_FOR_SLOT
            return DeltaState.LOADING

    def error(self, name: str) -> str | None:
        """Why ``name``'s last load failed (None unless its state is FAILED)."""
        with self.lock:
            e = self.entries.get(name)
            return None if e is None else e.error

    # ------------------------------------------------------------------ per-step ops (the dispatch's)

    @property
    def linear_fn(self):
        """None: the fused ops; else ``fn(name, x, w, pool, batch)`` for every module (e.g.
        :func:`bitdelta.serving.unfused.unfused_linear`, the baseline benchmarks compare against)."""
        return self._linear_fn

    @linear_fn.setter
    def linear_fn(self, fn) -> None:
        self._linear_fn = fn
        if fn is None:
            self.dispatch = Dispatch(self.pool, self.backend)
        else:
            self.dispatch = FunctionDispatch(self.pool, fn, self.backend)

    def linear(self, name: str, x: torch.Tensor, w: torch.Tensor, batch) -> torch.Tensor:
        return self.dispatch.linear(name, x, w, batch)

    def linear_group(self, names: list[str], x: torch.Tensor, w: torch.Tensor, batch) -> torch.Tensor:
        return self.dispatch.linear_group(names, x, w, batch)

    def gather1d(self, name: str, batch) -> torch.Tensor:
        return self.dispatch.gather1d(name, batch)

    def param_table(self, name: str) -> torch.Tensor:
        return self.dispatch.param_table(name)

    def embed(self, x: torch.Tensor, batch) -> torch.Tensor:
        return self.dispatch.embed(x, batch)

    def extra_logits(self, h: torch.Tensor, logits: torch.Tensor, batch) -> torch.Tensor:
        return self.dispatch.extra_logits(h, logits, batch)

    # The device pool's buffers under their first names; setting one sets the pool's (a benchmark
    # drops them to free device memory while the loader thread still holds this object).
    pools = _pool_attr("pools")
    tables = _pool_attr("tables")
    extra_embed = _pool_attr("extra_embed")
    extra_head = _pool_attr("extra_head")
    n_extra = _pool_attr("n_extra")
    col_slots = _pool_attr("col_slots")

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, model) -> None:
        # base_reference is not read again: a model set here is the same frozen base (or None, to free it)
        self._model = model
        if "pool" in self.__dict__:
            self.pool.model = model

    # ------------------------------------------------------------------ status

    def status(self) -> list[dict]:
        with self.lock:
            return [{"name": e.name, "path": e.path, "device_slot": e.slot, "in_host_memory": e.host is not None,
                     "loading": e.loading, "installing": e.ticket is not None and not e.ticket.ready(),
                     "running_requests": e.refs, "error": e.error, **e.stats}
                    for e in self.entries.values() if not e.removed]

    def resident(self) -> int:
        with self.lock:
            return sum(o is not None for o in self.slot_owner)


def _release(exc: BaseException, read: int = 0) -> None:
    """Drops the frames (and chained errors) ``exc`` holds, so the tensors a failed load read are
    freed now rather than kept alive by an error a caller logs or wraps. When the failure had read
    much (``read`` bytes), also collects reference cycles, which plain reference counting leaves:
    a full collection costs tens to hundreds of milliseconds with a model loaded, so small failures
    (most corrupt files are refused from their headers) skip it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        exc.__traceback__ = None
        exc.__cause__ = exc.__context__ = None
        exc = nxt
    if read >= _COLLECT_AFTER_BYTES:
        gc.collect()
