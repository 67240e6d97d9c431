"""Benchmark of a delta's way into host memory and onto the device: the old reader against bulk reads.

Writes a synthetic artifact-like safetensors file (sign planes and row scales of a 7B-shaped model,
scaled down to ``--mib``), or takes a real artifact (``--artifact``), and times with the page cache
dropped before every run (``posix_fadvise``; warm runs with ``--warm``):

- ``old``: one tensor after another into ordinary memory (``read_tensor``), then, on CUDA, a copy
  of each into pinned memory (what registration did before reads went straight into pinned memory);
- ``bulk-T``: :func:`bitdelta.bulk_read.read_tensors` with T threads, pinned on CUDA (nothing after);
- with ``--artifact``: ``load_delta`` (validation included) old-style and with pinned bulk reads.

On CUDA it also times a decode-like step (matmuls on the compute stream) launched right after a
delta-sized copy starts on a side stream (how installs run now) or on the compute stream (how they
ran before), against no copy: with the side stream the step should take as long as with no copy.

    python benchmarks/delta_read.py --mib 200 --threads 1,2,4,8          # CPU or GPU, seconds
    python benchmarks/delta_read.py --artifact /path/to/7b.bitdelta --threads 4,8 --out $OUT/read.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root and src/ on the path
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]

import torch

from benchmarks._common import drop_page_cache, run_and_save
from bitdelta.bulk_read import read_tensors
from bitdelta.safetensors_io import SafetensorsCheckpoint, read_tensor, save_file

# out x in of one 7B layer's matrices (q, k, v, o, gate, up, down)
LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def write_synthetic(path: Path, mib: float) -> Path:
    """Random sign planes (uint8, [1, out, in/8]) and row scales (float32, [1, out]) of 7B-shaped
    layers until ``mib`` MiB: the tensors and sizes a 1-bit artifact holds."""
    g = torch.Generator().manual_seed(0)
    tensors, total, layer = {}, 0, 0
    while total < mib * 2**20:
        for j, (n, k) in enumerate(LAYER):
            sign = torch.randint(0, 256, (1, n, k // 8), dtype=torch.uint8, generator=g)
            tensors[f"l{layer}.m{j}.sign"] = sign
            tensors[f"l{layer}.m{j}.scale"] = torch.rand(1, n, generator=g) * 1e-3 + 1e-4
            total += sign.numel() + 4 * n
        layer += 1
    save_file(tensors, path, {"format": "pt"})
    return path


def read_old(ckpt, pin: bool) -> list[torch.Tensor]:
    out = []
    for k in sorted(ckpt.keys(), key=lambda k: ckpt.entries[k].start):
        t = read_tensor(ckpt.entries[k])
        if pin:  # the registration-time copy into pinned memory
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            t = buf.copy_(t)
        out.append(t)
    return out


def read_bulk(ckpt, pin: bool, threads: int) -> list[torch.Tensor]:
    keys = sorted(ckpt.keys(), key=lambda k: ckpt.entries[k].start)
    return read_tensors([ckpt.entries[k] for k in keys], threads=threads, pin=pin)


def timed(fn, path: Path, repeats: int, warm: bool) -> float:
    times = []
    for _ in range(repeats):
        if not warm:
            drop_page_cache(path)
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    return statistics.median(times)


def decode_under_copy(nbytes: int, repeats: int = 5) -> dict:
    """Wall time until a decode-like step (a few matmuls on the compute stream) has finished, when
    the step is launched right after a copy of ``nbytes`` from pinned memory was started: no copy, the
    copy on a side stream (installs now), the copy on the compute stream (installs before)."""
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    x = torch.randn(64, 4096, device=dev, dtype=torch.float16)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream()
    compute = torch.cuda.current_stream()

    def step_after(copy: str) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        if copy == "side":
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                dst.copy_(host, non_blocking=True)
        elif copy == "main":
            dst.copy_(host, non_blocking=True)
        for _ in range(8):
            x.copy_((x @ a).clamp_(-1, 1))
        compute.synchronize()  # the step's result is ready (a side-stream copy may still run)
        out = time.perf_counter() - t
        torch.cuda.synchronize()
        return out

    out = {}
    for copy in ("none", "side", "main"):
        step_after(copy)  # warm-up
        out[f"step_ms_{copy}_copy"] = 1e3 * statistics.median(step_after(copy) for _ in range(repeats))
    return out


def run(args) -> dict:
    pin = torch.cuda.is_available() and not args.no_pin
    scratch = Path(tempfile.mkdtemp(prefix="bitdelta-read-"))
    results: dict = {"pinned": pin, "warm": args.warm, "runs": {}}
    if args.artifact:
        from bitdelta.artifact import load_delta

        art = Path(args.artifact)
        path = next(iter(sorted(art.glob("*.safetensors"))))
        results["runs"]["load_delta-old"] = timed(lambda: read_old_delta(art, pin), art, args.repeats, args.warm)
        for t in args.threads:
            results["runs"][f"load_delta-bulk-{t}"] = timed(
                lambda t=t: load_delta(art, pin_memory=pin, read_threads=t), art, args.repeats, args.warm)
        nbytes = sum(f.stat().st_size for f in art.glob("*.safetensors"))
    else:
        path = write_synthetic(scratch / "synthetic.safetensors", args.mib)
        nbytes = path.stat().st_size
    ckpt = SafetensorsCheckpoint.open(path)
    results["runs"]["old"] = timed(lambda: read_old(ckpt, pin), path, args.repeats, args.warm)
    for t in args.threads:
        results["runs"][f"bulk-{t}"] = timed(lambda t=t: read_bulk(ckpt, pin, t), path, args.repeats, args.warm)
    results["bytes"] = nbytes
    results["gbps"] = {k: nbytes / v / 1e9 for k, v in results["runs"].items()}
    if torch.cuda.is_available():
        results["decode"] = decode_under_copy(nbytes)
    for k, v in results["runs"].items():
        print(f"{k:>20}: {v:.3f} s  {results['gbps'][k]:.2f} GB/s")
    if "decode" in results:
        print("decode-like step after a copy starts, ms (no copy / side stream / compute stream): "
              + " / ".join(f"{v:.3f}" for v in results["decode"].values()))
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    return results


def read_old_delta(art: Path, pin: bool):
    """``load_delta`` as registration used it before: ordinary memory, then a pinned copy of each tensor."""
    from bitdelta.artifact import load_delta

    d = load_delta(art)
    if pin:
        for m in d.modules.values():
            m.sign, m.scale = m.sign.pin_memory(), m.scale.pin_memory()
    return d


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=200.0, help="size of the synthetic file (default 200 MiB)")
    p.add_argument("--artifact", default=None, help="a real artifact directory instead of the synthetic file")
    p.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warm", action="store_true", help="keep the page cache (memory-speed reads)")
    p.add_argument("--no-pin", action="store_true", help="ordinary memory even on CUDA")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_and_save(sys.argv[1:], parse_args, run)
