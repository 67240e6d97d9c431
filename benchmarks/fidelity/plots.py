"""The fidelity figures: recovery, KL and top-1 agreement per variant and domain (matplotlib; a
warning and no PNGs when it is not installed).

    make_plots(rows, Path("out"))    # ["fidelity_recovery.png", "fidelity_kl.png", "fidelity_top1.png"]
"""

from __future__ import annotations

from pathlib import Path

from .report import ordered_labels, variant_of
from .settings import DOMAINS
from .variants import VARIANTS

# (file, y label, value of a result, log scale, goal lines)
SPECS = [("fidelity_recovery.png", "recovery on held-out domain text (%)", lambda r: 100 * r["recovery"], False,
          [(95, "1-bit goal"), (99, "2-bit goal")]),
         ("fidelity_kl.png", "KL(fine-tune ‖ model) per token, nats (log)", lambda r: r["fidelity"]["kl"], True, []),
         ("fidelity_top1.png", "top-1 agreement with the fine-tune (%)",
          lambda r: 100 * r["fidelity"]["top1_agreement"], False, [])]


def make_plots(rows: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("WARNING: matplotlib is not installed: no PNGs written. Run --phase report on a machine with "
              "matplotlib (the JSON results are all it needs).", flush=True)
        return []
    domains = [d for d in DOMAINS if any((d, m) in rows for m in ordered_labels(rows) if variant_of(m) in VARIANTS)]
    variants = [m for m in ordered_labels(rows) if variant_of(m) in VARIANTS and any((d, m) in rows for d in domains)]
    if not domains:
        return []
    written = []
    for spec in SPECS:
        fig = bar_chart(plt, rows, domains, variants, *spec[1:])
        fig.savefig(out / spec[0], dpi=120)
        plt.close(fig)
        written.append(spec[0])
    return written


def bar_chart(plt, rows: dict, domains: list[str], variants: list[str], ylabel: str, get, logy: bool, lines):
    """One bar per (variant, domain), with dashed goal lines."""
    width = 0.8 / len(domains)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, d in enumerate(domains):
        xs = [j + (i - (len(domains) - 1) / 2) * width for j in range(len(variants))]
        ys = [get(rows[(d, m)]) if (d, m) in rows else float("nan") for m in variants]
        ax.bar(xs, ys, width, label=d)
    for y, label in lines:
        ax.axhline(y, ls="--", lw=1, color="gray")
        ax.text(-0.45, y, label, va="bottom", fontsize=8, color="gray")
    if logy:
        ax.set_yscale("log")
    elif lines:
        lows = [get(rows[(d, m)]) for d in domains for m in variants if (d, m) in rows]
        ax.set_ylim(max(0, min(lows + [90]) - 5), 101)
    ax.set_xticks(range(len(variants)), [m.replace(" (rel. lr ", "\n(rel. lr ") for m in variants], rotation=20,
                  fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title("bitdelta on SmolLM2-135M full fine-tunes: " + ylabel.split(" (")[0].split(",")[0])
    fig.tight_layout()
    return fig
