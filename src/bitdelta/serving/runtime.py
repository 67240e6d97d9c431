"""ServingRuntime: one base, its delta slots, the engine, per-tenant text handling and metrics.

What ``bitdelta serve`` builds before handing it to the HTTP app; tests build it the same way.
Deltas are registered by name (validated and base-checked at registration: a corrupt or
wrong-base artifact raises and changes nothing).

    rt = build_runtime("models/tiny/base", {"shakespeare": "deltas/shakespeare"}, config=EngineConfig(max_gpu_deltas=4))
    rt.register("gsm8k", "deltas/gsm8k")    # also what POST /v1/deltas calls
    app = create_app(rt)                     # bitdelta.serving.http.app
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BitDeltaError
from .config import EngineConfig
from .engine import Engine, check_limits
from .metrics import Metrics
from .models import DeltaModel
from .names import check_tenant_name
from .residency import DeltaSlots
from .text import TenantText

logger = logging.getLogger(__name__)


@dataclass
class ServingRuntime:
    base_name: str
    base_path: str
    model: DeltaModel
    slots: DeltaSlots
    engine: Engine
    metrics: Metrics
    texts: dict[str, TenantText] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def models(self) -> list[str]:
        return [self.base_name] + self.slots.names()

    def has(self, name: str) -> bool:
        return name == self.base_name or self.slots.get(name) is not None

    def text(self, name: str) -> TenantText:
        return self.texts[name]

    def register(self, name: str, path, delta=None, root=None) -> None:
        """Loads + checks ``path`` as tenant ``name`` (raises ``BitDeltaError`` with the reason).
        ``root``: the directory the artifact and every file it reads must lie in (``--delta-dir``)."""
        check_tenant_name(name)
        if name == self.base_name:
            raise BitDeltaError(f"{name!r} is the base model's name; pick another name for the delta")
        with self.lock:
            self._check_base_quantization(name, path, delta, root)
            self.slots.register(name, path, delta=delta, root=root)
            try:
                self.texts[name] = TenantText.load(path, fallback=self.base_path)
            except Exception as e:
                self.slots.unregister(name)
                raise BitDeltaError(f"delta {name!r}: could not load its tokenizer: {e}") from None
        logger.info("registered delta %s from %s", name, path)

    def _check_base_quantization(self, name: str, path, delta, root) -> None:
        """Refuses, before its tensors are read, a delta made against another base quantization than
        the one served (its recorded scheme; the fingerprint then checks the values)."""
        from ..artifact import read_config
        from .quant_base import refuse_other_quantization

        if delta is None and not Path(path).is_dir():
            return  # not an artifact directory: the slots say so
        info = delta.info if delta is not None else read_config(Path(path), root)
        refuse_other_quantization(info, self.model, name)

    def unregister(self, name: str) -> None:
        with self.lock:
            self.slots.unregister(name)
            self.texts.pop(name, None)
        logger.info("removed delta %s", name)

    def plan(self) -> str:
        """The start-up plan: device, dtype, memory per part and the limits chosen (one block)."""
        from .startup_plan import startup_plan

        return startup_plan(self.model, self.slots, self.engine)

    def shutdown(self) -> None:
        self.engine.shutdown()


def build_runtime(base, deltas: dict[str, str] | None = None, *, base_name: str | None = None,
                  config: EngineConfig | None = None, start: bool = True, **settings) -> ServingRuntime:
    """Loads the base (with transformers), builds the engine, registers ``deltas`` (name -> path).

    ``config``: the engine's settings (:class:`~bitdelta.serving.config.EngineConfig`); keyword
    ``settings`` override its fields (``build_runtime(base, max_batch=8)``). ``cuda_graphs``: on
    (default) captures decode graphs on CUDA and decodes eagerly, with a warning, where that is not
    possible; off never captures. ``engine_restart``: the engine restarts itself after a failure that
    stops its loop (off: it stays down, every generation request answers 503, until the process restarts)."""
    if settings.get("cuda_graphs", True) is None:  # None meant "where possible", which on (True) now says
        settings["cuda_graphs"] = True
    cfg = dataclasses.replace((config or EngineConfig()).engine_settings(), **settings)
    max_batch, max_queue = cfg.max_batch, cfg.max_queue
    from ..artifact import load_delta
    from ..hf import load_model
    from .quant_base import describe as describe_base
    from .quant_base import load_quantized_base, serves_quantized

    check_limits(max_batch, max_queue, max_step_tokens=cfg.max_step_tokens)  # before a large base's minutes
    deltas = dict(deltas or {})
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if serves_quantized(base, cfg.base_quant):  # INT8/FP8 weights, read or quantized one tensor at a time
        model = load_quantized_base(base, cfg.base_quant, dtype=cfg.load_dtype(device), device=device)
    else:
        hf = load_model(base, dtype=cfg.load_dtype(device), device=device)
        model = DeltaModel.from_hf(hf)
        del hf
    logger.info("base %s: %s", base, describe_base(model))
    loaded = {name: load_delta(path) for name, path in deltas.items()}  # fail fast on a bad startup delta
    bits = cfg.max_bits or max([1] + [m.bits for d in loaded.values() for m in d.modules.values()])
    extra = cfg.max_extra_vocab if cfg.max_extra_vocab is not None else max(
        [0] + [m.extra_rows.shape[0] for d in loaded.values() for m in d.modules.values() if m.extra_rows is not None])
    lowrank = max([cfg.max_lowrank_rank] + [m.lowrank_rank for d in loaded.values() for m in d.modules.values()])
    slots = DeltaSlots(model, max_gpu_deltas=cfg.max_gpu_deltas, max_cpu_deltas=cfg.max_cpu_deltas, max_bits=bits,
                       max_extra_vocab=extra, max_lowrank_rank=lowrank)
    metrics = Metrics()
    metrics.base_name = base_name or Path(str(base)).name or "base"
    engine = Engine(model, slots, max_batch=max_batch, max_queue=max_queue, max_len=cfg.max_model_len,
                    kv_cache_mb=cfg.kv_cache_mb, metrics=metrics, cuda_graphs=None if cfg.cuda_graphs else False,
                    auto_restart=cfg.engine_restart, max_step_tokens=cfg.max_step_tokens,
                    kv_block_size=cfg.kv_block_size)
    rt = ServingRuntime(metrics.base_name, str(base), model, slots, engine, metrics)
    metrics.known = rt.has  # metrics label registered names only: clients cannot grow the page
    rt.texts[rt.base_name] = TenantText.load(base)
    for name, path in deltas.items():
        rt.register(name, path, delta=loaded[name])
    if start:
        engine.start()
    return rt
