"""The fidelity benchmark's entry point: runs the phases ``--phase`` names (see the package docstring).

    main(["--phase", "report", "--results", "/tmp/fid/results"])      # 0, or 3: run the same eval again
"""

from __future__ import annotations

import torch

from .evaluation import phase_eval
from .prepare import phase_prepare
from .report import phase_report
from .settings import log, parse_args, setup_torch


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_torch(args)
    log(f"phase {args.phase} on {args.dev.name()} (torch {torch.__version__}); work {args.work}; data {args.data}")
    if args.phase == "report":
        return phase_report(args)
    if args.phase in ("prepare", "all"):
        phase_prepare(args)
    if args.phase in ("eval", "all"):
        deadline = log.t0 + args.budget_s if args.budget_s and args.phase == "eval" else None
        for domain in args.domains:
            rc = phase_eval(args, domain, deadline)
            if rc:
                return rc
    if args.phase == "all":
        if args.out:
            args.results = args.out
        return phase_report(args)
    return 0
