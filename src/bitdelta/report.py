"""What ``bitdelta inspect`` shows: an artifact's config, per-module modes, sizes, compression.

The compression factor follows design.md: the fine-tune's fp16 bytes (2 per parameter) over the
artifact's bytes on disk, decimal units on both sides. We report it for the whole artifact and
for the weights file(s) alone (tokenizer files are the same size for any fine-tune).

    info = describe_artifact("ft.bitdelta"); print(format_report(info))
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .artifact import CONFIG_NAME, WEIGHTS_STEM, check_confined, read_config
from .model_card import compression_factor


def describe_artifact(path) -> dict:
    """The facts ``inspect`` prints. Raises :class:`~bitdelta.errors.FormatError` for a corrupt config
    or an entry (a link) that resolves outside the artifact: inspecting never follows one out."""
    path = Path(path)
    cfg = read_config(path)
    check_confined(path)
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    weight_bytes = sum(s for n, s in files.items() if n.startswith(WEIGHTS_STEM) and ".safetensors" in n)
    artifact_bytes = sum(files.values())
    n = cfg.get("finetuned_num_parameters")
    modes = Counter(f"{m['kind']}/{m['scale']}/{m['bits']}bit" for m in cfg["modules"].values())
    return {
        "path": str(path),
        "format": f"{cfg['format']} v{cfg['format_version']} (bitdelta {cfg.get('bitdelta_version')})",
        "base": cfg.get("base_model_name_or_path"),
        "base_revision": cfg.get("base_model_revision"),
        "base_fingerprint": cfg["base_fingerprint"].get("sha256"),
        "finetuned": cfg.get("finetuned_model_name_or_path"),
        "model_type": cfg.get("model_type"),
        "compressed_modules": len(cfg["modules"]),
        "modes": dict(sorted(modes.items())),
        "dense_parameters": len(cfg.get("dense_parameters", [])),
        "added_token_rows": {k: m["extra_rows"] for k, m in cfg["modules"].items() if m.get("extra_rows")},
        "lowrank": _lowrank(cfg),
        "compression": cfg.get("compression"),
        "coverage": _coverage(cfg),
        "distillation": cfg.get("distillation"),
        "files": files,
        "artifact_bytes": artifact_bytes,
        "weight_bytes": weight_bytes,
        "finetuned_fp16_bytes": 2 * n if n else None,
        "compression_factor": compression_factor(n, artifact_bytes),
        "compression_factor_weights_only": compression_factor(n, weight_bytes),
    }


def _coverage(cfg: dict) -> dict | None:
    """The compression audit's accounting of the fine-tune's stored tensors (None for artifacts
    written before it existed): tensors and parameters compressed / dense / excluded / unchanged."""
    comp = cfg.get("compression") if isinstance(cfg.get("compression"), dict) else {}
    cov = comp.get("coverage")
    if not isinstance(cov, dict):
        return None
    experts = sum(1 for name in cfg["modules"] if name.endswith("]"))
    return {"naming": comp.get("naming"), "tensors": cov.get("tensors") or {},
            "parameters": cov.get("parameters") or {}, "excluded_tensors": comp.get("excluded_tensors") or [],
            "expert_matrices": experts}


def _lowrank(cfg: dict) -> dict | None:
    """Ranks and bytes of the low-rank corrections (None without any): per module, from the layout."""
    ranks = {k: m["lowrank_rank"] for k, m in cfg["modules"].items() if m.get("lowrank_rank")}
    if not ranks:
        return None
    nbytes = sum(2 * r * sum(cfg["modules"][k]["shape"]) for k, r in ranks.items())  # float16 B and A
    record = (cfg.get("compression") or {}).get("lowrank") or {}
    return {"ranks": ranks, "bytes": nbytes, "budget": record.get("budget"), "rank": record.get("rank"),
            "budget_bytes": record.get("budget_bytes")}


def _format_lowrank(lr: dict | None) -> list[str]:
    if lr is None:
        return []
    ranks = sorted(lr["ranks"].values())
    setting = f"budget {lr['budget']:g}x one sign plane ({_mb(lr['budget_bytes'])})" if lr["budget"] else \
        f"rank {lr['rank']}" if lr["rank"] else "recorded ranks"
    lines = [f"low-rank          {len(ranks)} modules, {_mb(lr['bytes'])}, {setting}; rank min {ranks[0]}, "
             f"median {ranks[len(ranks) // 2]}, max {ranks[-1]}"]
    for name, r in sorted(lr["ranks"].items(), key=lambda kv: -kv[1])[:8]:
        lines.append(f"  rank {r:<6}{name}")
    return lines


def _format_coverage(cov: dict | None) -> list[str]:
    if cov is None:
        return ["coverage          not recorded (artifact made before the coverage audit)"]
    lines = [f"coverage          of the fine-tune's stored tensors (delta named {cov['naming'] or '?'}):"]
    for cat in ("compressed", "dense", "excluded", "unchanged"):
        t, p = cov["tensors"].get(cat, 0), cov["parameters"].get(cat, 0)
        lines.append(f"  {cat:<16}{t:>7,} tensors {p:>16,} parameters")
    if cov["expert_matrices"]:
        lines.append(f"  expert matrices {cov['expert_matrices']:>7,} compressed one by one")
    for name in cov["excluded_tensors"][:8]:
        lines.append(f"  excluded: {name}")
    return lines


def _mb(n) -> str:
    return "?" if n is None else f"{n / 1e6:,.3f} MB"


def _format_base_quantization(q) -> list[str]:
    """One line naming the quantized base a delta was made against (nothing for a plain base)."""
    if not isinstance(q, dict) or not q:
        return []
    what = ", ".join(f"{k}={v}" for k, v in sorted(q.items()) if not isinstance(v, (dict, list)))
    return [f"base quantized    {what} (apply it to that quantized base only)"]


def format_report(info: dict) -> str:
    lines = [
        f"artifact          {info['path']}",
        f"format            {info['format']}",
        f"base              {info['base']}" + (f" @ {info['base_revision']}" if info["base_revision"] else ""),
        f"base fingerprint  {(info['base_fingerprint'] or '?')[:16]}",
        *_format_base_quantization((info.get("compression") or {}).get("base_quantization")),
        f"fine-tune         {info['finetuned']}",
        f"model type        {info['model_type']}",
        f"compressed        {info['compressed_modules']} modules",
    ]
    for mode, count in info["modes"].items():
        lines.append(f"  {mode:<24}{count}")
    lines.append(f"dense parameters  {info['dense_parameters']}")
    lines += _format_coverage(info.get("coverage"))
    lines += _format_lowrank(info.get("lowrank"))
    for name, rows in info["added_token_rows"].items():
        lines.append(f"added-token rows  {name}: {rows} (dense)")
    if info["distillation"]:
        d = info["distillation"]
        flat = ", ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list)))
        lines.append("distillation      " + flat)
    lines += [
        f"artifact size     {_mb(info['artifact_bytes'])} ({len(info['files'])} files; "
        f"weights {_mb(info['weight_bytes'])})",
        f"fine-tune fp16    {_mb(info['finetuned_fp16_bytes'])}",
    ]
    if info["compression_factor"]:
        weights_only = info["compression_factor_weights_only"]  # None when the weights file is absent
        lines.append(
            f"compression       {info['compression_factor']:.2f}x whole artifact, "
            + (f"{weights_only:.2f}x weights only" if weights_only else "no weights file")
        )
    return "\n".join(lines)


__all__ = ["describe_artifact", "format_report", "CONFIG_NAME"]
