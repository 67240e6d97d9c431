"""Tables, goals and merging of serving results (CPU only).

Reads one or more ``serve.json`` files (several GPU runs, e.g. small N and large N, are merged: the
later file wins for the same mode and N) and writes ``serve.md`` and ``serve.png``; optionally
replaces the block between ``<!-- serve:begin -->`` and ``<!-- serve:end -->`` of a docs file.

    python -m benchmarks.serve --report a/serve.json b/ --out /tmp/serve --docs docs/benchmarks.md
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .._common import replace_between


def rows_by(result: dict) -> dict:
    return {(r["mode"], r["n"]): r for r in result["runs"]}


def tok(r):
    return None if r is None else (r.get("est_tok_s") or r.get("tok_s"))


def merged_at(result: dict, n):
    per_n = result.get("merged", {}).get("per_n", {})
    return per_n.get(n) or per_n.get(str(n))  # JSON keys are strings


def _f(v, d=1) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def _gb(b) -> str:
    return f"{b / 1e9:.1f}" if b else "–"


def goals(result: dict) -> list[str]:
    """The engine goals (base alone >= 80% and bitdelta >= 85% of their rooflines, N = 32 >= 8x the
    merged-per-tenant path with TPOT <= 2.5x the base's, a lone prompt's TTFT <= 1.5x the base's,
    a delta's cold start <= 0.2 s beyond its read), each with its figure and met / NOT met."""
    rb, out = rows_by(result), []
    for (mode, n), r in sorted(rb.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if mode in ("bitdelta", "base") and r.get("roofline"):
            p, want = r["roofline"]["pct"], 85 if mode == "bitdelta" else 80
            what, whose = ("decode", "the mix's") if mode == "bitdelta" else ("base alone", "its")
            out.append(f"N={n}: {what} at {p:.1f}% of {whose} memory roofline "
                       f"(goal >= {want}%): {'met' if p >= want else 'NOT met'}")
    r32, b32 = rb.get(("bitdelta", 32)), rb.get(("base", 32))
    m32 = merged_at(result, 32)
    if r32 and m32:
        ratio = tok(r32) / m32["all_in_host_ram"]["tok_s"]
        out.append(f"N=32: {ratio:.1f}x the merged-per-tenant throughput (all fine-tunes in host RAM; goal >= 8x): "
                   f"{'met' if ratio >= 8 else 'NOT met'}; {tok(r32) / m32['this_machine']['tok_s']:.1f}x "
                   "on this machine's host RAM/disk")
    if r32 and b32 and r32.get("tpot_ms_p50") and b32.get("tpot_ms_p50"):
        ratio = r32["tpot_ms_p50"] / b32["tpot_ms_p50"]
        out.append(f"N=32: per-user decode latency (p50 time per output token) {ratio:.2f}x base alone with the "
                   f"same batch (goal <= 2.5x): {'met' if ratio <= 2.5 else 'NOT met'}")
    r1, b1 = rb.get(("bitdelta", 1)), rb.get(("base", 1))
    if r1 and b1 and r1.get("ttft_ms_p50") and b1.get("ttft_ms_p50"):
        ratio = r1["ttft_ms_p50"] / b1["ttft_ms_p50"]
        out.append(f"N=1: a lone prompt's time to first token {ratio:.2f}x the base's "
                   f"({r1['ttft_ms_p50']:.0f} / {b1['ttft_ms_p50']:.0f} ms; goal <= 1.5x): "
                   f"{'met' if ratio <= 1.5 else 'NOT met'}")
    dc = result.get("delta_cold")
    if dc:
        beyond = dc.get("beyond_read_s")
        if beyond is None:
            out.append(f"cold start {dc['cold_start_s']:.2f}s")
        else:
            out.append(f"cold start {dc['cold_start_s']:.2f}s, {beyond:.2f}s beyond reading the artifact "
                       f"(goal <= 0.2 s): {'met' if beyond <= 0.2 else 'NOT met'}")
    return out


def markdown(result: dict) -> str:
    lines = main_table(result) + overhead_table(result) + poisson_table(result) + zipf_table(result)
    lines += cold_lines(result)
    lines += merged_lines(result)
    lines += ["Goals:", ""] + [f"- {g}" for g in goals(result)]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    for e in result.get("errors", []):
        lines += ["", f"FAILED {e['phase']}: {e['error']}"]
    return "\n".join(lines) + "\n"


def measured_ns(result: dict) -> list[int]:
    return sorted({n for (mode, n) in rows_by(result) if mode in ("bitdelta", "base", "unfused")})


def tok_cell(run) -> str:
    if run and not run.get("decode_steps") and run.get("truncated"):
        return "–†"  # cut before any decode step: tokens over wall time would mean nothing
    return _f(tok(run)) + ("*" if run and run.get("extrapolated") else "")


def main_table(result: dict) -> list[str]:
    m, rb = result["meta"], rows_by(result)
    lines = [f"Device: {m['device']}; torch {m['torch']}, triton {m['triton']}; {m['date']}. "
             f"Copy bandwidth in the run: {m['copy_gbps']:.0f} GB/s. Base {m['base_bytes'] / 1e9:.2f} GB, "
             f"one delta slot {m['slot_bytes'] / 1e9:.3f} GB, KV {m['kv_bytes_per_seq'] / 1e6:.0f} MB per sequence; "
             f"largest N that fits: {m['nmax']}. Prompt {m['prompt_len']}, {m['new_tokens']} new tokens, "
             f"every request a distinct tenant, all submitted at once.", "",
             "| N | bitdelta tok/s | % of mix roofline | base alone tok/s | unfused ref-style tok/s "
             "| merged/tenant tok/s "
             "(all in RAM / this host) | bitdelta ÷ merged | TTFT p50/p99 ms | ITL p50/p99 ms | base ITL p50/p99 ms | "
             "TPOT ÷ base | GPU GB base / deltas / KV |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in measured_ns(result):
        r, b, u = rb.get(("bitdelta", n)), rb.get(("base", n)), rb.get(("unfused", n))
        mg = merged_at(result, n)
        mt = (mg["all_in_host_ram"]["tok_s"], mg["this_machine"]["tok_s"]) if mg else (None, None)
        both_tpot = r and b and r.get("tpot_ms_p50") and b.get("tpot_ms_p50")
        lat = (r["tpot_ms_p50"] / b["tpot_ms_p50"]) if both_tpot else None
        r_, b_ = r or {}, b or {}
        lines.append(
            f"| {n} | {tok_cell(r)} | {_f(r_.get('roofline', {}).get('pct'))} "
            f"| {_f(tok(b))} | {tok_cell(u)} | {_f(mt[0])} / {_f(mt[1])} "
            f"| {_f(tok(r) / mt[0]) if r and mt[0] else '–'}× "
            f"| {_f(r_.get('ttft_ms_p50'), 0)} / {_f(r_.get('ttft_ms_p99'), 0)} "
            f"| {_f(r_.get('itl_ms_p50'))} / {_f(r_.get('itl_ms_p99'))} "
            f"| {_f(b_.get('itl_ms_p50'))} / {_f(b_.get('itl_ms_p99'))} | {_f(lat, 2)}× "
            f"| {_gb(m['base_bytes'])} / {_gb(r_.get('delta_bytes'))} / {_gb(r_.get('kv_cache_bytes'))} |")
    return lines + ["", "\\* extrapolated: decode cut short (step limit or time budget), remaining steps at the mean "
                    "measured decode step.", "† stopped by the time budget before its first decode step.", ""]


def overhead_table(result: dict) -> list[str]:
    rb = rows_by(result)
    ov = ["| N | mode | decode step ms (wall) | host enqueue ms | GPU busy ms (profiled step) | kernels/step "
          "| GPU time by part (ms) |",
          "|---|---|---|---|---|---|---|"]
    for n in measured_ns(result):
        for mode in ("bitdelta", "base"):
            r = rb.get((mode, n))
            p = (r or {}).get("profile") or {}
            if r:
                by_time = sorted(p.get("by_group_ms", {}).items(), key=lambda kv: -kv[1])
                parts = ", ".join(f"{k} {v:.1f}" for k, v in by_time)
                ov.append(f"| {n} | {mode} | {_f(r.get('decode_step_ms_mean'))} | {_f(r.get('host_enqueue_ms_mean'))} "
                          f"| {_f(p.get('gpu_busy_ms'))} | {p.get('kernels', '–')} | {parts or '–'} |")
    title = "Engine overhead per decode step (GPU busy from a profiled decode step of the warm-up run, at batch N):"
    return [title, ""] + ov + [""]


def poisson_table(result: dict) -> list[str]:
    po = [r for r in result["runs"] if r["mode"].startswith("poisson")]
    if not po:
        return []
    lines = [f"Poisson arrivals, {po[0]['rate']} requests/s, {po[0]['requests']} requests round-robin over "
             f"{po[0]['n']} tenants (engine batch up to {po[0]['max_batch']}):", "",
             "| mode | tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | TPOT p50/p99 ms |", "|---|---|---|---|---|"]
    for r in po:
        lines.append(f"| {r['mode']} | {_f(tok(r))} | {_f(r['ttft_ms_p50'], 0)} / {_f(r['ttft_ms_p99'], 0)} "
                     f"| {_f(r['itl_ms_p50'])} / {_f(r['itl_ms_p99'])} "
                     f"| {_f(r['tpot_ms_p50'])} / {_f(r['tpot_ms_p99'])} |")
    return lines + [""]


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def zipf_table(result: dict) -> list[str]:
    """The Zipf-tenant run: latency by where each request's delta was when it arrived, and the hit rates."""
    z = result.get("zipf")
    if not z:
        return []
    per_s = lambda v: "–" if v is None else f"{v:.2f}/s"  # noqa: E731
    lines = [f"Zipf tenants: {z['deltas']} registered deltas (Zipf s = {z['s']:g}; {z['distinct_tenants']} of them "
             f"asked for), {z['requests']} requests at {z['rate']:g}/s (Poisson), {z['n']} device slots "
             f"(engine batch up to {z['max_batch']}), host LRU of {z['host_capacity']}; "
             f"{_f(tok(z))} tok/s{' (cut short)' if z.get('truncated') else ''}:", "",
             "| delta on arrival | requests | TTFT p50/p99 ms | TPOT p50/p99 ms |", "|---|---|---|---|",
             f"| all | {len(z['per_request'])} | {_f(z['ttft_ms_p50'], 0)} / {_f(z['ttft_ms_p99'], 0)} "
             f"| {_f(z['tpot_ms_p50'])} / {_f(z['tpot_ms_p99'])} |"]
    for label in ("device", "host", "disk", "failed"):
        g = z["by_label"].get(label)
        if g:
            lines.append(f"| {label} | {g['requests']} | {_f(g['ttft_ms_p50'], 0)} / {_f(g['ttft_ms_p99'], 0)} "
                         f"| {_f(g['tpot_ms_p50'])} / {_f(g['tpot_ms_p99'])} |")
    answered = sum(z["counts"].values())
    near = (z["counts"]["device"] + z["counts"]["host"]) / answered if answered else None
    lines += ["", f"Device-slot hit rate {_pct(z['device_hit_rate'])} (one LRU of {z['n']} predicts "
              f"{_pct(z['sim_device_hit_rate'])}); host hit rate {_pct(z['host_hit_rate'])} of the device misses "
              f"(device or host: {_pct(near)}"
              f", one LRU of the host's size predicts {_pct(z['sim_host_or_device_hit_rate'])}); "
              f"{z['disk_loads']} disk loads ({per_s(z['loads_per_s'])}), {z['slot_installs']} slot installs "
              f"({per_s(z['installs_per_s'])}). Disk loads read artifacts the page cache mostly holds "
              "(a few artifacts back every tenant).", ""]
    return lines


def cold_lines(result: dict) -> list[str]:
    dc, fc = result.get("delta_cold"), result.get("full_cold")
    if not (dc or fc):
        return []
    lines = ["Cold start (request for a never-loaded model on disk, page cache dropped, to its first token):", ""]
    if dc:
        lines.append(f"- 1-bit delta ({dc['bytes'] / 1e9:.2f} GB): **{dc['cold_start_s']:.2f} s** = read + validate "
                     f"{dc['read_validate_s']:.2f} s ({dc['read_gbps']:.2f} GB/s) + base check and host copy "
                     f"{dc['register_s']:.2f} s + slot install, prefill, first token "
                     f"{dc['install_prefill_first_token_s'] * 1e3:.0f} ms")
    if fc:
        lines.append(f"- full fine-tune ({fc['bytes'] / 1e9:.2f} GB, {fc['reader']}): "
                     f"**{fc['cold_start_s']:.2f} s** = disk -> GPU {fc['read_s']:.2f} s ({fc['read_gbps']:.2f} GB/s) "
                     f"+ first token {fc['first_token_after_load_s'] * 1e3:.0f} ms; "
                     f"one pinned host -> GPU copy of it: {fc['h2d_s']:.2f} s ({fc['h2d_gbps']:.1f} GB/s)")
    return lines + [""]


def merged_lines(result: dict) -> list[str]:
    merged = result.get("merged", {})
    if not merged:
        return []
    mm = merged["measured"]
    return [f"Merged per tenant: {merged['resident_models']} dense models resident on the GPU, "
            f"{merged['host_models']} more fit in host RAM; "
            f"one request on one merged model takes {mm['t_request_s']:.2f} s (measured: base alone at batch 1); "
            f"swap-in {mm['h2d_s']:.2f} s ({'measured' if mm['h2d_measured'] else 'assumed 25 GB/s'}), "
            f"disk {mm['disk_gbps']:.2f} GB/s (measured); schedule modelled (see docs).", ""]


def short_table(result: dict) -> str:
    rb = rows_by(result)
    out = ["N    bitdelta  %roof   base   unfused  merged(RAM/here)   TTFTp99  ITLp50/p99  baseITLp50"]
    g = lambda v: f"{v:8.1f}" if v else "       –"  # noqa: E731
    for n in sorted({n for (mode, n) in rb if mode == "bitdelta"}):
        r, b, u = rb.get(("bitdelta", n)), rb.get(("base", n)), rb.get(("unfused", n))
        mg = merged_at(result, n)
        out.append(f"{n:<4d}{g(tok(r))} {(r.get('roofline') or {}).get('pct', 0):5.1f}% {g(tok(b))} {g(tok(u))} "
                   f"{g(mg and mg['all_in_host_ram']['tok_s'])}/{g(mg and mg['this_machine']['tok_s'])} "
                   f"{(r['ttft_ms_p99'] or 0):8.0f} {(r['itl_ms_p50'] or 0):6.1f}/{(r['itl_ms_p99'] or 0):6.1f} "
                   f"{((b or {}).get('itl_ms_p50') or 0):8.1f}")
    dc, fc = result.get("delta_cold"), result.get("full_cold")
    if dc or fc:
        out.append(f"cold start: delta {dc['cold_start_s']:.2f}s" if dc else "cold start: delta –")
        if fc:
            out[-1] += f", full fine-tune {fc['cold_start_s']:.2f}s"
    z = result.get("zipf")
    if z:
        out.append(f"zipf ({z['deltas']} deltas, {z['n']} slots): {g(tok(z)).strip()} tok/s, device hits "
                   f"{_pct(z['device_hit_rate'])} (LRU predicts {_pct(z['sim_device_hit_rate'])}), TTFT p99 "
                   + ", ".join(f"{lab} {_f(v['ttft_ms_p99'], 0)}" for lab, v in z["by_label"].items()) + " ms")
    out += goals(result)
    return "\n".join(out)


def merge_results(paths: list[str]) -> dict:
    """Combines several runs' serve.json (later ones win for the same mode and N)."""
    merged = None
    for p in paths:
        p = Path(p)
        r = json.loads((p / "serve.json" if p.is_dir() else p).read_text())
        if merged is None:
            merged = r
            continue
        keep = {(x["mode"], x["n"]): x for x in merged["runs"]}
        keep.update({(x["mode"], x["n"]): x for x in r["runs"]})
        merged["runs"] = list(keep.values())
        for k in ("delta_cold", "full_cold", "artifacts", "zipf"):
            if k in r:
                merged[k] = r[k]
        if "merged" in r:
            merged.setdefault("merged", {"per_n": {}}).setdefault("per_n", {}).update(r["merged"]["per_n"])
            for k in ("measured", "resident_models", "host_models"):
                merged["merged"].setdefault(k, r["merged"][k])
        merged["skipped"] = sorted(set(merged.get("skipped", [])) | set(r.get("skipped", [])))
        merged["meta"]["argv"] = [merged["meta"]["argv"], r["meta"]["argv"]]
    if merged is not None:  # a part one run skipped and another measured is not skipped
        merged["skipped"] = [s for s in merged.get("skipped", []) if not _covered(s, merged)]
    return merged


def _covered(skip: str, result: dict) -> bool:
    if skip.startswith("full fine-tune cold start"):
        return "full_cold" in result
    if skip.startswith("zipf:"):
        return "zipf" in result
    m = re.match(r"(\w+) N=(\d+):", skip)
    if m:
        return any(x["mode"] == m[1] and x["n"] == int(m[2]) for x in result["runs"])
    m = re.match(r"poisson (\w+):", skip)
    return bool(m) and any(x["mode"] == f"poisson-{m[1]}" for x in result["runs"])


def write_outputs(result: dict, out: Path, docs: str | None = None, block: str = "serve") -> None:
    """serve.json / serve.md / serve.png in ``out``; with ``docs``, the plot beside that file as
    ``{block}.png`` and the table between its ``<!-- {block}:begin -->`` and ``<!-- {block}:end -->``
    markers (one block per run that cannot be merged, e.g. runs on different GPUs)."""
    from .plot import plot

    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "serve.md").write_text(md)
    png = plot(result, out / "serve.png")
    if docs:
        begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
        img = f"![serving throughput and p99 latency against N]({block}.png)\n\n" if png else ""
        new = replace_between(Path(docs).read_text(), begin, end, "\n" + img + md)
        if new is None:
            raise SystemExit(f"{docs} has no {begin} ... {end} block to replace")
        if png:
            shutil.copyfile(out / "serve.png", Path(docs).parent / f"{block}.png")
        Path(docs).write_text(new)
        print(f"updated {docs}")
