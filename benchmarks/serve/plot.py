"""The serving figure: tokens/s and p99 per-token latency against N, per mode, with the mix's memory
roofline and the merged-per-tenant model (matplotlib; skipped when it is not installed).

    plot(result, Path("serve.png"))     # False: nothing written
"""

from __future__ import annotations

from pathlib import Path

from .report import rows_by, tok


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rb = rows_by(results)
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
    merged_series(results, ns, a1, a2)
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
    fig.suptitle(f"{results['meta']['device']}; Llama-2-7B-shaped model "
                 f"({sh['layers']} layers, hidden {sh['hidden']}), "
                 f"prompt {results['meta']['prompt_len']}, {results['meta']['new_tokens']} new tokens; "
                 f"{results['meta']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def merged_series(results: dict, ns: list[int], a1, a2) -> None:
    merged = results.get("merged", {}).get("per_n", {})
    get = lambda n: merged.get(n) or merged.get(str(n))  # noqa: E731 (JSON keys are strings)
    mx = [n for n in ns if get(n)]
    if mx:
        a1.plot(mx, [get(n)["all_in_host_ram"]["tok_s"] for n in mx], "x-",
                label="merged model per tenant (all in host RAM)")
        a2.plot(mx, [get(n)["itl_ms_p99"] for n in mx], "x-", label="merged model per tenant (batch 1)")
