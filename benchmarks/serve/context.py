"""What every phase of a serving benchmark run is handed: the settings, the device, the log, the
deadline and the result being filled (no module globals), plus what setup built and measured.

    run = BenchRun(args, BenchDevice("cuda"), RunLog(), deadline, {"meta": meta, "runs": [], "skipped": []})
    run.guarded("bitdelta N=8", lambda: ...)     # a failed phase is recorded; the run goes on
    run.checkpoint()                             # serve.json with what is measured so far
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .._common import BenchDevice, RunLog


@dataclass
class BenchRun:
    args: argparse.Namespace  # the command's flags (cli.py)
    dev: BenchDevice
    log: RunLog
    deadline: float  # time.perf_counter() value past which decode is cut short
    result: dict  # meta, runs, skipped, errors, ...: what serve.json holds

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def skip(self, what: str) -> None:
        self.result["skipped"].append(what)

    def guarded(self, what: str, fn) -> None:
        """Runs one phase; a failure is logged and recorded, and the run goes on with the next phase."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (a benchmark reports what it could measure)
            self.log(f"FAILED {what}: {type(e).__name__}: {e}")
            self.result.setdefault("errors", []).append({"phase": what, "error": f"{type(e).__name__}: {e}",
                                                         "traceback": traceback.format_exc()[-3000:]})
        self.dev.free_memory()  # after the except block, whose traceback kept the failed phase's tensors alive

    def checkpoint(self) -> None:
        """Writes what is measured so far (a run killed at its time limit still leaves its numbers)."""
        if self.args.out:
            Path(self.args.out).mkdir(parents=True, exist_ok=True)
            Path(self.args.out, "serve.json").write_text(json.dumps({**self.result, "log": self.log.lines}, indent=1,
                                                                    default=str))


@dataclass
class Served:
    """The base, its measured costs and (after setup) the delta pool with every tenant installed."""

    model: object  # bitdelta.serving.model.DeltaLlama
    bw: float  # measured device copy bandwidth, GB/s
    base_bytes: int
    paths: list[Path] = field(default_factory=list)  # artifacts: the distinct ones, then one never loaded
    slot_bytes: int = 0  # device bytes of one delta slot
    terms: dict = field(default_factory=dict)  # roofline terms (_common.roofline_terms)
    slots: object = None  # DeltaSlots holding every tenant
    tenants: list[str] = field(default_factory=list)
