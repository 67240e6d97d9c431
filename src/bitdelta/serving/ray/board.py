"""ReplicaBoard: the latest self-report of every engine replica, for cluster-wide metrics.

Ray Serve routes each request to one replica, so no single replica can answer for the others.
Each engine replica reports itself here every ``report_interval_s`` (its id, node, the tenants it
holds, requests served per model and its own Prometheus text); the ingress serves the collection as
``GET /v1/replicas`` (JSON) and ``GET /metrics`` (every replica's metrics with a ``replica`` label).
Reports older than ``ttl_s`` belong to replicas that are gone and are dropped.

    board = ReplicaBoard.bind()                          # one replica, no CPU reserved
    await board_handle.report.remote(snapshot)           # from each engine replica
    text = merge_prometheus({"r1": text1, "r2": text2})  # what GET /metrics returns
"""

from __future__ import annotations

import time

from ray import serve


def _with_label(sample: str, replica: str) -> str:
    """``name{a="b"} 1`` -> ``name{replica="r",a="b"} 1`` (and ``name 1`` -> ``name{replica="r"} 1``)."""
    label = f'replica="{replica}"'
    name, sep, rest = sample.partition("{")
    if sep:
        return f"{name}{{{label}{',' if not rest.startswith('}') else ''}{rest}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{label}}} {value}"


def merge_prometheus(texts: dict[str, str]) -> str:
    """One exposition from several replicas' texts: each family's HELP/TYPE once, samples labelled by replica."""
    order: list[str] = []
    header: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if family not in header:
                    header[family], samples[family] = [], []
                    order.append(family)
                if line not in header[family]:
                    header[family].append(line)
            elif line.strip() and not line.startswith("#") and family is not None:
                samples[family].append(_with_label(line, replica))
    out = []
    for family in order:
        out += header[family] + samples[family]
    return "\n".join(out) + "\n"


@serve.deployment(name="BitDeltaReplicaBoard")
class ReplicaBoard:
    def __init__(self, ttl_s: float = 15.0):
        self.ttl_s = ttl_s
        self.reports: dict[str, tuple[float, dict]] = {}

    def report(self, snapshot: dict) -> None:
        self.reports[snapshot["replica"]] = (time.monotonic(), snapshot)

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def replicas(self) -> list[dict]:
        """Live replicas' latest reports, each with ``age_s`` (seconds since it last reported)."""
        now = time.monotonic()
        self.reports = {r: (t, s) for r, (t, s) in self.reports.items() if now - t <= self.ttl_s}
        return [{**s, "age_s": round(now - t, 3)} for r, (t, s) in sorted(self.reports.items())]
