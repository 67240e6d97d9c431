"""Tables, goals and the plot of ``benchmarks/serve.py`` results (CPU only; matplotlib optional).

Reads one or more ``serve.json`` files (several GPU runs, e.g. small N and large N, are merged: the
later file wins for the same mode and N) and writes ``serve.md`` and ``serve.png``; optionally
replaces the block between ``<!-- serve:begin -->`` and ``<!-- serve:end -->`` of a docs file.

    python benchmarks/serve.py --report a/serve.json b/ --out /tmp/serve --docs docs/benchmarks.md
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path


def rows_by(result: dict) -> dict:
    return {(r["mode"], r["n"]): r for r in result["runs"]}


def tok(r):
    return None if r is None else (r.get("est_tok_s") or r.get("tok_s"))


def goals(result: dict) -> list[str]:
    rb, out = rows_by(result), []
    merged = result.get("merged", {}).get("per_n", {})
    for (mode, n), r in sorted(rb.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if mode == "bitdelta" and r.get("roofline"):
            p = r["roofline"]["pct"]
            out.append(f"N={n}: decode at {p:.1f}% of the mix's memory roofline (goal >= 85%): {'met' if p >= 85 else 'NOT met'}")
    r32, b32 = rb.get(("bitdelta", 32)), rb.get(("base", 32))
    m32 = merged.get(32) or merged.get("32")
    if r32 and m32:
        ratio = tok(r32) / m32["all_in_host_ram"]["tok_s"]
        out.append(f"N=32: {ratio:.1f}x the merged-per-tenant throughput (all fine-tunes in host RAM; goal >= 8x): "
                   f"{'met' if ratio >= 8 else 'NOT met'}; {tok(r32) / m32['this_machine']['tok_s']:.1f}x on this machine's host RAM/disk")
    if r32 and b32 and r32.get("tpot_ms_p50") and b32.get("tpot_ms_p50"):
        ratio = r32["tpot_ms_p50"] / b32["tpot_ms_p50"]
        out.append(f"N=32: per-user decode latency (p50 time per output token) {ratio:.2f}x base alone with the same batch "
                   f"(goal <= 3.5x): {'met' if ratio <= 3.5 else 'NOT met'}")
    dc = result.get("delta_cold")
    if dc:
        out.append(f"cold start {dc['cold_start_s']:.2f}s (goal <= 1.5 s): {'met' if dc['cold_start_s'] <= 1.5 else 'NOT met'}")
    return out


def markdown(result: dict) -> str:
    m, rb = result["meta"], rows_by(result)
    merged = result.get("merged", {})
    gb = lambda b: f"{b / 1e9:.1f}" if b else "–"  # noqa: E731
    f = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    ns = sorted({n for (mode, n) in rb if mode in ("bitdelta", "base", "unfused")})
    lines = [f"Device: {m['device']}; torch {m['torch']}, triton {m['triton']}; {m['date']}. "
             f"Copy bandwidth in the run: {m['copy_gbps']:.0f} GB/s. Base {m['base_bytes'] / 1e9:.2f} GB, "
             f"one delta slot {m['slot_bytes'] / 1e9:.3f} GB, KV {m['kv_bytes_per_seq'] / 1e6:.0f} MB per sequence; "
             f"largest N that fits: {m['nmax']}. Prompt {m['prompt_len']}, {m['new_tokens']} new tokens, "
             f"every request a distinct tenant, all submitted at once.", "",
             "| N | bitdelta tok/s | % of mix roofline | base alone tok/s | unfused ref-style tok/s | merged/tenant tok/s "
             "(all in RAM / this host) | bitdelta ÷ merged | TTFT p50/p99 ms | ITL p50/p99 ms | base ITL p50/p99 ms | "
             "TPOT ÷ base | GPU GB base / deltas / KV |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def tok_cell(run) -> str:
        if run and not run.get("decode_steps") and run.get("truncated"):
            return "–†"  # cut before any decode step: tokens over wall time would mean nothing
        return f(tok(run)) + ("*" if run and run.get("extrapolated") else "")

    for n in ns:
        r, b, u = rb.get(("bitdelta", n)), rb.get(("base", n)), rb.get(("unfused", n))
        mg = merged.get("per_n", {}).get(n) or merged.get("per_n", {}).get(str(n))
        mt = (mg["all_in_host_ram"]["tok_s"], mg["this_machine"]["tok_s"]) if mg else (None, None)
        lat = (r["tpot_ms_p50"] / b["tpot_ms_p50"]) if r and b and r.get("tpot_ms_p50") and b.get("tpot_ms_p50") else None
        lines.append(
            f"| {n} | {tok_cell(r)} | {f((r or {}).get('roofline', {}).get('pct'))} "
            f"| {f(tok(b))} | {tok_cell(u)} | {f(mt[0])} / {f(mt[1])} "
            f"| {f(tok(r) / mt[0]) if r and mt[0] else '–'}× | {f((r or {}).get('ttft_ms_p50'), 0)} / {f((r or {}).get('ttft_ms_p99'), 0)} "
            f"| {f((r or {}).get('itl_ms_p50'))} / {f((r or {}).get('itl_ms_p99'))} "
            f"| {f((b or {}).get('itl_ms_p50'))} / {f((b or {}).get('itl_ms_p99'))} | {f(lat, 2)}× "
            f"| {gb(m['base_bytes'])} / {gb((r or {}).get('delta_bytes'))} / {gb((r or {}).get('kv_cache_bytes'))} |")
    lines += ["", "\\* extrapolated: decode cut short (step limit or time budget), remaining steps at the mean measured decode step.",
              "† stopped by the time budget before its first decode step.", ""]
    ov = ["| N | mode | decode step ms (wall) | host enqueue ms | GPU busy ms (profiled step) | kernels/step | GPU time by part (ms) |",
          "|---|---|---|---|---|---|---|"]
    for n in ns:
        for mode in ("bitdelta", "base"):
            r = rb.get((mode, n))
            p = (r or {}).get("profile") or {}
            if r:
                parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(p.get("by_group_ms", {}).items(), key=lambda kv: -kv[1]))
                ov.append(f"| {n} | {mode} | {f(r.get('decode_step_ms_mean'))} | {f(r.get('host_enqueue_ms_mean'))} "
                          f"| {f(p.get('gpu_busy_ms'))} | {p.get('kernels', '–')} | {parts or '–'} |")
    lines += ["Engine overhead per decode step (GPU busy from a profiled decode step of the warm-up run, at batch N):", ""] + ov + [""]
    po = [r for r in result["runs"] if r["mode"].startswith("poisson")]
    if po:
        lines += [f"Poisson arrivals, {po[0]['rate']} requests/s, {po[0]['requests']} requests round-robin over {po[0]['n']} tenants "
                  f"(engine batch up to {po[0]['max_batch']}):", "",
                  "| mode | tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | TPOT p50/p99 ms |", "|---|---|---|---|---|"]
        for r in po:
            lines.append(f"| {r['mode']} | {f(tok(r))} | {f(r['ttft_ms_p50'], 0)} / {f(r['ttft_ms_p99'], 0)} "
                         f"| {f(r['itl_ms_p50'])} / {f(r['itl_ms_p99'])} | {f(r['tpot_ms_p50'])} / {f(r['tpot_ms_p99'])} |")
        lines.append("")
    dc, fc = result.get("delta_cold"), result.get("full_cold")
    if dc or fc:
        lines += ["Cold start (request for a never-loaded model on disk, page cache dropped, to its first token):", ""]
        if dc:
            lines.append(f"- 1-bit delta ({dc['bytes'] / 1e9:.2f} GB): **{dc['cold_start_s']:.2f} s** = read + validate "
                         f"{dc['read_validate_s']:.2f} s ({dc['read_gbps']:.2f} GB/s) + base check and host copy "
                         f"{dc['register_s']:.2f} s + slot install, prefill, first token {dc['install_prefill_first_token_s'] * 1e3:.0f} ms")
        if fc:
            lines.append(f"- full fine-tune ({fc['bytes'] / 1e9:.2f} GB, {fc['reader']}): **{fc['cold_start_s']:.2f} s** = disk -> GPU "
                         f"{fc['read_s']:.2f} s ({fc['read_gbps']:.2f} GB/s) + first token {fc['first_token_after_load_s'] * 1e3:.0f} ms; "
                         f"one pinned host -> GPU copy of it: {fc['h2d_s']:.2f} s ({fc['h2d_gbps']:.1f} GB/s)")
        lines.append("")
    if merged:
        mm = merged["measured"]
        lines += [f"Merged per tenant: {merged['resident_models']} dense models resident on the GPU, {merged['host_models']} more fit in "
                  f"host RAM; one request on one merged model takes {mm['t_request_s']:.2f} s (measured: base alone at batch 1); "
                  f"swap-in {mm['h2d_s']:.2f} s ({'measured' if mm['h2d_measured'] else 'assumed 25 GB/s'}), "
                  f"disk {mm['disk_gbps']:.2f} GB/s (measured); schedule modelled (see docs).", ""]
    lines += ["Goals:", ""] + [f"- {g}" for g in goals(result)]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    for e in result.get("errors", []):
        lines += ["", f"FAILED {e['phase']}: {e['error']}"]
    return "\n".join(lines) + "\n"


def short_table(result: dict) -> str:
    rb = rows_by(result)
    merged = result.get("merged", {}).get("per_n", {})
    out = ["N    bitdelta  %roof   base   unfused  merged(RAM/here)   TTFTp99  ITLp50/p99  baseITLp50"]
    for n in sorted({n for (mode, n) in rb if mode == "bitdelta"}):
        r, b, u = rb.get(("bitdelta", n)), rb.get(("base", n)), rb.get(("unfused", n))
        mg = merged.get(n) or merged.get(str(n))
        g = lambda v: f"{v:8.1f}" if v else "       –"  # noqa: E731
        out.append(f"{n:<4d}{g(tok(r))} {(r.get('roofline') or {}).get('pct', 0):5.1f}% {g(tok(b))} {g(tok(u))} "
                   f"{g(mg and mg['all_in_host_ram']['tok_s'])}/{g(mg and mg['this_machine']['tok_s'])} "
                   f"{(r['ttft_ms_p99'] or 0):8.0f} {(r['itl_ms_p50'] or 0):6.1f}/{(r['itl_ms_p99'] or 0):6.1f} "
                   f"{((b or {}).get('itl_ms_p50') or 0):8.1f}")
    dc, fc = result.get("delta_cold"), result.get("full_cold")
    if dc or fc:
        out.append(f"cold start: delta {dc['cold_start_s']:.2f}s" if dc else "cold start: delta –")
        if fc:
            out[-1] += f", full fine-tune {fc['cold_start_s']:.2f}s"
    out += goals(result)
    return "\n".join(out)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rb = rows_by(results)
    merged = results.get("merged", {}).get("per_n", {})
    ns = sorted({n for (mode, n) in rb if mode == "bitdelta"})
    if not ns:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("bitdelta", "bitdelta (fused)", "o-"), ("base", "base alone, same batch", "s--"),
              ("unfused", "unfused reference-style", "^-")]
    for mode, label, style in series:
        xs = [n for n in ns if (mode, n) in rb]
        if xs:
            a1.plot(xs, [tok(rb[(mode, n)]) for n in xs], style, label=label)
            a2.plot(xs, [rb[(mode, n)]["itl_ms_p99"] for n in xs], style, label=label)
    xs = [n for n in ns if rb[("bitdelta", n)].get("roofline")]
    a1.plot(xs, [rb[("bitdelta", n)]["roofline"]["roofline_tok_s"] for n in xs], ":", color="gray",
            label="memory roofline of the mix (decode)")
    mx = [n for n in ns if (merged.get(n) or merged.get(str(n)))]
    if mx:
        get = lambda n: merged.get(n) or merged.get(str(n))  # noqa: E731
        a1.plot(mx, [get(n)["all_in_host_ram"]["tok_s"] for n in mx], "x-", label="merged model per tenant (all in host RAM)")
        a2.plot(mx, [get(n)["itl_ms_p99"] for n in mx], "x-", label="merged model per tenant (batch 1)")
    for a, yl in ((a1, "tokens/s (all requests at once)"), (a2, "p99 per-token latency, ms")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xticks(ns)
        a.set_xticklabels([str(n) for n in ns])
        a.set_xlabel("N tenants (one request each)")
        a.set_ylabel(yl)
        a.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=7)
    sh = results["meta"]["shape"]
    fig.suptitle(f"{results['meta']['device']}; Llama-2-7B-shaped model ({sh['layers']} layers, hidden {sh['hidden']}), "
                 f"prompt {results['meta']['prompt_len']}, {results['meta']['new_tokens']} new tokens; "
                 f"{results['meta']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


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
        for k in ("delta_cold", "full_cold", "artifacts"):
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
    m = re.match(r"(\w+) N=(\d+):", skip)
    if m:
        return any(x["mode"] == m[1] and x["n"] == int(m[2]) for x in result["runs"])
    m = re.match(r"poisson (\w+):", skip)
    return bool(m) and any(x["mode"] == f"poisson-{m[1]}" for x in result["runs"])


def write_outputs(result: dict, out: Path, docs: str | None = None, block: str = "serve") -> None:
    """serve.json / serve.md / serve.png in ``out``; with ``docs``, the plot beside that file as
    ``{block}.png`` and the table between its ``<!-- {block}:begin -->`` and ``<!-- {block}:end -->``
    markers (one block per run that cannot be merged, e.g. runs on different GPUs)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "serve.md").write_text(md)
    png = plot(result, out / "serve.png")
    if docs:
        text = Path(docs).read_text()
        begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{docs} has no {begin} ... {end} block to replace")
        if png:
            shutil.copyfile(out / "serve.png", Path(docs).parent / f"{block}.png")
        img = f"![serving throughput and p99 latency against N]({block}.png)\n\n" if png else ""
        new = text[:text.index(begin) + len(begin)] + "\n" + img + md + text[text.index(end):]
        Path(docs).write_text(new)
        print(f"updated {docs}")
