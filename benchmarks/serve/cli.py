"""The serving benchmark's flags and entry point: a measured run, or ``--report`` over earlier runs.

    python -m benchmarks.serve --smoke --out /tmp/serve-smoke
    main(["--report", "a/serve.json", "--out", "/tmp/serve"])
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .._common import RunLog
from . import __doc__ as PACKAGE_DOC
from .report import merge_results, short_table, write_outputs
from .run import main_run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=PACKAGE_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="1,8,32,64",
                    help="tenant counts; 'max' = the largest N that fits; '' = none (e.g. a Zipf run alone)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for quick runs (default: the model's)")
    ap.add_argument("--distinct", type=int, default=4, help="distinct delta artifacts written to disk")
    ap.add_argument("--skip-merged", action="store_true", help="no merged-per-tenant model in the tables")
    ap.add_argument("--skip-reference", action="store_true", help="no unfused reference-style runs")
    ap.add_argument("--skip-cold", action="store_true", help="no cold-start and pinned-copy measurements")
    ap.add_argument("--skip-full-cold", action="store_true",
                    help="no full fine-tune cold start (writing 13 GB takes a minute); the delta cold start stays")
    ap.add_argument("--ref-steps", type=int, default=16,
                    help="decode steps measured for the unfused mode (rest extrapolated)")
    ap.add_argument("--poisson-rate", type=float, default=4.0, help="requests/s of the Poisson run (0 = none)")
    ap.add_argument("--poisson-n", type=int, default=32, help="tenants (and engine batch) of the Poisson run")
    ap.add_argument("--poisson-requests", type=int, default=None,
                    help="requests of the Poisson run (default 2 x tenants)")
    ap.add_argument("--zipf-deltas", type=int, default=1000,
                    help="tenants registered for the Zipf-tenant run (0 = no Zipf run)")
    ap.add_argument("--zipf-slots", type=int, default=32, help="device delta slots (and engine batch) of the Zipf run")
    ap.add_argument("--zipf-host", type=int, default=128,
                    help="deltas the Zipf run's host LRU holds (fewer than --zipf-deltas: some load from disk)")
    ap.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of the tenants' popularity")
    ap.add_argument("--zipf-requests", type=int, default=256, help="requests of the Zipf run")
    ap.add_argument("--zipf-rate", type=float, default=4.0, help="requests/s of the Zipf run (Poisson arrivals)")
    ap.add_argument("--profile", type=int, default=1, help="1: profile one decode step of each warm-up run; 0: off")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    ap.add_argument("--reserve-tail-s", type=float, default=20.0, help="budget kept for the phases after a run")
    ap.add_argument("--reserve-gib", type=float, default=3.0, help="GPU memory kept free when sizing the largest N")
    ap.add_argument("--scratch", default=None, help="where artifacts are written (default: a temp dir, removed)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="output directory (default $OUT)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, end to end in under a minute")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="decode eagerly (default: CUDA-graph decode steps on GPU)")
    ap.add_argument("--report", nargs="+", default=None, help="serve.json files/dirs to combine into table + plot")
    ap.add_argument("--docs", default=None, help="with --report: markdown file whose serve:begin/end block is replaced")
    ap.add_argument("--docs-block", default="serve",
                    help="with --docs: the block's marker name (and the plot's file name)")
    return ap


def apply_smoke(args, ap: argparse.ArgumentParser) -> None:
    """Tiny budgets for a CPU run end to end (every phase still runs)."""
    args.ns = "1,2" if args.ns == ap.get_default("ns") else args.ns
    args.prompt_len, args.new_tokens, args.ref_steps = min(args.prompt_len, 8), min(args.new_tokens, 6), 3
    args.poisson_rate, args.poisson_n, args.poisson_requests = args.poisson_rate and 40.0, 2, 4
    args.budget_s, args.distinct = min(args.budget_s, 120), 2
    args.zipf_deltas = args.zipf_deltas and min(args.zipf_deltas, 40)
    args.zipf_slots, args.zipf_host, args.zipf_requests, args.zipf_rate = 4, 16, 16, 20.0
    torch.set_num_threads(1)  # tiny shapes: threads only contend


def check_zipf_flags(args, ap: argparse.ArgumentParser) -> None:
    if args.zipf_deltas < 0:
        ap.error("--zipf-deltas must be 0 (no Zipf run) or more")
    if args.zipf_deltas and min(args.zipf_slots, args.zipf_host, args.zipf_requests) < 1:
        ap.error("--zipf-slots, --zipf-host and --zipf-requests must be at least 1")
    if args.zipf_deltas and (args.zipf_rate <= 0 or args.zipf_s <= 0):
        ap.error("--zipf-rate and --zipf-s must be positive")


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_zipf_flags(args, ap)
    if args.report:
        result = merge_results(args.report)
        write_outputs(result, Path(args.out or "."), args.docs, args.docs_block)
        print(short_table(result))
        return
    log = RunLog()
    if args.smoke:
        apply_smoke(args, ap)
    torch.manual_seed(0)
    result = main_run(args, log)
    if args.skip_merged:
        result.pop("merged", None)
    result["log"] = log.lines
    if args.out:
        write_outputs(result, Path(args.out))
        Path(args.out, "serve.log").write_text("\n".join(log.lines) + "\n")
    print("\n" + short_table(result))
