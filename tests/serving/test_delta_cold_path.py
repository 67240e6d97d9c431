"""A delta's way from disk to a device slot: the base checked against start-up samples only, tensors
read in blocks over threads (pinned on CUDA) with the reader's errors kept, and installs that make
a slot usable only once their copy has landed (a side stream on CUDA)."""

from __future__ import annotations

import shutil
import threading
import warnings

import pytest
import torch

import bitdelta
from bitdelta.artifact import load_delta
from bitdelta.bulk_read import ALIGN, plan_blocks, read_tensors
from bitdelta.errors import FormatError
from bitdelta.safetensors_io import SafetensorsCheckpoint, save_file
from bitdelta.serving import residency
from bitdelta.serving.base_reference import BaseReference
from bitdelta.serving.engine import Engine, Request, SamplingParams
from bitdelta.serving.install_ticket import InstallTicket
from bitdelta.serving.models import DeltaModel
from bitdelta.serving.residency import DeltaSlots, DeltaState


def _model(tiny_models):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DeltaModel.from_hf(AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32))


# ---------------------------------------------------------------------------------- the base check


def test_the_base_reference_is_read_once_across_registrations_and_reloads(tiny_models, delta_dir, monkeypatch):
    calls = []
    read = BaseReference.read.__func__
    monkeypatch.setattr(BaseReference, "read", classmethod(lambda cls, m: calls.append(1) or read(cls, m)))
    slots = DeltaSlots(_model(tiny_models), max_gpu_deltas=1, max_cpu_deltas=1)
    for i in range(3):
        slots.register(f"s{i}", delta_dir / "shakespeare")
        slots.register(f"g{i}", delta_dir / "gsm8k")
    assert slots.state("s0") is DeltaState.LOADING  # evicted from host memory: the next use reloads it
    assert slots.acquire("s0") is None
    for _ in range(1500):
        if slots.state("s0") is not DeltaState.LOADING:
            break
        threading.Event().wait(0.02)
    assert slots.acquire("s0") == 0 and slots.totals["loads"] == 7
    assert calls == [1]
    assert set(slots.last_load) == {"read_validate_s", "base_check_s", "host_copy_s"}


# ---------------------------------------------------------------------------------- reading


def _artifact_entries(path):
    ckpt = SafetensorsCheckpoint.open(path, stem="delta")
    keys = sorted(ckpt.keys(), key=lambda k: ckpt.entries[k].start)
    return ckpt, keys


def test_block_plan_aligns_packs_in_order_and_isolates_large_tensors():
    sizes = [5, 70, 3, 0, 200, 1, 64]
    blocks = plan_blocks(sizes, 150)
    assert [[i for i, _ in b] for b in blocks] == [[0, 1], [2, 3], [4], [5, 6]]
    for b in blocks:
        assert all(off % ALIGN == 0 for _, off in b)
        ends = [off + sizes[i] for i, off in b]
        assert all(end <= nxt for end, (_, nxt) in zip(ends, b[1:]))  # no overlap
        assert len(b) == 1 or ends[-1] <= 150
    assert plan_blocks(sizes, 0) == [[(i, 0)] for i in range(len(sizes))]


@pytest.mark.parametrize("threads,block_bytes", [(1, None), (3, None), (3, 1000), (2, 333)])
def test_bulk_reads_equal_the_single_tensor_reader(delta_dir, threads, block_bytes):
    ckpt, keys = _artifact_entries(delta_dir / "gsm8k")
    got = read_tensors([ckpt.entries[k] for k in keys], threads=threads, block_bytes=block_bytes)
    for k, t in zip(keys, got):
        want = ckpt.get(k)
        assert t.dtype == want.dtype and t.shape == want.shape and torch.equal(t, want), k
    # one allocation per planned block (tensors share one when they fit), each tensor at an aligned start
    sizes = [ckpt.entries[k].end - ckpt.entries[k].start for k in keys]
    assert len({t.untyped_storage().data_ptr() for t in got}) == len(plan_blocks(sizes, block_bytes or 0))
    assert all(t.data_ptr() % ALIGN == 0 for t in got if t.numel())
    if block_bytes == 1000:
        assert len(plan_blocks(sizes, 1000)) < len(got)


def test_threaded_pinned_style_load_equals_a_plain_load(delta_dir):
    plain = load_delta(delta_dir / "shakespeare")
    fast = load_delta(delta_dir / "shakespeare", read_threads=4)
    assert sorted(plain.modules) == sorted(fast.modules)
    for name, m in plain.modules.items():
        f = fast.modules[name]
        assert torch.equal(m.sign, f.sign) and torch.equal(m.scale, f.scale) and m.mode == f.mode
    assert sorted(plain.dense) == sorted(fast.dense)
    assert all(torch.equal(v, fast.dense[k]) for k, v in plain.dense.items())
    assert fast.fingerprint.sha256 == plain.fingerprint.sha256


def test_a_truncated_artifact_fails_with_the_same_error_threaded_or_not(corrupt_delta, tiny_models):
    with pytest.raises(FormatError) as one:
        load_delta(corrupt_delta)
    with pytest.raises(FormatError) as many:
        load_delta(corrupt_delta, read_threads=4)
    assert str(one.value) == str(many.value) and "truncated" in str(one.value)
    slots = DeltaSlots(_model(tiny_models), max_gpu_deltas=1)
    with pytest.raises(FormatError) as reg:
        slots.register("bad", corrupt_delta)
    assert str(reg.value) == str(one.value) and slots.names() == []


def test_a_file_cut_after_its_header_was_read_fails_as_a_short_read(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(37 + i, 5, generator=g) for i in range(7)}
    save_file(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    ckpt = SafetensorsCheckpoint.open(tmp_path / "x.safetensors")
    entries = [ckpt.entries[k] for k in sorted(tensors)]
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:entries[4].start + 11])  # cut inside t4
    for threads, block in ((1, None), (3, 256)):
        with pytest.raises(FormatError, match=r"x\.safetensors is truncated \(short read\); re-create or "
                                              "re-download it"):
            read_tensors(entries, threads=threads, block_bytes=block)


def test_a_wrong_dtype_in_the_header_is_still_refused_before_reading(delta_dir, tmp_path):
    from bitdelta.safetensors_io import read_header

    bad = tmp_path / "bad"
    shutil.copytree(delta_dir / "gsm8k", bad)
    f = bad / "delta.safetensors"
    entries, meta = read_header(f)
    name = next(k for k in entries if k.endswith(".scale"))
    tensors = {k: SafetensorsCheckpoint.open(f).get(k) for k in entries}
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, f, meta)
    with pytest.raises(FormatError, match=f"tensor '{name}' \\(scales\\) is int32, must be"):
        load_delta(bad, read_threads=4)


def test_host_copy_uses_the_read_tensors_or_pads_a_copy(tiny_models, delta_dir):
    delta = load_delta(delta_dir / "gsm8k", read_threads=2)
    same = DeltaSlots(_model(tiny_models), max_gpu_deltas=1).prepare(delta)
    wider = DeltaSlots(_model(tiny_models), max_gpu_deltas=1, max_bits=2).prepare(delta)
    for name, m in delta.modules.items():
        signs, scales, _ = same.modules[name]
        assert signs.data_ptr() == m.sign.data_ptr() and scales.data_ptr() == m.scale.data_ptr()  # no copy
        signs2, scales2, _ = wider.modules[name]
        assert signs2.shape[0] == 2 and torch.equal(signs2[:1], m.sign) and not signs2[1:].any()
        assert torch.equal(scales2[:1], m.scale) and not scales2[1:].any()
        assert signs2.untyped_storage().data_ptr() != m.sign.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------- install tickets


class HeldCopy:
    """Stands in for a CUDA event of a copy still in flight: completes when ``land()`` is called or a
    caller synchronizes on it."""

    def __init__(self) -> None:
        self.done = False
        self.synchronized = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synchronized += 1
        self.done = True

    def land(self) -> None:
        self.done = True


def _hold_installs(slots, monkeypatch) -> list[HeldCopy]:
    """Every install copies for real but reports its copy in flight until the test lands it."""
    held, install = [], slots.pool.install

    def held_install(slot, host):
        assert install(slot, host).ready()  # the CPU copy itself is done on return
        held.append(HeldCopy())
        return InstallTicket(held[-1])

    monkeypatch.setattr(slots.pool, "install", held_install)
    return held


def test_on_the_cpu_an_install_is_ready_at_once(tiny_models, delta_dir):
    slots = DeltaSlots(_model(tiny_models), max_gpu_deltas=1)
    slots.register("a", delta_dir / "shakespeare")
    assert slots.pool.copy_stream is None
    assert slots.acquire("a") == 0 and slots.state("a") is DeltaState.READY
    assert slots.entries["a"].ticket is None


def test_an_install_copies_only_the_host_deltas_own_tensors(tiny_models, delta_dir):
    """On CUDA an install must not block the host: every copy it makes is from the pinned tensors the
    host delta holds. A value made on the fly (``table[slot] = n`` copies ``n`` from a fresh host
    scalar) is pageable, and such a copy can wait for the whole delta's copy before it returns."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sources = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                sources.append(args[1])
            return func(*args, **(kwargs or {}))

    slots = DeltaSlots(_model(tiny_models), max_gpu_deltas=1)
    host = slots.prepare(load_delta(delta_dir / "gsm8k"))
    held = [t for signs, scales, _ in host.modules.values() for t in (signs, scales)]
    held += list(host.params1d.values()) + [t for t in (host.extra_embed, host.extra_head) if t is not None]
    own = {t.untyped_storage().data_ptr() for t in held}
    with Copies():
        slots.pool.install(0, host)
    assert len(sources) >= len(host.modules)
    assert all(src.untyped_storage().data_ptr() in own for src in sources), [tuple(s.shape) for s in sources]


def test_a_slot_in_flight_is_not_read_or_evicted_until_its_copy_lands(tiny_models, delta_dir, monkeypatch):
    slots = DeltaSlots(_model(tiny_models), max_gpu_deltas=1)
    held = _hold_installs(slots, monkeypatch)
    slots.register("a", delta_dir / "shakespeare")
    slots.register("b", delta_dir / "gsm8k")
    assert slots.acquire("a") is None and slots.state("a") is DeltaState.INSTALLING
    assert slots.status()[0]["installing"] and slots.slot_owner == ["a"]
    assert slots.acquire("b") is None  # the only slot is mid-copy: never taken from "a"
    assert slots.state("b") is DeltaState.WAITING_FOR_SLOT and slots.slot_owner == ["a"] and len(held) == 1
    held[0].land()
    assert slots.state("a") is DeltaState.READY
    assert slots.acquire("a") == 0 and slots.entries["a"].refs == 1
    slots.release("a")
    assert slots.acquire("b") is None and slots.state("b") is DeltaState.INSTALLING  # "a" evicted: idle, landed
    assert slots.acquire("b", wait=True) == 0 and held[1].synchronized == 1
    slots.release("b")
    # unloading a delta mid-copy frees its slot; the next install of that slot queues behind the copy
    assert slots.acquire("a") is None and slots.state("a") is DeltaState.INSTALLING
    assert slots.unload("a") and slots.entries["a"].ticket is None and slots.slot_owner == [None]
    # a delta whose copy landed but whom no request took (its requests were cancelled) can be evicted
    assert slots.acquire("a") is None and slots.state("a") is DeltaState.INSTALLING
    held[-1].land()
    assert slots.acquire("b") is None and slots.slot_owner == ["b"] and slots.state("a") is not DeltaState.READY


def _engine(slots, model):
    return Engine(model, slots, max_batch=4, max_len=64, kv_cache_mb=4, cuda_graphs=False)


def test_the_engine_decodes_on_while_a_delta_installs_and_admits_it_once_landed(tiny_models, delta_dir,
                                                                               monkeypatch):
    model = _model(tiny_models)
    slots = DeltaSlots(model, max_gpu_deltas=2)
    slots.register("a", delta_dir / "shakespeare")
    slots.register("b", delta_dir / "gsm8k")
    engine = _engine(slots, model)
    got: dict[str, list[int]] = {"a": [], "b": []}

    def request(tenant, n):
        return Request(prompt=[5, 9, 13, 2, 7], tenant=tenant, params=SamplingParams(max_tokens=n, temperature=0,
                                                                                   ignore_eos=True),
                       on_event=lambda ev: ev.token is not None and got[tenant].append(ev.token))

    engine.submit(request("a", 12))
    engine.step()  # nothing ran: "a" installs (CPU: at once) and prefills
    assert got["a"] and slots.state("a") is DeltaState.READY
    held = _hold_installs(slots, monkeypatch)
    rb = engine.submit(request("b", 3))
    for _ in range(3):
        before = len(got["a"])
        engine.step()
        assert len(got["a"]) == before + 1  # "a" decodes every step ...
        assert got["b"] == [] and slots.state("b") is DeltaState.INSTALLING and rb in engine.waiting  # ... "b" waits
    assert held[0].synchronized == 0  # the engine never blocked on the copy while "a" ran
    held[0].land()
    engine.step()
    assert rb in engine.running and got["b"] and slots.state("b") is DeltaState.READY
    while engine.running or engine.waiting:
        engine.step()
    assert len(got["a"]) == 12 and len(got["b"]) == 3
    # the same request with its delta installed at once gives the same tokens
    slots.unload("b")
    monkeypatch.undo()
    again = []
    engine.submit(Request(prompt=[5, 9, 13, 2, 7], tenant="b", params=SamplingParams(max_tokens=3, temperature=0,
                                                                                    ignore_eos=True),
                          on_event=lambda ev: ev.token is not None and again.append(ev.token)))
    while engine.running or engine.waiting:
        engine.step()
    assert again == got["b"]


def test_with_nothing_running_the_engine_waits_for_the_copy(tiny_models, delta_dir, monkeypatch):
    model = _model(tiny_models)
    slots = DeltaSlots(model, max_gpu_deltas=1)
    slots.register("a", delta_dir / "shakespeare")
    engine = _engine(slots, model)
    held = _hold_installs(slots, monkeypatch)
    out = []
    engine.submit(Request(prompt=[3, 4, 5], tenant="a", params=SamplingParams(max_tokens=1, temperature=0,
                                                                            ignore_eos=True),
                          on_event=lambda ev: ev.token is not None and out.append(ev.token)))
    engine.step()  # one step: installed, waited for (nobody else to serve), prefilled, first token
    assert len(out) == 1 and held[0].synchronized == 1


@pytest.mark.cuda
def test_cuda_install_copies_on_a_side_stream_and_lands(tiny_models, delta_dir):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float16).cuda()
    slots = DeltaSlots(DeltaModel.from_hf(hf), max_gpu_deltas=2)
    slots.register("a", delta_dir / "shakespeare")
    host = slots.entries["a"].host
    assert all(s.is_pinned() and c.is_pinned() for s, c, _ in host.modules.values())  # read straight into pinned
    assert slots.pool.copy_stream is not None
    ticket = slots.pool.install(1, host)
    ticket.wait()
    assert ticket.ready()
    for name, (signs, scales, is_col) in host.modules.items():
        pool = slots.pool.pools[name]
        assert torch.equal(pool["signs"][1].cpu(), signs)
        assert torch.equal(pool["col" if is_col else "row"][1].cpu(), scales)
    assert slots.acquire("a", wait=True) is not None and slots.state("a") is DeltaState.READY


class WidePool:
    """The little of a served model a DevicePool reads: one module wide enough that a slot's sign
    planes are a copy of about a GiB (tens of milliseconds), on the GPU."""

    device, dtype, hidden, embed_name = torch.device("cuda"), torch.float16, 8, "embed"
    params1d: dict = {}

    @staticmethod
    def delta_modules():
        return {"wide": (32768, 262144)}  # 32768 x 32768 bytes of signs


@pytest.mark.cuda
def test_cuda_compute_stream_does_not_wait_for_an_install():
    from bitdelta.serving.layers import DevicePool, HostDelta

    pool = DevicePool(WidePool(), num_slots=1)
    x = torch.randn(256, 256, device="cuda")
    y = x @ x  # the first matmul initialises cuBLAS (tens of ms): done before the copy starts
    torch.cuda.synchronize()
    g = torch.Generator().manual_seed(5)
    signs = torch.randint(0, 256, (1, 32768, 32768), dtype=torch.uint8, generator=g).pin_memory()
    scales = (torch.rand(1, 32768, generator=g) + 0.5).pin_memory()
    host = HostDelta({"wide": (signs, scales, False)}, {}, None, None)
    # A first install loads the kernels an install launches (zeroing the other scale table, the
    # extra-token count): loading a kernel module on first use can wait for copies in flight, which
    # is a one-time start-up cost, not the steady state this test is about.
    pool.install(0, host).wait()
    torch.cuda.synchronize()
    ticket = pool.install(0, host)
    y = x @ x  # compute-stream work queued after the install ...
    torch.cuda.current_stream().synchronize()  # ... completes while the copy is still in flight
    assert not ticket.ready()
    ticket.wait()
    assert ticket.ready() and torch.equal(y, x @ x)
    assert torch.equal(pool.pools["wide"]["signs"][0].cpu(), signs)
    assert torch.equal(pool.pools["wide"]["row"][0].cpu(), scales)


def test_registration_keeps_the_errors_of_a_wrong_base(tiny_models, tmp_path):
    wrong = tmp_path / "wrong"
    bitdelta.compress(tiny_models["shakespeare"], tiny_models["gsm8k"], scale="row", progress=False).save_pretrained(
        wrong)
    slots = DeltaSlots(_model(tiny_models), max_gpu_deltas=1, read_threads=3)
    with pytest.raises(bitdelta.errors.WrongBaseError, match="different weights"):
        slots.register("wrong", wrong)
    assert slots.names() == [] and residency.bytes_read() > 0
