"""A Ray replica's tenant evicted while it still serves, asked for again, then evicted again: Serve's
own LRU unload (``_ModelMultiplexWrapper.unload_model_lru``) runs on it both times without failing
the load that caused the eviction. No Ray cluster is started: the replica's tenant bookkeeping runs on
a replica object without an engine."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from types import SimpleNamespace

import pytest

# "ray.serve", not "ray": without Ray installed, "ray" resolves to this test folder (a namespace package)
pytest.importorskip("ray.serve", reason="scale-out tests need Ray: pip install 'bitdelta[ray]'")

from ray.serve.multiplex import _ModelMultiplexWrapper  # noqa: E402

from bitdelta.serving.ray.replica import EngineReplica, _Tenant  # noqa: E402


class _Metric:
    def inc(self, *args, **kwargs):
        pass

    observe = set = inc


def _replica(events: list):
    """An engine replica's tenant bookkeeping, with the runtime and the store recording what they are told."""
    r = object.__new__(EngineReplica.func_or_class)
    r.tenants, r.lock, r.replica_id = {}, threading.RLock(), "r0"
    r.rt = SimpleNamespace(unregister=lambda name: events.append(("unregister", name)), shutdown=lambda: None)
    r.store = SimpleNamespace(release=lambda name, path: events.append(("release", name)), close=lambda: None)
    return r


def _serve_evicts(tenant: _Tenant) -> None:
    """Serve's least-recently-used unload of ``tenant``, run by Serve's own code."""
    wrapper = SimpleNamespace(models=OrderedDict({tenant.name: tenant}), models_unload_counter=_Metric(),
                              model_unload_latency_ms=_Metric(), registered_model_gauge=_Metric())
    asyncio.run(_ModelMultiplexWrapper.unload_model_lru(wrapper))


def test_a_tenant_revived_after_eviction_can_be_evicted_again():
    events = []
    r = _replica(events)
    t = _Tenant(r, "a", "/store/a")
    r.tenants["a"] = t
    t.refs = 1  # one request still running on it
    _serve_evicts(t)
    assert t.evicted and not t.gone and events == []  # kept until its request ends
    assert asyncio.run(r._load("a")) is t and not t.evicted  # asked for again meanwhile: the same tenant
    _serve_evicts(t)  # a second eviction of the revived tenant
    assert t.evicted and not t.gone and events == []
    r._release(t)  # its request ends: now it goes
    assert t.gone and "a" not in r.tenants and events == [("unregister", "a"), ("release", "a")]


def test_a_tenant_no_request_holds_goes_at_its_first_eviction():
    events = []
    r = _replica(events)
    t = _Tenant(r, "b", "/store/b")
    r.tenants["b"] = t
    _serve_evicts(t)
    assert t.gone and r.tenants == {} and events == [("unregister", "b"), ("release", "b")]
