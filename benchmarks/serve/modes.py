"""The measured runs over the tenants' pool: the merged model's piece (base alone, batch 1), then per
N the base alone, bitdelta and the unfused reference-style mode, the delta cold start, and the
Poisson-arrival runs. Each appends its rows to the run's result; a failed one is recorded and skipped.

    merged_piece(run, served)            # -> the base-b1 row (the merged model's measured request)
    per_n_runs(run, served, ns)
"""

from __future__ import annotations

from bitdelta.serving.engine import DEFAULT_STEP_TOKENS
from bitdelta.serving.unfused import unfused_linear

from .cold import delta_cold_start
from .measure import run_workload, summary_line
from .workload import poisson_arrivals

MODES = ("base", "bitdelta", "unfused")  # the cheap one first: a long run may use up the budget


def merged_piece(run, served) -> dict:
    """One merged model serving one request (= the base at batch 1); {} if it failed."""
    single = {}

    def measure():
        run_workload(run, served.model, served.slots, [None], new_tokens=4, label="warm")
        single.update(run_workload(run, served.model, served.slots, [None], terms=served.terms, bw=served.bw,
                                   label="base-b1"))
        single["mode"], single["n"] = "base-b1", 1
        run.result["runs"].append(single)
        run.log(summary_line("merged1", 1, single))

    run.guarded("merged model, one request at batch 1", measure)
    return single


def per_n_runs(run, served, ns: list[int]) -> None:
    for n in ns:
        for mode in MODES:
            if mode == "unfused" and run.args.skip_reference:
                continue
            if run.left_s() < 10:
                run.skip(f"{mode} N={n}: time budget")
                run.log(f"skip {mode} N={n}: time budget")
                continue
            run.guarded(f"{mode} N={n}", lambda mode=mode, n=n: one_mode(run, served, mode, n))
            run.checkpoint()


def one_mode(run, served, mode: str, n: int) -> None:
    """A warm-up run (compiles every kernel shape; profiles its second decode step of all ``n``
    sequences, so it runs until every prompt is in), then the measured run of ``n`` requests, each
    its own tenant (``base``: the same batch, no deltas)."""
    args, slots = run.args, served.slots
    names = served.tenants[:n] if mode != "base" else [None] * n
    unfused = mode == "unfused"
    slots.linear_fn = unfused_linear if unfused else None
    try:
        # about the steps of the default budget the burst's prompts take, then a few with all n decoding
        prefill_steps = -(-n * args.prompt_len // DEFAULT_STEP_TOKENS)
        w = run_workload(run, served.model, slots, names, new_tokens=3 if unfused else prefill_steps + 8,
                         label="warm",
                         profile_step=1 if args.profile and not unfused else None, deadline=run.deadline)
        r = run_workload(run, served.model, slots, names, deadline=run.deadline - args.reserve_tail_s,
                         terms=served.terms, bw=served.bw, label=f"{mode}-{n}",
                         max_decode_steps=args.ref_steps if unfused else None)
    finally:
        slots.linear_fn = None
    r.update(mode=mode, n=n, delta_bytes=n * served.slot_bytes if mode != "base" else 0,
             base_bytes=served.base_bytes, profile=w["profile"])
    run.result["runs"].append(r)
    run.log(summary_line(mode, n, r))


def cold_start_run(run, served) -> None:
    """A never-loaded delta (page cache dropped) to its first token, evicting an idle tenant's slot;
    then every tenant is made resident again."""
    slots, tenants = served.slots, served.tenants
    # Every kernel shape a one-request step uses is compiled by a request of a resident tenant first.
    run_workload(run, served.model, slots, tenants[:1], new_tokens=2, label="warm")
    run.guarded("delta cold start", lambda: run.result.__setitem__(
        "delta_cold", delta_cold_start(run, served.model, slots, served.paths[-1])))
    # Back to every tenant resident: the cold one leaves, the one it evicted returns.
    if slots.get("cold-tenant") is not None:
        slots.unregister("cold-tenant")
    for name in tenants:
        if slots.get(name).slot is None:
            slots.load(name)
    run.checkpoint()


def poisson_runs(run, served, pn: int) -> None:
    """Requests arriving at ``--poisson-rate`` per second, round-robin over ``pn`` tenants, engine
    batch up to ``pn``; bitdelta, then the base alone with the same arrivals."""
    args = run.args
    nreq = args.poisson_requests or 2 * pn
    arr = poisson_arrivals(args.poisson_rate, nreq)
    for mode in ("bitdelta", "base"):
        if run.left_s() < arr[-1] + 10:
            run.skip(f"poisson {mode}: time budget")
            continue
        names = [served.tenants[i % pn] for i in range(nreq)] if mode == "bitdelta" else [None] * nreq

        def measure(mode=mode, names=names):
            r = run_workload(run, served.model, served.slots, names, arrivals=arr, max_batch=pn, terms=served.terms,
                             bw=served.bw, deadline=run.deadline - args.reserve_tail_s, label=f"poisson-{mode}")
            r.update(mode=f"poisson-{mode}", n=pn, rate=args.poisson_rate)
            run.result["runs"].append(r)
            run.log(f"poisson {args.poisson_rate}/s x {nreq} over {pn} tenants: " + summary_line(mode, pn, r))

        run.guarded(f"poisson {mode}", measure)
        run.checkpoint()
