"""Hardware counters of the decode delta kernel, for Nsight Compute.

Launches ``bitdelta_decode_kernel`` for one Llama-2-7B MLP shape (4096 -> 11008, row scales, 1 bit)
with B distinct tenants x 1 token, once per GEMV variant, after a warm-up launch that compiles it.
Run it under ncu to see whether the kernel is bound by memory or by instruction issue:

    ncu --clock-control none --kernel-name regex:bitdelta_decode --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis python benchmarks/ncu_decode.py --gemv 0

(one variant per process, so ``--launch-skip 1`` skips exactly the warm-up launch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from bitdelta.ops import reference as ref  # noqa: E402
from bitdelta.ops import triton_ops  # noqa: E402
from bitdelta.pack import pack_signs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemv", type=int, default=0, help="GEMV variant (config key GEMV)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--device", default="cuda", help="cpu runs the kernel under TRITON_INTERPRET=1 (a smoke check)")
    args = ap.parse_args()
    dev = args.device
    g = torch.Generator(device=dev).manual_seed(0)
    b, n, k = args.batch, args.n, args.k
    x = torch.randn(b, k, device=dev, dtype=torch.float16, generator=g)
    signs = pack_signs(torch.rand(b, 1, n, k, device=dev, generator=g) > 0.5)  # [D, bits, N, K/8]
    scales = torch.rand(b, 1, n, device=dev, generator=g) * 1e-3 + 1e-4
    ids = torch.arange(b, device=dev, dtype=torch.int32)
    cfg = {**triton_ops.DEFAULT_CONFIGS["decode"], "GEMV": args.gemv}
    for _ in range(2):  # the first launch compiles; ncu profiles the second
        y = triton_ops.decode_delta(x, signs, scales, "row", ids, config=cfg)
    if dev == "cuda":
        torch.cuda.synchronize()
    # the delta alone is the reference op with a zero base weight
    want = ref.bitdelta_linear_ref(x, torch.zeros(n, k, device=dev, dtype=x.dtype), None, signs, scales, "row", ids)
    err = ((y - want.float()).norm() / want.float().norm()).item()
    print(f"GEMV={args.gemv} B={b} {k}->{n}: rel err vs reference {err:.2e}")
    if not err < 1e-2:
        raise SystemExit(f"GEMV {args.gemv} disagrees with the reference (rel err {err:.2e})")


if __name__ == "__main__":
    main()
