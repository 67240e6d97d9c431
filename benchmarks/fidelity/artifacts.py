"""The deltas of one domain, built as ``variants.py`` describes and kept under
``<work>/artifacts[-NAME]/<domain>/`` with their build record (compression / distillation seconds,
peak GPU bytes, the quantized base's scheme), so a rerun with the same settings reuses them.

    arts = Artifacts(args, "gsm8k", base, ft, cal, base_dir, ft_dir)
    delta, record = arts.get("auto")       # builds scalar, row and col first (its candidates)
    model = arts.base_model(BUILDS["int8-base"])  # the INT8-quantized base its delta is applied to
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import bitdelta
from bitdelta.delta import Delta
from bitdelta.distill import TeacherLogits, choose_auto, choose_modes, distill_scales
from bitdelta.hf import load_model

from .settings import eval_settings, log, run_dir
from .variants import BUILDS, Variant, distill_config


def max_present(*values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


class Artifacts:
    def __init__(self, args, domain: str, base, ft, cal, base_dir: Path, ft_dir: Path):
        self.args, self.domain, self.base, self.ft, self.cal = args, domain, base, ft, cal
        self.base_dir, self.ft_dir = str(base_dir), str(ft_dir)
        self.root = args.work / run_dir(args, "artifacts") / domain
        self.root.mkdir(parents=True, exist_ok=True)
        self.memo: dict[str, tuple[Delta, dict]] = {}
        self.quantized: dict[str, object] = {}  # scheme -> quantized base; at most one held (see base_model)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.bitdelta"

    def base_model(self, v: Variant):
        """The model ``v``'s delta is made against, distilled on and applied to: the base, or, for a
        delta against a quantized base, that base as the engine runs it (each quantizable weight read
        as ``fake_quantize`` of the stored one, exactly as ``compress`` read it, so the fingerprint
        matches). It is loaded once per scheme and kept for the domain's eval; only the latest scheme
        is kept, since a variant is built and scored before the next one starts."""
        scheme = v.base_quant
        if scheme is None:
            return self.base
        if scheme not in self.quantized:
            self.quantized.clear()  # free the previous scheme's base before loading the next
            self.quantized[scheme] = load_model(self.base_dir, dtype="float32", device=self.args.device,
                                                base_quant=scheme)
        return self.quantized[scheme]

    def get(self, name: str) -> tuple[Delta, dict]:
        """The variant's delta and build record: from this run's memo, from disk when built with the
        same settings, or built now."""
        if BUILDS[name].quantized_finetune:
            raise ValueError(f"{name} has no delta: it is the fine-tune quantized ({BUILDS[name].quantized_finetune})")
        if name in self.memo:
            return self.memo[name]
        path, rec_path = self.path(name), self.root / f"{name}.build.json"
        settings = eval_settings(self.args, self.domain)
        if not self.args.force and path.is_dir() and rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            if rec.get("settings") == settings:
                self.memo[name] = (Delta.from_pretrained(path), rec)
                return self.memo[name]
        delta, rec = self.build(BUILDS[name])
        rec["base_quant"] = BUILDS[name].base_quant
        rec["settings"] = settings
        delta.save_pretrained(path)
        rec_path.write_text(json.dumps(rec, indent=2))
        self.memo[name] = (delta, rec)
        return delta, rec

    def build(self, v: Variant) -> tuple[Delta, dict]:
        dev = self.args.dev
        if v.candidates:
            return self._choose(v)
        if v.start_from:  # the distilled copy of another variant: same signs, same compression run
            init, rec0 = self.get(v.start_from)
            dev.reset_peak()
            delta, dt = self._distill(init, v)
            return delta, {"compress_s": rec0["compress_s"], "distill_s": dt,
                           "peak_gpu_bytes": max_present(rec0["peak_gpu_bytes"], dev.peak_bytes())}
        dev.reset_peak()
        t = time.perf_counter()
        delta = bitdelta.compress(self.base_dir, self.ft_dir, v.compress, progress=False)
        ct = time.perf_counter() - t
        dt = 0.0
        if v.distill:
            delta, dt = self._distill(delta, v)
        return delta, {"compress_s": ct, "distill_s": dt, "peak_gpu_bytes": dev.peak_bytes()}

    def _distill(self, delta: Delta, v: Variant) -> tuple[Delta, float]:
        t = time.perf_counter()
        # the student is the base the delta was compressed against: a quantized base's delta is trained on it
        out = distill_scales(delta, self.base_model(v), self.ft, self.cal, distill_config(self.args, v),
                             progress=False)
        self.args.dev.sync()
        d = out.info["distillation"]
        on = f" on the {v.base_quant} base" if v.base_quant else ""
        log(f"  distilled {out.info['compression']['scale']} {out.info['compression']['bits']}-bit{on}: train loss "
            f"{d['initial_loss']:.4g} -> {d['final_loss']:.4g}, held-out {d['heldout_loss_before']:.4g} -> "
            f"{d['heldout_loss_after']:.4g} ({time.perf_counter() - t:.1f}s)")
        return out, time.perf_counter() - t

    def _choose(self, v: Variant) -> tuple[Delta, dict]:
        """The candidates' distilled deltas, then the per-module choice on the held-out samples."""
        a = self.args
        built = {BUILDS[c].compress.scale.value: self.get(c) for c in v.candidates}  # mode -> (delta, record)
        a.dev.reset_peak()
        t = time.perf_counter()
        teacher = TeacherLogits(model=self.ft)
        if v.choose == "mse":  # the earlier choice: row or col by the distillation loss (MSE)
            chosen = choose_auto(built["row"][0], built["col"][0], self.base, teacher, self.cal.heldout,
                                 batch_size=a.eval_batch, loss="mse", progress=False).to("cpu")
        else:
            chosen = choose_modes({m: d for m, (d, _) in built.items()}, self.base, teacher, self.cal.heldout,
                                  batch_size=a.eval_batch, progress=False).to("cpu")
        for d, _ in built.values():
            d.to("cpu")
        a.dev.sync()
        choose_s = time.perf_counter() - t
        info = chosen.info["distillation"]["auto"]
        counts = ", ".join(f"{info.get(m + '_modules', 0)} {m}" for m in built)
        log(f"  {v.name}: {counts} modules, held-out loss all-{info['start']} "
            f"{info['heldout_loss_all_' + info['start']]:.4g} "
            f"-> chosen {info['heldout_loss_chosen']:.4g} ({choose_s:.1f}s)")
        recs = [r for _, r in built.values()]
        return chosen, {"compress_s": sum(r["compress_s"] for r in recs),
                        "distill_s": sum(r["distill_s"] for r in recs) + choose_s, "choose_s": choose_s,
                        "peak_gpu_bytes": max_present(*(r["peak_gpu_bytes"] for r in recs), a.dev.peak_bytes())}


def mean_scale(delta: Delta) -> float:
    """Mean first-plane scale of the non-vocabulary matrices: for scalar-initial this is the typical
    |Δ| of the fine-tune, the size the distillation learning rate has to be judged against."""
    values = [float(m.scale[0].float().mean()) for m in delta.modules.values() if not m.vocab]
    return sum(values) / max(1, len(values))
