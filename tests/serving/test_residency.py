"""Residency states: what the engine asks instead of reading a delta's internals."""

from __future__ import annotations

import shutil
import time
import warnings

import torch

from bitdelta.serving.models import DeltaModel
from bitdelta.serving.residency import DeltaSlots, DeltaState


def _model(tiny_models):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DeltaModel.from_hf(AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32))


def _wait(slots, name, state, timeout=30.0):
    deadline = time.time() + timeout
    while slots.state(name) is not state:
        assert time.time() < deadline, f"{name} stayed {slots.state(name)}, expected {state}"
        time.sleep(0.02)


def test_states_through_load_evict_reload_and_failure(tiny_models, delta_dir, tmp_path):
    slots = DeltaSlots(_model(tiny_models), max_gpu_deltas=1, max_cpu_deltas=1)
    copy = tmp_path / "copy"
    shutil.copytree(delta_dir / "gsm8k", copy)
    slots.register("a", delta_dir / "shakespeare")
    assert slots.state("a") is DeltaState.WAITING_FOR_SLOT  # prepared in host memory, not yet in a delta slot
    assert slots.state("nobody") is None
    assert slots.acquire("a") == 0 and slots.state("a") is DeltaState.READY
    slots.register("b", copy)  # host memory holds one: "a" leaves it, but keeps its delta slot
    assert slots.state("a") is DeltaState.READY and slots.state("b") is DeltaState.WAITING_FOR_SLOT
    assert slots.acquire("b") is None  # the only delta slot is held by a running request of "a"
    slots.release("a")
    assert slots.acquire("b") == 0 and slots.state("a") is DeltaState.LOADING  # evicted to disk
    slots.release("b")
    assert slots.acquire("a") is None  # starts the background load
    _wait(slots, "a", DeltaState.WAITING_FOR_SLOT)
    assert slots.acquire("a") == 0 and slots.state("a") is DeltaState.READY
    slots.release("a")
    # "b" is on disk only now; its file goes bad: the reload fails and says why
    assert slots.state("b") is DeltaState.LOADING
    for f in copy.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    slots.prefetch("b")
    _wait(slots, "b", DeltaState.FAILED)
    assert str(copy) in slots.error("b")


def test_pools_hold_no_dead_state(tiny_models):
    slots = DeltaSlots(_model(tiny_models), max_gpu_deltas=2)
    for pool in slots.pools.values():
        assert set(pool) == {"signs", "row", "col", "col_slots", "k"}
