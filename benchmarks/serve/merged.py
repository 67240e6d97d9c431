"""The merged-dense-model-per-tenant alternative, modelled from pieces measured in the run: one
request on one merged model (the base alone at batch 1), the pinned host -> GPU copy of a model and
the disk read rate.

    out = merged_model(result, ns, meta, single)    # per N: all fine-tunes in host RAM / this machine
"""

from __future__ import annotations

from .._common import GiB, pct


def merged_schedule(n: int, t_req: float, ttft1: float, resident: int, load_times: list[float]) -> dict:
    """Merged dense model per tenant, one request each (every request is a distinct tenant).

    Policy: the GPU serves one merged model at a time (its single request at batch 1: prefill,
    then decode; measured as the base alone at batch 1). The first ``resident`` models are on the
    GPU already; model i >= resident is copied in over one link, one copy at a time, into the
    buffer of model i - resident once that one has finished, overlapping the models running
    meanwhile (double buffering, the best case for this baseline). ``load_times[i]`` is model i's
    copy time (pinned host -> GPU, or disk -> host -> GPU).
    """
    end_prev, link_free, ends, starts = 0.0, 0.0, [], []
    for i in range(n):
        if i < resident:
            ready = 0.0
        else:
            buf_free = ends[i - resident]
            load_start = max(link_free, buf_free)
            link_free = ready = load_start + load_times[i]
        s = max(end_prev, ready)
        starts.append(s)
        end_prev = s + t_req
        ends.append(end_prev)
    ttft = [s + ttft1 for s in starts]
    return {"total_s": ends[-1], "ttft_ms_p50": 1e3 * pct(ttft, 50), "ttft_ms_p99": 1e3 * pct(ttft, 99),
            "stall_s": ends[-1] - n * t_req}


def merged_model(result: dict, ns: list[int], meta: dict, single: dict) -> dict:
    """Per N: the schedule with every fine-tune in pinned host RAM, and with what fits in this
    machine's host RAM (the rest read from disk at the measured rate)."""
    full = result.get("full_cold") or {}
    nb = meta["base_bytes"]
    t_req, ttft1 = single["wall_s"], (single["ttft_ms_p50"] or 0) / 1e3
    h2d_s = full.get("h2d_s") or nb / (25e9)
    disk_gbps = full.get("read_gbps") or (result.get("delta_cold") or {}).get("read_gbps") or 2.0
    per_seq = meta["kv_bytes_per_seq"]
    gpu = meta.get("gpu_free_at_start") or 0
    resident = max(1, int((gpu - 2 * GiB) // (nb + per_seq))) if gpu else 1
    host = meta.get("host_mem_available") or 0
    in_host = max(0, int((host - 8 * GiB) // nb))
    out = {"measured": {"t_request_s": t_req, "ttft_ms": 1e3 * ttft1, "itl_ms_p50": single["itl_ms_p50"],
                        "itl_ms_p99": single["itl_ms_p99"], "h2d_s": h2d_s, "h2d_measured": bool(full.get("h2d_s")),
                        "disk_gbps": disk_gbps},
           "resident_models": resident, "host_models": in_host, "per_n": {}}
    for n in ns:
        opt = merged_schedule(n, t_req, ttft1, resident, [h2d_s] * n)
        loads = [h2d_s if i < resident + in_host else nb / (disk_gbps * 1e9) + h2d_s for i in range(n)]
        here = merged_schedule(n, t_req, ttft1, resident, loads)
        tokens = n * single["new_tokens"]
        out["per_n"][n] = {"all_in_host_ram": {**opt, "tok_s": tokens / opt["total_s"]},
                           "this_machine": {**here, "tok_s": tokens / here["total_s"]},
                           "itl_ms_p50": single["itl_ms_p50"], "itl_ms_p99": single["itl_ms_p99"]}
    return out
