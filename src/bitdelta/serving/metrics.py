"""Server metrics in the Prometheus text format (no client library needed).

Counters per tenant (``model`` label): requests by final status, prompt and generated tokens, delta
loads and evictions; gauges: queue depth, running requests, free KV sequence slots and free blocks
of the paged KV cache, resident deltas; the engine's restarts, preemptions, and the requests it
ended for their own faults.

Label values come from the server, never from clients: a ``model`` label is a registered model name
(``known``, set by the runtime), and every other name a client sends shares :data:`UNKNOWN_MODEL`,
so the page stays small whatever names clients try.

    metrics = Metrics(); engine = Engine(..., metrics=metrics)
    text = metrics.render(engine, slots)     # GET /metrics
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable

UNKNOWN_MODEL = "__unknown__"
MAX_LABEL_CHARS = 128  # registered names are at most 128 characters (names.MAX_NAME_CHARS)


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)  # (model, status) -> n
        self.prompt_tokens = defaultdict(int)
        self.generation_tokens = defaultdict(int)
        self.http_errors = defaultdict(int)  # (model, code) -> n
        self.base_name = "base"
        self.known: Callable[[str], bool] | None = None  # whether a name is a registered model (or the base)

    def label(self, model: str) -> str:
        """``model`` when it names a registered model (or the base), else :data:`UNKNOWN_MODEL`."""
        if not isinstance(model, str) or len(model) > MAX_LABEL_CHARS:
            return UNKNOWN_MODEL
        if model == self.base_name or (self.known is not None and self.known(model)):
            return model
        return UNKNOWN_MODEL if self.known is not None else model

    def _model(self, r) -> str:
        return r.tenant or self.base_name

    def token(self, r) -> None:
        with self.lock:
            self.generation_tokens[self._model(r)] += 1

    def finished(self, r) -> None:
        with self.lock:
            self.requests[(self._model(r), r.finish_reason)] += 1
            self.prompt_tokens[self._model(r)] += len(r.prompt)

    def rejected(self, model: str, status: int) -> None:
        """Counts a refused request; an unregistered ``model`` name counts under :data:`UNKNOWN_MODEL`."""
        label = self.label(model)
        with self.lock:
            self.http_errors[(label, str(int(status)))] += 1

    def render(self, engine, slots) -> str:
        out = []

        def family(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

        with self.lock:
            reqs = sorted(self.requests.items())
            ptoks = sorted(self.prompt_tokens.items())
            gtoks = sorted(self.generation_tokens.items())
            errs = sorted(self.http_errors.items())
        family("bitdelta_requests_total", "counter", "Finished requests by model and finish reason.",
               [({"model": m, "finish_reason": s}, n) for (m, s), n in reqs])
        family("bitdelta_rejected_requests_total", "counter", "Requests refused before running, by HTTP status.",
               [({"model": m, "code": c}, n) for (m, c), n in errs])
        family("bitdelta_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [({"model": m}, n) for m, n in ptoks])
        family("bitdelta_generation_tokens_total", "counter", "Generated tokens.",
               [({"model": m}, n) for m, n in gtoks])
        st = engine.stats()
        family("bitdelta_queue_depth", "gauge", "Requests waiting to start.", [({}, st["waiting"])])
        family("bitdelta_running_requests", "gauge", "Requests in the running batch.", [({}, st["running"])])
        family("bitdelta_kv_slots_free", "gauge", "Free KV-cache sequence slots.", [({}, st["free_kv_slots"])])
        family("bitdelta_kv_slots_total", "gauge", "KV-cache sequence slots.", [({}, st["max_batch"])])
        if "kv_blocks_total" in st:
            family("bitdelta_kv_blocks_free", "gauge", "Free blocks of the paged KV cache.",
                   [({}, st["kv_blocks_free"])])
            family("bitdelta_kv_blocks_total", "gauge", "Blocks of the paged KV cache.", [({}, st["kv_blocks_total"])])
            family("bitdelta_kv_preemptions_total", "counter",
                   "Running sequences preempted (their KV blocks freed, recomputed later) when the cache ran out.",
                   [({}, st.get("preemptions", 0))])
        family("bitdelta_engine_steps_total", "counter", "Engine steps run.", [({}, st["steps"])])
        family("bitdelta_engine_restarts_total", "counter", "Engine restarts after a failure that stopped its loop.",
               [({}, st.get("restart_count", 0))])
        family("bitdelta_request_errors_total", "counter",
               "Requests ended by a failure of their own (sampling, non-finite output, a failing forward).",
               [({}, st.get("request_errors", 0))])
        family("bitdelta_engine_up", "gauge", "1 while the engine loop serves requests, 0 while it is down.",
               [({}, int(bool(getattr(engine, "alive", True))))])
        status = slots.status()
        family("bitdelta_deltas_resident", "gauge", "Deltas in device slots.", [({}, slots.resident())])
        family("bitdelta_delta_slots_total", "gauge", "Device delta slots.", [({}, slots.num_slots)])
        family("bitdelta_delta_loads_total", "counter", "Delta loads from disk, by model.",
               [({"model": s["name"]}, s["loads"]) for s in status])
        family("bitdelta_delta_evictions_total", "counter", "Delta evictions from device slots, by model.",
               [({"model": s["name"]}, s["evictions"]) for s in status])
        family("bitdelta_delta_host_evictions_total", "counter", "Delta evictions from host memory to disk, by model.",
               [({"model": s["name"]}, s["host_evictions"]) for s in status])
        family("bitdelta_delta_loads_all_total", "counter", "Delta loads, all models (incl. removed).",
               [({}, slots.totals["loads"])])
        family("bitdelta_delta_evictions_all_total", "counter", "Delta slot evictions, all models (incl. removed).",
               [({}, slots.totals["evictions"])])
        return "\n".join(out) + "\n"
