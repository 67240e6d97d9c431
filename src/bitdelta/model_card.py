"""The artifact's README.md: what the delta is, how big, and how faithful (when measured).

    text = model_card(delta, config_dict, artifact_bytes=123_456)
"""

from __future__ import annotations


def compression_factor(finetuned_num_parameters: int | None, artifact_bytes: int) -> float | None:
    """Fine-tune's fp16 bytes (2 per parameter) over the artifact's bytes on disk."""
    if not finetuned_num_parameters or not artifact_bytes:
        return None
    return 2 * finetuned_num_parameters / artifact_bytes


def model_card(delta, cfg: dict, artifact_bytes: int) -> str:
    n = cfg.get("finetuned_num_parameters")
    factor = compression_factor(n, artifact_bytes)
    comp = cfg.get("compression") or {}
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(delta.summary().items()))
    lines = [
        "---",
        "library_name: bitdelta",
        f"base_model: {cfg.get('base_model_name_or_path')}",
        "tags: [bitdelta, 1-bit-delta]",
        "---",
        "",
        f"# {cfg.get('finetuned_model_name_or_path')} as a bitdelta delta",
        "",
        f"A {comp.get('bits', 1)}-bit delta of `{cfg.get('finetuned_model_name_or_path')}` against its base "
        f"`{cfg.get('base_model_name_or_path')}`, made with bitdelta {cfg.get('bitdelta_version')}.",
        "",
        "| | |",
        "|---|---|",
        f"| compressed modules | {len(cfg.get('modules', {}))} ({kinds}) |",
        f"| dense parameters | {len(cfg.get('dense_parameters', []))} |",
        f"| artifact size | {artifact_bytes / 1e6:,.2f} MB |",
    ]
    if n:
        lines.append(f"| fine-tune size (fp16) | {2 * n / 1e6:,.2f} MB ({n:,} parameters) |")
    if factor:
        lines.append(f"| compression factor | {factor:.1f}x |")
    lines.append(f"| base fingerprint | `{cfg['base_fingerprint']['sha256'][:16]}` |")
    fidelity = cfg.get("fidelity")
    if fidelity:
        lines += ["", "## Fidelity", ""]
        lines += [f"- {k}: {v}" for k, v in fidelity.items()]
    distill = cfg.get("distillation")
    if distill:
        lines += ["", "## Scale distillation", ""]
        lines += [f"- {k}: {v}" for k, v in distill.items()]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"bitdelta merge --base {cfg.get('base_model_name_or_path')} --delta THIS_DIR --out merged/",
        "```",
        "",
    ]
    return "\n".join(lines)
