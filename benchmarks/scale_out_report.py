"""The scale-out measurement's arithmetic and report: hit rates from the replicas' counters, the routing
simulator's prediction for the same case, scaling efficiency, the goal checks and the markdown table.

A phase is a dict: ``name``, ``replicas``, ``zipf``, ``in_flight`` and ``load`` (the load generator's
summary), plus ``hit`` and ``sim`` for the throughput phases, or the kill phase's findings.

    hit = hit_rates(before, after)                 # {replica: {"loads", "requests"}} each
    sim = predicted_hit(64, 2, 16, 1.0, in_flight=64, max_ongoing=64)
    checks = goal_checks(phases, replicas=2); print(markdown(phases, checks))
"""

from __future__ import annotations

from benchmarks.routing_sim import simulate, zipf_weights

SCALING_GOAL = 0.9  # R replicas give at least this fraction of R times one replica's tokens/s
HIT_POINTS_GOAL = 5.0  # measured hit rate within this many percentage points of the simulation


def hit_rates(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """Per replica and in all: requests, delta loads and hit rate (1 - loads / requests) between two
    readings of the replicas' counters (``{replica: {"loads": n, "requests": n}}``)."""
    per, loads, requests = {}, 0.0, 0.0
    for rep in sorted(after):
        b = before.get(rep, {"loads": 0.0, "requests": 0.0})
        n_load, n_req = after[rep]["loads"] - b["loads"], after[rep]["requests"] - b["requests"]
        per[rep] = {"requests": n_req, "loads": n_load, "hit": 1 - n_load / n_req if n_req else None}
        loads, requests = loads + n_load, requests + n_req
    hit = 1 - loads / requests if requests else None
    return {"replicas": per, "requests": requests, "loads": loads, "hit": hit, "margin95": margin95(hit, requests)}


def margin95(hit: float | None, n: float) -> float | None:
    """Half-width of the normal 95% interval of a hit rate measured over ``n`` requests (sampling noise
    of the tenant stream)."""
    return None if hit is None or not n else 1.96 * (hit * (1 - hit) / n) ** 0.5


def predicted_hit(tenants: int, replicas: int, capacity: int, zipf_s: float, in_flight: int, max_ongoing: int,
                  requests: int = 20_000, warmup: int = 2_000, seed: int = 0) -> dict:
    """The routing simulator's hit rate for this case: Serve's multiplexed routing, and load-only routing."""
    w = zipf_weights(tenants, zipf_s)
    return {policy: simulate(policy, w, replicas, capacity, requests, warmup, in_flight, max_ongoing, seed)["hit"]
            for policy in ("multiplex", "pow2")}


def scaling_efficiency(tok_s_one: float, tok_s_many: float, replicas: int) -> float | None:
    """tok/s of R replicas over R times one replica's (1.0: perfect scaling)."""
    return tok_s_many / (replicas * tok_s_one) if tok_s_one else None


def find(phases: list[dict], replicas: int, zipf: float) -> dict | None:
    return next((p for p in phases if p["replicas"] == replicas and p["zipf"] == zipf and "hit" in p), None)


def goal_checks(phases: list[dict], replicas: int) -> list[dict]:
    """Each goal: what it asks, what was measured, and whether it holds (None when not measured)."""
    checks = []
    for zipf in sorted({p["zipf"] for p in phases if "hit" in p}):
        one, many = find(phases, 1, zipf), find(phases, replicas, zipf)
        if one and many:
            eff = scaling_efficiency(one["load"]["tok_s"], many["load"]["tok_s"], replicas)
            checks.append({"goal": f"{replicas} replicas >= {SCALING_GOAL:g} x {replicas} x 1 replica's tok/s, "
                                   f"{dist_name(zipf)}",
                           "measured": None if eff is None else f"{eff:.2f} x", "ok": None if eff is None
                           else eff >= SCALING_GOAL, "value": eff})
        for p in (one, many):
            if p and p["hit"]["hit"] is not None:
                gap = 100 * (p["hit"]["hit"] - p["sim"]["multiplex"])
                noise = 100 * (p["hit"].get("margin95") or 0)
                checks.append({"goal": f"hit rate within {HIT_POINTS_GOAL:g} points of the simulation, {p['name']}",
                               "measured": f"{100 * p['hit']['hit']:.1f}% vs {100 * p['sim']['multiplex']:.1f}% "
                                           f"({gap:+.1f} points; sampling noise ±{noise:.1f})",
                               "ok": abs(gap) <= HIT_POINTS_GOAL, "value": gap})
    steady = [p for p in phases if "hit" in p]
    if steady:
        failed = sum(p["load"]["failed_attempts"] for p in steady)
        lost = sum(p["load"]["lost"] for p in steady)
        checks.append({"goal": "no failed attempt while no replica is killed", "ok": failed == 0 and lost == 0,
                       "measured": f"{failed} failed attempts, {lost} lost", "value": failed})
    kill = next((p for p in phases if p["name"] == "kill"), None)
    if kill:
        load = kill["load"]
        others = [f for f in kill["failures"] if f[0] != kill["victim"]]
        ok = load["lost"] == 0 and load["requests_with_failures"] <= kill["in_flight_on_victim"] and not others
        checks.append({"goal": "no request lost; failed attempts only among those in flight on the killed replica",
                       "measured": f"{load['lost']} lost, {load['requests_with_failures']} failed once "
                                   f"(in flight on it: {kill['in_flight_on_victim']}; "
                                   f"failures elsewhere: {len(others)})",
                       "ok": ok, "value": load["lost"]})
        back = kill["recovery"]["recovered_after_s"]
        checks.append({"goal": "throughput back to >= 90% of before the kill", "ok": back is not None, "value": back,
                       "measured": "never" if back is None else f"after {back:.1f} s"})
        checks.append({"goal": "Serve replaces the killed replica", "ok": kill["replaced"],
                       "value": kill["replaced_after_s"],
                       "measured": f"after {kill['replaced_after_s']:.1f} s" if kill["replaced"] else "no"})
    return checks


def dist_name(zipf: float) -> str:
    return "uniform" if zipf == 0 else f"Zipf {zipf:g}"


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def phase_line(p: dict) -> str:
    """One line per finished phase, as the run prints it."""
    ld = p["load"]
    line = (f"{p['name']}: {p['replicas']} replica(s), {p['in_flight']} in flight, {ld['finished']}/{ld['requests']} "
            f"requests, {ld['tok_s']:.1f} tok/s, TTFT p50/p99 {_f(ld['ttft_ms_p50'], '.0f')}/"
            f"{_f(ld['ttft_ms_p99'], '.0f')} ms, TPOT p50/p99 {_f(ld['tpot_ms_p50'], '.1f')}/"
            f"{_f(ld['tpot_ms_p99'], '.1f')} ms")
    if ld.get("failed_attempts"):
        line += f", {ld['failed_attempts']} failed attempts ({ld['lost']} requests lost)"
    if "hit" in p:
        per = ", ".join(f"{r}: {_f(h['hit'] and 100 * h['hit'], '.0f')}%" for r, h in p["hit"]["replicas"].items())
        line += (f"; hit {_f(p['hit']['hit'] and 100 * p['hit']['hit'], '.1f')}% (per replica {per}) vs simulated "
                 f"{100 * p['sim']['multiplex']:.1f}% (load-only routing {100 * p['sim']['pow2']:.1f}%)")
    return line


def markdown(phases: list[dict], checks: list[dict]) -> str:
    """The phases' table and the goal checks' table."""
    rows = ["| phase | replicas | in flight | requests | tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
            "| hit (replicas' metrics) | hit (simulated) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        ld = p["load"]
        hit, noise = p.get("hit", {}).get("hit"), p.get("hit", {}).get("margin95")
        sim = p.get("sim", {}).get("multiplex")
        rows.append(f"| {p['name']} | {p['replicas']} | {p['in_flight']} | {ld['finished']}/{ld['requests']} "
                    f"| {ld['tok_s']:.1f} | {_f(ld['ttft_ms_p50'], '.0f')} / {_f(ld['ttft_ms_p99'], '.0f')} "
                    f"| {_f(ld['tpot_ms_p50'], '.1f')} / {_f(ld['tpot_ms_p99'], '.1f')} "
                    f"| {_f(hit and 100 * hit, '.1f')}{'%' if hit is not None else ''}"
                    f"{f' ± {100 * noise:.0f}' if noise is not None else ''} "
                    f"| {_f(sim and 100 * sim, '.1f')}{'%' if sim is not None else ''} |")
    rows += ["", "| goal | measured | met |", "|---|---|---|"]
    for c in checks:
        rows.append(f"| {c['goal']} | {c['measured']} | {'-' if c['ok'] is None else ('yes' if c['ok'] else 'NO')} |")
    return "\n".join(rows)
