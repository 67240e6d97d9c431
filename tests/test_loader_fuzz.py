"""Fuzzed artifact loading: seeded random corruptions of a real small artifact.

Each case copies a good artifact (single-file or sharded), applies one to three random corruptions
(config fields, raw config bytes, the ``files`` list, links to a secret file outside, the
safetensors header's length/dtypes/shapes/offsets, truncation, garbage and extreme values in the
data, the shard index, files replaced by directories or FIFOs) and then loads it four ways:
``load_delta`` (then ``apply``/``unapply`` and ``merge`` against the base when it loads),
``describe_artifact`` (``inspect``) and serving registration. Every outcome must be success or a
``BitDeltaError``: never another exception, never a hang (per-case time limit), never a read
outside the artifact (every file opened is recorded through an audit hook and checked, and the
secret's bytes must not appear in anything loaded).
"""

import copy
import functools
import json
import os
import random
import shutil
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

import bitdelta
from bitdelta.artifact import load_delta
from bitdelta.errors import BitDeltaError
from bitdelta.report import describe_artifact, format_report
from models import finetune_like

CASES = 300
SEED = 20240611
CASE_SECONDS = 20  # generous: the CI machine may be shared; a hang is minutes
SECRET = b"SECRET-OUTSIDE-THE-ARTIFACT-" + bytes(range(32, 64))

_opened: list = []
_recording = False
_hooked = False


def _audit(event, args):
    if _recording and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


def _hook_opens():
    """Every open() and os.open() raises the "open" audit event; hooks cannot be removed, so this
    one is added once, when the fuzz test runs, and records only while ``_recording`` is set."""
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True


class CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CaseTimeout()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz").resolve()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    ft = finetune_like(base, seed=3)
    good = {}
    row = bitdelta.compress(base, ft, scale="row", bits=2, progress=False)
    row.files.update({"tokenizer_config.json": b'{"model_max_length": 64}',
                      "generation_config.json": b'{"eos_token_id": 1}'})
    row.save_pretrained(tmp / "good" / "single")
    good["single"] = tmp / "good" / "single"
    scalar = bitdelta.compress(base, ft, scale="col", bits=1, progress=False)
    scalar.files.update({"tokenizer_config.json": b"{}"})
    scalar.save_pretrained(tmp / "good" / "sharded", max_shard_size=6000)
    good["sharded"] = tmp / "good" / "sharded"
    assert len(list(good["sharded"].glob("delta-*.safetensors"))) > 2
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    shutil.copy(good["single"] / "delta.safetensors", outside / "delta.safetensors")

    from bitdelta.serving.model import DeltaLlama
    from bitdelta.serving.slots import DeltaSlots

    slots = DeltaSlots(DeltaLlama.from_hf(base), max_gpu_deltas=1, max_bits=2)
    for path in good.values():  # the uncorrupted artifacts pass every check
        d = load_delta(path)
        bitdelta.unapply(bitdelta.apply(base, d))
        slots.register("good", path)
        slots.unregister("good")
    return {"tmp": tmp, "good": good, "outside": outside, "base": base, "slots": slots}


# ----------------------------------------------------------------------------------- corruptions

JUNK = [None, [], {}, [1, 2], {"a": 1}, "", "x" * 5000, -1, 0, 1, 3, 2**70, -(2**70), 1.5, 1e308, float("nan"),
        float("inf"), True, False, "../../../../etc/passwd", "/etc/passwd", [[[]]], {"shape": [1]}, ["../x"],
        "linear", "row", [40, 40], [1, 1, 1]]


def _cfg(d):
    """The config as a dict, or None when an earlier corruption left none to edit."""
    p = d / "delta_config.json"
    if p.is_symlink() or not p.is_file():  # reading a FIFO would block this test itself
        return None
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _write_cfg(d, cfg):
    p = d / "delta_config.json"
    if p.is_symlink() or not p.is_file():
        return
    p.write_text(json.dumps(cfg, allow_nan=True))


def m_config_field(rng, d, w):
    cfg = _cfg(d)
    if cfg is None:
        return
    where = rng.random()
    if where < 0.4 and isinstance(cfg.get("modules"), dict) and cfg["modules"]:
        entry = cfg["modules"][rng.choice(sorted(cfg["modules"]))]
        key = rng.choice(["kind", "scale", "bits", "shape", "extra_rows", "vocab", "unknown"])
        target = entry
    elif where < 0.5 and isinstance(cfg.get("base_fingerprint"), dict):
        target, key = cfg["base_fingerprint"], rng.choice(["sha256", "num_modules", "samples_per_module"])
    else:
        target = cfg
        key = rng.choice(["format", "format_version", "modules", "base_fingerprint", "dense_parameters", "files",
                          "tied_parameters", "vocab_size", "finetuned_num_parameters", "compression", "distillation",
                          "model_type", "architectures", "packing", "base_model_name_or_path", "from_the_future"])
    if rng.random() < 0.2:
        target.pop(key, None)
    else:
        target[key] = copy.deepcopy(rng.choice(JUNK))
    _write_cfg(d, cfg)


def m_config_bytes(rng, d, w):
    p = d / "delta_config.json"
    if p.is_symlink() or not p.is_file():
        return
    data = bytearray(p.read_bytes())
    choice = rng.random()
    if choice < 0.3:
        data = data[: rng.randrange(len(data))]
    elif choice < 0.6:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice < 0.8:
        data = bytearray(b"[" * 100000)  # nesting deeper than the JSON parser's recursion
    else:  # an integer longer than Python's int-parsing limit
        data = bytearray(data.replace(b'"vocab_size": 64', b'"vocab_size": ' + b"9" * 5000))
    p.write_bytes(bytes(data))


def m_files_list(rng, d, w):
    cfg = _cfg(d) or {}
    secret = w["outside"] / "secret.txt"
    bad = rng.choice(["../outside/secret.txt", "../../outside/secret.txt", str(secret), "sub/secret.txt", "..", ".",
                      "linked.json", "adir", "delta_config.json", "README.md", "missing.json", "a\\b", "x\x00y",
                      "zero.bin", "loop.json"])
    if bad == "linked.json":
        (d / bad).symlink_to(secret)
    elif bad == "adir":
        (d / bad).mkdir()
    elif bad == "zero.bin":
        (d / bad).symlink_to("/dev/zero")
    elif bad == "loop.json":
        (d / "loop.json").symlink_to("loop2.json")
        (d / "loop2.json").symlink_to("loop.json")
    files = cfg.get("files") if isinstance(cfg.get("files"), list) else []
    cfg["files"] = files + [bad]
    _write_cfg(d, cfg)


def m_symlink(rng, d, w):
    entries = sorted(p for p in d.iterdir())
    victim = rng.choice(entries) if rng.random() < 0.7 else d / rng.choice(["tokenizer.json", "vocab.json", "extra"])
    target = rng.choice([w["outside"] / "secret.txt", w["outside"] / "delta.safetensors", w["outside"],
                         Path("/dev/zero"), Path("/etc/hostname"), d / "nonexistent"])
    if victim.is_dir() and not victim.is_symlink():
        shutil.rmtree(victim)
    elif victim.exists() or victim.is_symlink():
        victim.unlink()
    victim.symlink_to(target)


def m_file_kind(rng, d, w):
    victim = rng.choice(sorted(p for p in d.iterdir() if not p.is_symlink()))
    victim.unlink() if victim.is_file() else shutil.rmtree(victim)
    if rng.random() < 0.5:
        victim.mkdir()
    else:
        os.mkfifo(victim)  # opening a FIFO blocks: it must be refused without opening it


def _weight_files(d):
    return sorted(p for p in d.glob("delta*.safetensors") if p.is_file() and not p.is_symlink())


def _split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path, header, data):
    h = json.dumps(header, allow_nan=True).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def m_header_len(rng, d, w):
    files = _weight_files(d)
    if not files:
        return
    f = rng.choice(files)
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(raw), len(raw) + 1, 2**63, 2**64 - 1, 99_999_999,
                      rng.randrange(2**64)])
    raw[:8] = struct.pack("<Q", new)
    f.write_bytes(bytes(raw))


def m_header_entry(rng, d, w):
    files = _weight_files(d)
    if not files:
        return
    f = rng.choice(files)
    try:
        header, data = _split(f)
    except ValueError:
        return
    names = sorted(k for k in header if k != "__metadata__")
    if not names or rng.random() < 0.1:
        header["__metadata__"] = copy.deepcopy(rng.choice(JUNK))
        _join(f, header, data)
        return
    name = rng.choice(names)
    entry = header[name]
    what = rng.choice(["dtype", "shape", "data_offsets", "drop", "replace", "add"])
    if what == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X", None, 5,
                                     ["F32"]])
    elif what == "shape":
        shape = list(entry["shape"])
        entry["shape"] = rng.choice([shape[::-1], shape + [1], shape[:-1], [-1] * len(shape), [2**40, 2**40],
                                     [0], [], [1.5], ["3"], None, [float("inf")], [s * 2 for s in shape]])
    elif what == "data_offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a + 4, b + 4], [-4, b], [0, 2**62], [a], [a, b, 0],
                                            [float(a), float(b)], None, [0, 0], [a, 2**70]])
    elif what == "drop":
        del header[name]
    elif what == "replace":
        header[name] = copy.deepcopy(rng.choice(JUNK))
    else:
        header["extra." + str(rng.randrange(9))] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    _join(f, header, data)


def m_header_bytes(rng, d, w):
    files = _weight_files(d)
    if not files:
        return
    f = rng.choice(files)
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    for _ in range(rng.randint(1, 6)):
        raw[8 + rng.randrange(max(n, 1))] = rng.randrange(256)
    f.write_bytes(bytes(raw))


def m_truncate(rng, d, w):
    files = _weight_files(d)
    if files:
        f = rng.choice(files)
        raw = f.read_bytes()
        f.write_bytes(raw[: rng.randrange(len(raw))])


def m_data_bytes(rng, d, w):
    files = _weight_files(d)
    if not files:
        return
    f = rng.choice(files)
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    if len(raw) > 8 + n:
        for _ in range(rng.randint(1, 16)):
            raw[rng.randrange(8 + n, len(raw))] = rng.randrange(256)
    f.write_bytes(bytes(raw))


_EXTREMES = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e30, 65504.0, 1e-45, 0.0, 1e6]


def m_data_values(rng, d, w):
    files = _weight_files(d)
    if not files:
        return
    f = rng.choice(files)
    try:
        header, data = _split(f)
    except ValueError:
        return
    fmt = {"F32": "<f", "F16": "<e", "F64": "<d"}
    floats = sorted(k for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict) and v.get("dtype") in fmt
                    and not k.startswith("__bitdelta__"))
    if not floats:
        return
    name = rng.choice(floats)
    e = header[name]
    a, b = e["data_offsets"]
    size = struct.calcsize(fmt[e["dtype"]])
    if b - a < size:
        return
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = a + size * rng.randrange((b - a) // size)
        value = rng.choice(_EXTREMES)
        try:
            data[at:at + size] = struct.pack(fmt[e["dtype"]], value)
        except (OverflowError, struct.error):
            data[at:at + size] = struct.pack(fmt[e["dtype"]], float("inf"))
    _join(f, header, bytes(data))


def m_index(rng, d, w):
    index = d / "delta.safetensors.index.json"
    if not index.is_file() or index.is_symlink():
        return m_data_values(rng, d, w)
    data = json.loads(index.read_text())
    wm = data["weight_map"]
    key = rng.choice(sorted(wm))
    choice = rng.random()
    if choice < 0.4:
        wm[key] = rng.choice(["../outside/delta.safetensors", str(w["outside"] / "delta.safetensors"),
                              "../../x.safetensors", "missing.safetensors", "", ".", "README.md",
                              "delta_config.json", 5, None])
    elif choice < 0.6:
        data["weight_map"] = copy.deepcopy(rng.choice(JUNK))
    elif choice < 0.8:
        wm["not.a.tensor"] = wm[key]
    else:
        index.write_bytes(index.read_bytes()[: rng.randrange(40)])
        return
    index.write_text(json.dumps(data))


MUTATIONS = [m_config_field] * 5 + [m_config_bytes, m_files_list, m_files_list, m_symlink, m_symlink, m_file_kind,
                                    m_header_len, m_header_entry, m_header_entry, m_header_entry, m_header_bytes,
                                    m_truncate, m_data_bytes, m_data_values, m_data_values, m_data_values, m_index,
                                    m_index]


# ----------------------------------------------------------------------------------- the test


def _outcome(fn):
    """'ok' with the result, or 'refused' for a BitDeltaError; anything else propagates."""
    try:
        return "ok", fn()
    except BitDeltaError as e:
        return "refused", str(e)


def _check_opened(case_dir: Path, tmp: Path, outside: Path, label: str):
    for raw in _opened:
        try:
            real = Path(raw).resolve()
        except (OSError, RuntimeError):
            real = Path(os.path.abspath(raw))
        assert not real.is_relative_to(outside), f"{label}: opened {raw} outside the artifact"
        assert real != Path("/dev/zero") and real != Path("/etc/hostname"), f"{label}: opened {raw}"
        if real.is_relative_to(tmp):
            assert real.is_relative_to(case_dir), f"{label}: opened {raw}, outside {case_dir}"


@pytest.mark.slow  # hundreds of corrupted artifacts
@pytest.mark.filterwarnings("ignore:.*ignoring unknown key")  # expected for corrupted key names
def test_fuzzed_artifacts_load_or_raise_bitdelta_errors(world):
    global _recording
    _hook_opens()
    rng = random.Random(SEED)
    tmp, outside, base, slots = world["tmp"], world["outside"], world["base"], world["slots"]
    root = tmp / "cases"
    root.mkdir()
    outcomes = {"ok": 0, "refused": 0}
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    started = time.time()
    try:
        for i in range(CASES):
            kind = rng.choice(sorted(world["good"]))
            case = root / f"c{i:03d}"
            shutil.copytree(world["good"][kind], case)
            muts = [rng.choice(MUTATIONS) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)  # covers the corruptions too: no hang anywhere
            for m in muts:
                try:
                    m(rng, case, world)
                except (OSError, ValueError, IndexError, KeyError, TypeError, struct.error, RecursionError):
                    pass  # the corruption does not fit what an earlier one left (e.g. an emptied file)
            label = f"case {i} ({kind}: {', '.join(m.__name__ for m in muts)})"
            _opened.clear()
            _recording = True
            try:
                got, delta = _outcome(functools.partial(load_delta, case, root=root))
                _outcome(functools.partial(lambda c: format_report(describe_artifact(c)), case))
                reg = _outcome(functools.partial(slots.register, f"c{i}", case, root=root))
            except CaseTimeout:
                pytest.fail(f"{label}: took more than {CASE_SECONDS} s")
            except Exception as e:
                pytest.fail(f"{label}: {type(e).__name__} escaped: {e}")
            finally:
                _recording = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            _check_opened(case, tmp, outside, label)
            outcomes[got] += 1
            if reg[0] == "ok":
                slots.unregister(f"c{i}")
            if got == "ok":
                for data in delta.files.values():
                    assert SECRET not in data, f"{label}: the secret file was read"
                tensors = [m.sign for m in delta.modules.values()] + [m.scale for m in delta.modules.values()]
                tensors += list(delta.dense.values()) + [delta.fingerprint.samples]
                assert not any(SECRET in t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors
                               if t.numel()), label
                try:  # against the base: apply/unapply and merge work or refuse with a BitDeltaError
                    if _outcome(functools.partial(bitdelta.apply, base, delta))[0] == "ok":
                        bitdelta.unapply(base)
                    _outcome(functools.partial(bitdelta.merge, copy.deepcopy(base), delta))
                except Exception as e:
                    pytest.fail(f"{label}: {type(e).__name__} escaped apply/merge: {e}")
            shutil.rmtree(case)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
    # both outcomes occur: the fuzzer neither only breaks nor only leaves artifacts intact
    assert outcomes["ok"] >= 20 and outcomes["refused"] >= 100, outcomes
    assert time.time() - started < 120, "the fuzz run got slow"
