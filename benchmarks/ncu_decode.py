"""Hardware counters of the decode delta kernel, for Nsight Compute.

Launches ``bitdelta_decode_kernel`` for one Llama-2-7B MLP shape (4096 -> 11008, row scales, 1 bit)
with B distinct tenants x 1 token, once per GEMV variant, after a warm-up launch that compiles it.
Run it under ncu to see whether the kernel is bound by memory or by instruction issue:

    ncu --clock-control none --kernel-name regex:bitdelta_decode --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis python benchmarks/ncu_decode.py --gemv 0

(one variant per process, so ``--launch-skip 1`` skips exactly the warm-up launch). ``--popc``
profiles the binary tensor-core kernel instead (``bitdelta.ops.cuda_popc``; its quantisation
prologue ``bd_popc_prep`` is a separate launch):

    ncu --clock-control none --kernel-name regex:bd_popc --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section InstructionStats python benchmarks/ncu_decode.py --popc
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script: the benchmarks package and the library

import torch  # noqa: E402

from benchmarks._common import random_linear_inputs  # noqa: E402
from bitdelta.ops import reference as ref  # noqa: E402
from bitdelta.ops import triton_ops  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemv", type=int, default=0, help="GEMV variant (config key GEMV)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--popc", action="store_true", help="the binary tensor-core kernel (CUDA only)")
    ap.add_argument("--config", default="{}", help='popc config overrides as JSON, e.g. \'{"TG": 1}\'')
    ap.add_argument("--device", default="cuda", help="cpu runs the kernel under TRITON_INTERPRET=1 (a smoke check)")
    args = ap.parse_args()
    dev = args.device
    b, n, k = args.batch, args.n, args.k
    # B tenants x 1 token each: signs [B, 1, N, K/8], row scales [B, 1, N]
    x, _, _, signs, scales, ids = random_linear_inputs(b, n, k, b, 1, "row", torch.float16, ids=list(range(b)),
                                                       device=dev)
    cfg = {**triton_ops.DEFAULT_CONFIGS["decode"], "GEMV": args.gemv}
    for _ in range(2):  # the first launch compiles; ncu profiles the second
        if args.popc:
            from bitdelta.ops import cuda_popc

            y = cuda_popc.decode_delta(x, signs, scales, "row", ids, config=json.loads(args.config))
        else:
            y = triton_ops.decode_delta(x, signs, scales, "row", ids, config=cfg)
    if dev == "cuda":
        torch.cuda.synchronize()
    # the delta alone is the reference op with a zero base weight
    want = ref.bitdelta_linear_ref(x, torch.zeros(n, k, device=dev, dtype=x.dtype), None, signs, scales, "row", ids)
    err = ((y - want.float()).norm() / want.float().norm()).item()
    name = "popc" if args.popc else f"GEMV={args.gemv}"
    print(f"{name} B={b} {k}->{n}: rel err vs reference {err:.2e}")
    if not err < (2e-2 if args.popc else 1e-2):  # popc: int8 group quantisation of x (ops/bitplane.py)
        raise SystemExit(f"{name} disagrees with the reference (rel err {err:.2e})")


if __name__ == "__main__":
    main()
