"""Phase ``report``: the fidelity table, the goal checks (design.md) and the fine-tuning record as
``fidelity.md`` (or the marked section of a docs file), from result JSONs alone (CPU is fine).

    phase_report(parse_args(["--phase", "report", "--results", "a,b", "--update-doc", "docs/benchmarks.md"]))
"""

from __future__ import annotations

import json
from pathlib import Path

from bitdelta.quant import SCHEMES

from .gguf import CHAT_PROBE
from .settings import DOMAINS, MODELS, log, run_dir
from .variants import QUANTIZED, VARIANTS

REPORT_START, REPORT_END = "<!-- fidelity-benchmark:start -->", "<!-- fidelity-benchmark:end -->"
TASK_COLUMNS = (("arc_easy", "acc", "ARC-E"), ("piqa", "acc", "PIQA"), ("hellaswag", "acc_norm", "HSwag (norm)"),
                ("winogrande", "acc", "Wino"), ("lambada_openai", "acc", "LAMBADA"))


def gb_text(n) -> str:
    return "–" if n is None else f"{n / 1e9:.2f}"


def _f(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def row_label(rec: dict) -> str:
    """The table's name for a result: the variant, marked when its scales were distilled with a relative lr.

    Base and fine-tune rows do not depend on the distillation settings, so they keep their plain names."""
    s = rec.get("settings") or {}
    marks = []
    if rec["model"] in VARIANTS and s.get("distill_lr_mode") == "relative":
        marks.append(f"rel. lr {s['distill_lr']:g}")
    if rec["model"] in VARIANTS and s.get("calibration", "generic") != "generic":
        marks.append(f"{s['calibration']} cal.")
    return f"{rec['model']} ({', '.join(marks)})" if marks else rec["model"]


def variant_of(label: str) -> str:
    return label.split(" (", 1)[0]


def read_results(folders: list[Path]) -> tuple[dict, dict | None]:
    """(domain, label) -> result from one or more folders; the first folder holding a row wins (base and
    fine-tune rows recur in every run), so list the main run first."""
    rows, prep = {}, None
    for folder in folders:
        for f in sorted(folder.glob("*__*.json")):
            rec = json.loads(f.read_text())
            if rec.get("domain") and rec.get("model"):
                rows.setdefault((rec["domain"], row_label(rec)), rec)
        if prep is None and (folder / "prepare.json").is_file():
            prep = json.loads((folder / "prepare.json").read_text())
    return rows, prep


def ordered_labels(rows: dict) -> list[str]:
    """Every label present: base, fine-tune and the variants in their usual order, each variant's
    relative-lr run right after the plain one."""
    labels = {label for _, label in rows}
    rank = {m: i for i, m in enumerate(MODELS)}
    return sorted(labels, key=lambda lab: (rank.get(variant_of(lab), len(rank)), lab != variant_of(lab), lab))


def table_lines(rows: dict) -> list[str]:
    head = ["domain", "model", "held-out ppl", "recovery", "KL(ft‖·)", "top-1", "greedy exact", "GSM8K acc",
            "WikiText-2 ppl",
            *[t[2] for t in TASK_COLUMNS], "delta MB", "factor", "compress s", "distill s",
            "peak GPU GB build / eval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for domain in DOMAINS:
        for model in ordered_labels(rows):
            r = rows.get((domain, model))
            if r is not None:
                lines.append("| " + " | ".join(table_cells(domain, model, r)) + " |")
    return lines


def table_cells(domain: str, model: str, r: dict) -> list[str]:
    fid, d = r.get("fidelity") or {}, r.get("delta") or {}
    tasks = r.get("tasks") or {}
    return [domain, model, _f(r.get("heldout_ppl"), ".3f"),
            _f(None if r.get("recovery") is None else 100 * r["recovery"], ".1f")
            + ("%" if r.get("recovery") is not None else ""),
            _f(fid.get("kl"), ".3g"),
            _f(None if fid.get("top1_agreement") is None else 100 * fid["top1_agreement"], ".1f"),
            _f(None if not r.get("greedy_agreement") else 100 * r["greedy_agreement"]["exact_match"], ".0f"),
            _f(None if not r.get("gsm8k") else 100 * r["gsm8k"]["accuracy"], ".1f"),
            _f((r.get("wikitext") or {}).get("ppl"), ".2f"),
            *[_f(None if tasks.get(t) is None else 100 * (tasks[t].get(m) or 0.0), ".1f") for t, m, _ in TASK_COLUMNS],
            _f(None if not d else d["weight_bytes"] / 1e6, ".2f"),
            _f(d.get("compression_factor_weights_only"), ".1f") + ("×" if d else ""),
            _f(r.get("compress_s"), ".1f"), _f(r.get("distill_s"), ".1f"),
            f"{gb_text(r.get('peak_gpu_build_bytes'))} / {gb_text(r.get('peak_gpu_eval_bytes'))}"]


def goal_checks(rows: dict) -> list[str]:
    """design.md's fidelity goals, per domain."""
    out = []
    for domain in DOMAINS:
        rec = {m: rows[(domain, m)]["recovery"] for m in VARIANTS if (domain, m) in rows}
        if not rec:  # only rows with marks (relative lr, calibration): the current goals alone
            goals = round_goals(rows, domain)
            if goals:
                out += [f"- **{domain}**:", *goals]
            continue
        checks = plain_checks(rows, domain, rec)
        out.append(f"- **{domain}**:" + (" " + "; ".join(checks) if checks else ""))
        out += round_goals(rows, domain)
    return out


def plain_checks(rows: dict, domain: str, rec: dict) -> list[str]:
    """The first round's goals on the plain rows (recovery by variant in ``rec``), then the relative-lr rows;
    the rows on a quantized model have their own goal (``round_goals``)."""
    kl = {m: rows[(domain, m)]["fidelity"]["kl"] for m in VARIANTS if (domain, m) in rows}
    checks = []
    one_bit = {m: v for m, v in rec.items() if m not in ("auto-2bit", "reference", *QUANTIZED)}
    if one_bit:
        best = max(one_bit, key=one_bit.get)
        checks.append(f"1-bit recovery ≥ 95%: best {best} {one_bit[best]:.1%} "
                      f"{'PASS' if one_bit[best] >= 0.95 else 'FAIL'}"
                      + (f" (auto {rec['auto']:.1%})" if "auto" in rec and best != "auto" else ""))
    if "auto-2bit" in rec:
        checks.append(f"2-bit recovery ≥ 99%: {rec['auto-2bit']:.1%} {'PASS' if rec['auto-2bit'] >= 0.99 else 'FAIL'}")
    if "scalar" in rec and "scalar-initial" in rec:
        ok = rec["scalar"] > rec["scalar-initial"] and kl["scalar"] < kl["scalar-initial"]
        checks.append(f"distilled > initial: recovery {rec['scalar-initial']:.1%} -> {rec['scalar']:.1%}, "
                      f"KL {kl['scalar-initial']:.4f} -> {kl['scalar']:.4f} {'PASS' if ok else 'FAIL'}")
    if "auto" in rec and "scalar" in rec:
        ok = rec["auto"] >= rec["scalar"] and kl["auto"] <= kl["scalar"]
        checks.append(f"auto ≥ scalar: recovery {rec['auto']:.1%} vs {rec['scalar']:.1%}, KL {kl['auto']:.4f} vs "
                      f"{kl['scalar']:.4f} {'PASS' if ok else 'FAIL'}")
    if "reference" in rec and "auto" in rec:
        dr, da = rows[(domain, "reference")]["delta"], rows[(domain, "auto")]["delta"]
        checks.append(f"vs reference recipe: recovery {rec['reference']:.1%} at {dr['weight_bytes'] / 1e6:.1f} MB; "
                      f"auto {rec['auto']:.1%} at {da['weight_bytes'] / 1e6:.1f} MB")
    relative = [lab for lab in ordered_labels(rows)
                if lab != variant_of(lab) and (domain, lab) in rows and variant_of(lab) not in QUANTIZED]
    if relative:
        parts = []
        for lab in relative:
            r = rows[(domain, lab)]["recovery"]
            goal = 0.99 if variant_of(lab) == "auto-2bit" else 0.95
            parts.append(f"{lab} {r:.1%} {'PASS' if r >= goal else 'FAIL'} (≥ {goal:.0%})")
        checks.append("relative lr: " + ", ".join(parts))
    return checks


def round_goals(rows: dict, domain: str) -> list[str]:
    """design.md's current goals, per group of rows distilled with the same settings (same label marks):
    best 1-bit ≥ 99%, 2-bit ≥ 99.5%, auto ≥ the best of scalar/row/col − 0.2 points, and per scheme the
    quantized base + Δ within 1 point of the fp32 base + Δ (``scalar``, the same recipe)."""
    groups: dict[str, dict] = {}
    for (d, label), r in rows.items():
        if d == domain and variant_of(label) in VARIANTS and r.get("recovery") is not None:
            groups.setdefault(label[len(variant_of(label)):], {})[variant_of(label)] = r["recovery"]
    out = []
    for marks, rec in sorted(groups.items()):
        checks = []
        single = {m: rec[m] for m in ("scalar", "row", "col") if m in rec}
        one_bit = {m: v for m, v in rec.items() if m in ("scalar", "row", "col", "auto")}
        if one_bit:
            best = max(one_bit, key=one_bit.get)
            checks.append(f"1-bit ≥ 99%: best {best} {one_bit[best]:.1%} "
                          f"{'PASS' if one_bit[best] >= 0.99 else 'FAIL'}")
        two_bit = {m: v for m, v in rec.items() if m.endswith("-2bit")}
        if two_bit:
            best = max(two_bit, key=two_bit.get)
            checks.append(f"2-bit ≥ 99.5%: best {best} {two_bit[best]:.1%} "
                          f"{'PASS' if two_bit[best] >= 0.995 else 'FAIL'}")
        if single and "auto" in rec:
            best = max(single, key=single.get)
            gap = 100 * (rec["auto"] - single[best])
            checks.append(f"auto ≥ best single − 0.2 pts: auto {rec['auto']:.1%} vs {best} {single[best]:.1%} "
                          f"({gap:+.1f} pts) {'PASS' if gap >= -0.2 else 'FAIL'}")
        checks += quantized_base_checks(rec)
        if checks:
            out.append(f"  - goals{marks or ' (plain rows)'}: " + "; ".join(checks))
    return out


def quantized_base_checks(rec: dict) -> list[str]:
    """Per scheme: ``<scheme>-base`` at most 1 point of recovery below ``scalar`` (being above it passes),
    with the quantized fine-tune (``<scheme>-merged``), what serving without a delta would give, beside it."""
    checks = []
    for scheme in SCHEMES:
        q, merged = f"{scheme}-base", f"{scheme}-merged"
        if q not in rec or "scalar" not in rec:
            continue
        gap = 100 * (rec[q] - rec["scalar"])
        checks.append(f"{scheme} base + Δ within 1 pt of fp32 base + Δ: {q} {rec[q]:.1%} vs scalar {rec['scalar']:.1%} "
                      f"({gap:+.1f} pts) {'PASS' if gap >= -1.0 else 'FAIL'}"
                      + (f" (fine-tune quantized, no delta: {rec[merged]:.1%})" if merged in rec else ""))
    return checks


def recipe_lines(prep: dict | None) -> list[str]:
    if not prep:
        return ["(prepare.json not found: fine-tuning record unavailable)"]
    lines = [f"Base: {prep.get('base_source')}; " + (f"greedy chat reply to \"{CHAT_PROBE}\": "
             f"\"{prep['base_check'].get('chat_reply', '').strip()}\"; WikiText-2 slice ppl "
             f"{prep['base_check']['wikitext_slice_ppl']:.2f}." if prep.get("base_check") else "")]
    fts = prep.get("finetunes", {})
    if fts:
        any_rec = next(iter(fts.values()))
        lines.append(f"Fine-tuning recipe (every domain): every parameter, {any_rec['optimizer']} "
                     f"({any_rec['schedule']}, warmup {any_rec['warmup_fraction']:.0%}, floor "
                     f"{any_rec['min_lr_ratio']:g}×), packed {any_rec['seq_len']}-token "
                     f"blocks, {any_rec['batch_blocks']} blocks per step, {any_rec['precision']}, "
                     f"seed {any_rec['seed']}; "
                     "peak lr and epochs per domain below (the -hard domains move the weights much further).")
        lines.append("")
        lines.append("| domain | lr | epochs | train docs | tokens/epoch | steps | tokens | loss first → last "
                     "| held-out ppl base → ft | train s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for d, r in fts.items():
            lines.append(f"| {d} | {r['lr']:g} | {r['epochs']} | {r['train_docs']} | {r['tokens_per_epoch']:,} "
                         f"| {r['steps']} | {r['tokens']:,} | "
                         f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['heldout_check_ppl_base']:.2f} → "
                         f"{r['heldout_check_ppl_ft']:.2f} | {r['train_s']:.0f} |")
    return lines


def missing_lines(rows: dict) -> list[str]:
    """The domain x variant cells without a result (a run cut short by device time), said plainly."""
    missing = [f"{d} `{v}`" for d in DOMAINS for v in VARIANTS if (d, v) not in rows]
    if not missing:
        return []
    return ["- **Not run yet** (device time ran out; `--phase eval --domain D --variants ...` resumes "
            "them, results already in the work directory are kept): " + ", ".join(missing)]


def header_lines(rows: dict, folders: list[Path]) -> list[str]:
    """How the numbers were made: command, results, devices, data, distillation and evaluation settings."""
    # the settings line describes the plain rows; relative-lr rows say their lr in their label
    sample = next((r for (_, lab), r in rows.items() if lab == variant_of(lab)), next(iter(rows.values())))
    s = sample.get("settings", {})
    devices = ", ".join(sorted({str(r.get("device")) for r in rows.values()}))
    return ["## Fidelity on real fine-tunes (SmolLM2-135M-Instruct)", "",
            "- Command: `python -m benchmarks.fidelity` phases `prepare`, `eval --domain gsm8k|alpaca|shakespeare`, "
            "`report` (see its docstring)",
            f"- Results: {', '.join(f'`{f}`' for f in folders)}",
            f"- Device(s): {devices}; torch {sample.get('torch')}, bitdelta {sample.get('bitdelta')}; "
            f"date {', '.join(sorted({r.get('date', 'not recorded') for r in rows.values()}))}"
            + ("  **(smoke run: tiny budgets, numbers mean nothing)**" if s.get("smoke") else ""),
            "- Data on the GPU machine (64 MiB per transfer, next to the 98 MB GGUF in two halves): "
            "`bash benchmarks/fidelity_inputs.sh` builds the halves and a trimmed copy of the shared data "
            "(the first 1,500 calibration documents, from which the calibration samples are drawn; validation, "
            "WikiText-2 and the fine-tuning files whole; the first 1,000 lines of each task file) under `.carry/`. "
            "Commands: `--phase prepare --gguf /tmp/smol.gguf --data /tmp/data`, then `--phase eval --domain D "
            "--data /tmp/data --budget-s S` (resumed until done or out of device time), then `--phase report` on the "
            "CPU machine",
            *missing_lines(rows),
            f"- Distillation: {s.get('distill_steps')} steps, batch {s.get('distill_batch')} × "
            f"{s.get('cal_seq_len')} tokens "
            f"({s.get('cal_samples')} calibration samples), AdamW lr {s.get('distill_lr')} "
            f"({s.get('distill_lr_mode', 'absolute')}), MSE on logits; auto chooses "
            f"row/col per module on {s.get('cal_heldout')} samples of validation.jsonl. Rows marked \"rel. lr\" "
            "distilled with `--distill-lr-mode relative` (AdamW on a multiplier of each initial scale, so the lr is "
            "a relative step), all else equal",
            f"- Held-out domain text: up to {s.get('heldout_docs')} documents × {s.get('heldout_max_len')} tokens "
            "(GSM8K test, last 250 Alpaca items, last 5% of Shakespeare); recovery = (log ppl_base − log ppl_delta) / "
            "(log ppl_base − log ppl_ft) on it; KL and top-1 on the same tokens",
            f"- WikiText-2: window {s.get('wikitext_window')}, stride {s.get('wikitext_stride')}"
            + (f", first {s['wikitext_chars']:,} characters" if s.get("wikitext_chars") else ", whole test set")
            + f"; tasks: first {s.get('task_limit')} examples of each (acc; HellaSwag acc_norm)",
            "- delta MB: delta.safetensors on disk (tokenizer files excluded); factor: fine-tune fp16 bytes / that; "
            "compress s: `bitdelta.compress` from the safetensors dirs; distill s: `distill_scales` "
            "(auto: row + col + the held-out choice); peak GPU: max allocated while building and evaluating "
            "(base and fine-tune resident, fp32); reference: scalar scales, embedding/lm_head (tied) kept dense in "
            "fp16 and trained with the norms during distillation (`compress(dense_embeddings=True)`, "
            "`distill_scales(train_dense=True)`); int8-base, fp8-base: scalar's recipe compressed against, distilled "
            "on and evaluated on the base quantized per output channel (round to nearest) to INT8 / FP8 and "
            "dequantized (Δ = W_ft − Q(W_base), `compress(base_quant=...)`); int8-merged, fp8-merged: no delta, the "
            "fine-tune itself quantized the same way (merge, then quantize); every row's KL and recovery are against "
            "the fp32 fine-tune and base", ""]


def phase_report(args) -> int:
    from .plots import make_plots

    folders = [Path(f) for f in args.results.split(",")] if args.results else [args.work / run_dir(args, "results")]
    rows, prep = read_results(folders)
    if prep is None and (args.work / "prepare.json").is_file():
        prep = json.loads((args.work / "prepare.json").read_text())
    if not rows:
        raise SystemExit(f"no result JSONs in {', '.join(map(str, folders))}")
    out = Path(args.report_dir) if args.report_dir else folders[0]
    out.mkdir(parents=True, exist_ok=True)
    pngs = make_plots(rows, out)
    md = [*header_lines(rows, folders), *recipe_lines(prep), "", "Goals (design.md):", "", *goal_checks(rows), "",
          *table_lines(rows), ""]
    md += [f"![{p}]({p})" for p in pngs]
    text = "\n".join(md) + "\n"
    if args.update_doc:
        update_doc(Path(args.update_doc), text)
        written = args.update_doc
    else:
        (out / "fidelity.md").write_text(text)
        written = out / "fidelity.md"
    log(f"report: {len(rows)} results from {', '.join(map(str, folders))}; wrote {written}"
        + (f" and {', '.join(pngs)} in {out}" if pngs else ""))
    print("\n".join(goal_checks(rows)))
    print()
    print("\n".join(table_lines(rows)), flush=True)
    return 0


def update_doc(path: Path, section: str) -> None:
    """Replaces the marked fidelity section of ``path`` (appends it the first time)."""
    block = f"{REPORT_START}\n{section}{REPORT_END}\n"
    doc = path.read_text(encoding="utf-8") if path.is_file() else ""
    if REPORT_START in doc and REPORT_END in doc:
        head, rest = doc.split(REPORT_START, 1)
        tail = rest.split(REPORT_END, 1)[1].lstrip("\n")
        doc = head + block + tail
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    path.write_text(doc, encoding="utf-8")
