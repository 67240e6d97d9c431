"""A refused registration keeps no memory: crafted artifacts declaring ~1 GiB tensors (sparse files,
so the test costs no disk) are registered three times each while the process RSS is watched.

Tensors whose size does not follow from the config and the base are refused from the header,
before a byte is read; a failure after a large read (here forced by letting a huge dense tensor
through) releases what it read even while the caller still holds the error.
"""

import json
import shutil
import struct

import pytest
import torch

import bitdelta
from bitdelta.errors import BitDeltaError, FormatError
from bitdelta.safetensors_io import _DTYPE_NAMES, SafetensorsCheckpoint
from models import load, make_pair

GIB = 1 << 30
LIMIT = 200 << 20  # allowed RSS growth from the first registration to the third
Q = "model.layers.0.self_attn.q_proj"
NORM = "model.layers.1.input_layernorm.weight"


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def write_sparse(path, tensors: dict, big: dict, tail: bytes = b""):
    """A safetensors file with ``tensors`` and, after them, ``big`` (name -> (dtype, shape)) declared
    but left as a hole (truncate() extends the file); ``tail`` is written over the last bytes."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        offset += n
    for name, (dtype, shape) in big.items():
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
        f.truncate(8 + len(raw) + offset)
        if tail:
            f.seek(8 + len(raw) + offset - len(tail))
            f.write(tail)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from bitdelta.serving.model import DeltaLlama
    from bitdelta.serving.slots import DeltaSlots

    tmp = tmp_path_factory.mktemp("regmem")
    base_dir, ft_dir = make_pair("llama", tmp)
    good = tmp / "deltas" / "good"
    bitdelta.compress(base_dir, ft_dir, scale="row", progress=False).save_pretrained(good)
    slots = DeltaSlots(DeltaLlama.from_hf(load(base_dir)), max_gpu_deltas=1)
    return tmp / "deltas", good, slots


def crafted(env, name, edit_config=None, big=None, tail=b""):
    root, good, _ = env
    out = root / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(good, out)
    ckpt = SafetensorsCheckpoint.open(good, stem="delta")
    tensors = {k: ckpt.get(k) for k in ckpt.keys()}
    for k in big or {}:
        tensors.pop(k, None)
    write_sparse(out / "delta.safetensors", tensors, big or {}, tail)
    if edit_config:
        cfg = json.loads((out / "delta_config.json").read_text())
        edit_config(cfg)
        (out / "delta_config.json").write_text(json.dumps(cfg))
    return out


def _three_times(slots, path, root, expect=None):
    """Three registrations of ``path``: memory must not build up from one to the next.

    Measured from after the first: a freed large block can stay resident in the C allocator's heap
    for reuse (glibc raises its mmap threshold after freeing one), which is not a leak; keeping what
    each rejected registration read is, and grows with every attempt."""
    for i in range(3):
        if expect is None:
            slots.register(f"ok-{i}", path, root=root)
            slots.unregister(f"ok-{i}")
        else:
            with pytest.raises(expect[0], match=expect[1]):
                slots.register(f"bad-{i}", path, root=root)
        if i == 0:
            before = rss()
    grown = rss() - before
    assert grown < LIMIT, f"RSS grew by {grown / 1e6:.0f} MB over the second and third registrations"


def test_huge_dense_parameter_refused_before_reading(env):
    root, _, slots = env
    path = crafted(env, "huge-norm", big={NORM: (torch.float32, (GIB // 4,))})
    _three_times(slots, path, root, (BitDeltaError, f"{NORM} has shape \\({GIB // 4},\\)"))


def test_huge_sign_planes_refused_before_reading(env):
    root, _, slots = env
    n, k = 1 << 17, 1 << 16  # 2**17 rows x 2**16 columns of signs = 1 GiB
    path = crafted(env, "huge-signs", lambda c: c["modules"][Q].update(shape=[n, k]),
                   big={f"{Q}.sign": (torch.uint8, (1, n, k // 8)), f"{Q}.scale": (torch.float32, (1, n))})
    _three_times(slots, path, root, (BitDeltaError, f"{Q} is {n}x{k}, base is 40x40"))


def test_huge_fingerprint_refused_before_reading(env):
    root, _, slots = env
    key = "__bitdelta__.base_fingerprint_samples"
    path = crafted(env, "huge-fp", big={key: (torch.float32, (GIB // 64, 16))})
    _three_times(slots, path, root, (FormatError, "base fingerprint.*shape"))


def test_huge_unlisted_tensor_is_never_read(env):
    root, _, slots = env
    path = crafted(env, "huge-unlisted", big={"not.in.the.config": (torch.float32, (GIB // 4,))})
    _three_times(slots, path, root)


@pytest.mark.slow  # writes and reads a 256 MiB tensor three times
def test_failure_after_a_large_read_releases_it(env, monkeypatch):
    """Let a 256 MiB dense tensor (more than LIMIT, and quick to read) through the layout check: it
    is read, its last value is NaN, the load fails. pytest.raises keeps the error (as a server's
    error handler does): what it read must be gone anyway."""
    root, _, slots = env
    nan = struct.pack("<f", float("nan"))
    path = crafted(env, "huge-nan", big={NORM: (torch.float32, (GIB // 16,))}, tail=nan)
    monkeypatch.setattr(slots, "_check_layout", lambda layout, name="?": None)
    _three_times(slots, path, root, (FormatError, f"{NORM}.*NaN"))
