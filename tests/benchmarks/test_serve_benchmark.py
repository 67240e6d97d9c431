"""``python -m benchmarks.serve`` end to end on the CPU (tiny shapes, the real engine, artifacts on
disk), and its report: the table has a row per N with every mode, goals are stated, a run cut before its first
decode step is marked rather than given a throughput, and runs combine. The Zipf-tenant run's requests are
labelled by where their delta was and add up; ``--ns 64,max`` runs the largest N that fits beside every mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(out: Path, *flags: str) -> Path:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--smoke", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    return run_smoke(tmp_path_factory.mktemp("serve-smoke"))


def test_smoke_run_measures_every_mode(smoke):
    result = json.loads((smoke / "serve.json").read_text())
    runs = {(r["mode"], r["n"]): r for r in result["runs"]}
    for n in (1, 2):
        for mode in ("bitdelta", "base", "unfused"):
            r = runs[(mode, n)]
            assert r["tokens"] > 0 and r["tok_s"] > 0 and r["ttft_ms_p50"] > 0, (mode, n)
        assert runs[("bitdelta", n)]["delta_bytes"] == n * result["meta"]["slot_bytes"]
    assert result["delta_cold"]["cold_start_s"] > 0 and result["full_cold"]["cold_start_s"] > 0
    assert set(result["merged"]["per_n"]) >= {"1", "2"} or set(result["merged"]["per_n"]) >= {1, 2}
    md = (smoke / "serve.md").read_text()
    assert md.count("\n| 1 |") >= 1 and md.count("\n| 2 |") >= 1
    assert "goal >= 85%" in md and "cold start" in md


def test_report_marks_runs_cut_before_decoding_and_merges(smoke, tmp_path):
    from benchmarks.serve.report import markdown, merge_results

    result = json.loads((smoke / "serve.json").read_text())
    cut = next(r for r in result["runs"] if r["mode"] == "unfused" and r["n"] == 2)
    cut.update(decode_steps=0, truncated="time budget", tok_s=7.5)
    md = markdown(result)
    row = next(line for line in md.splitlines() if line.startswith("| 2 |"))
    assert "–†" in row and "7.5" not in row.split("|")[5]
    # a second run's rows replace the first's for the same mode and N; the rest are kept
    later = json.loads((smoke / "serve.json").read_text())
    later["runs"] = [dict(r, tok_s=12345.0) for r in later["runs"] if r["mode"] == "base" and r["n"] == 1]
    (tmp_path / "a.json").write_text(json.dumps(result))
    (tmp_path / "b.json").write_text(json.dumps(later))
    merged = merge_results([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    got = {(r["mode"], r["n"]): r["tok_s"] for r in merged["runs"]}
    assert got[("base", 1)] == 12345.0 and got[("bitdelta", 2)] == next(
        r["tok_s"] for r in result["runs"] if r["mode"] == "bitdelta" and r["n"] == 2)


def test_merge_drops_skips_another_run_measured(smoke, tmp_path):
    from benchmarks.serve.report import merge_results

    first = json.loads((smoke / "serve.json").read_text())
    first["skipped"] = ["bitdelta N=2: time budget", "base N=64: time budget", "zipf: time budget"]
    first["runs"] = [r for r in first["runs"] if not r["mode"].startswith("poisson")]
    zipf = first.pop("zipf")
    later = json.loads((smoke / "serve.json").read_text())
    later.pop("full_cold")
    later["runs"] = [r for r in later["runs"] if r["n"] == 1]
    later["skipped"] = ["full fine-tune cold start / pinned copy (--skip-cold)", "poisson bitdelta: time budget"]
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(later))
    merged = merge_results([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    # measured in the first run: the second run's skip of the cold start and the first's of N=2 go;
    # the second ran the Zipf run the first skipped; nothing measured N=64 or a Poisson bitdelta run
    assert merged["skipped"] == ["base N=64: time budget", "poisson bitdelta: time budget"]
    assert merged["zipf"] == zipf


def test_smoke_zipf_run_labels_every_request_by_where_its_delta_was(smoke):
    result = json.loads((smoke / "serve.json").read_text())
    assert "errors" not in result, result.get("errors")
    z = result["zipf"]
    assert (z["deltas"], z["n"], z["host_capacity"], z["requests"]) == (40, 4, 16, 16) and not z["truncated"]
    per = z["per_request"]
    assert len(per) == z["requests"] and all(r["tokens"] == z["new_tokens"] for r in per)
    counts = z["counts"]
    assert sum(counts.values()) == z["requests"] and counts["failed"] == 0
    assert {lab: g["requests"] for lab, g in z["by_label"].items()} == {k: v for k, v in counts.items() if v}
    assert all(g["ttft_ms_p50"] > 0 and g["ttft_ms_p99"] >= g["ttft_ms_p50"] for g in z["by_label"].values())
    # more tenants than the host LRU holds, the most popular registered first: its first request reads the disk
    assert counts["disk"] >= 1 and z["device_hit_rate"] == counts["device"] / z["requests"]
    for key in ("device_hit_rate", "host_hit_rate", "sim_device_hit_rate", "sim_host_or_device_hit_rate"):
        assert 0.0 <= z[key] <= 1.0, key
    # every delta that was on disk or in host memory when asked for was loaded / installed afterwards
    assert z["disk_loads"] >= len({r["tenant"] for r in per if r["label"] == "disk"})
    assert z["slot_installs"] >= len({r["tenant"] for r in per if r["label"] != "device"})
    assert z["loads_per_s"] > 0 and z["installs_per_s"] > 0
    # the most popular tenant stays in memory once loaded: its later requests find it in a slot or host memory
    top = [r for r in per if r["tenant"] == z["top_tenant"]]
    later = [r for r in top if r["arrival_s"] > top[0]["first_token_s"]]
    assert top[0]["label"] == "disk" and later and all(r["label"] in ("device", "host") for r in later), top
    md = (smoke / "serve.md").read_text()
    assert "Zipf tenants: 40 registered deltas" in md and "| disk |" in md and "Device-slot hit rate" in md


@pytest.mark.slow  # a second smoke run of the whole benchmark
def test_largest_n_runs_beside_64_and_every_mode(tmp_path):
    out = run_smoke(tmp_path, "--ns", "64,max", "--skip-cold", "--poisson-rate", "0", "--zipf-deltas", "0")
    result = json.loads((out / "serve.json").read_text())
    nmax = result["meta"]["nmax"]  # 4 on a CPU
    assert {(r["mode"], r["n"]) for r in result["runs"]} == {("base-b1", 1)} | {
        (mode, nmax) for mode in ("base", "bitdelta", "unfused")}
    assert f"N=64: does not fit (largest N {nmax})" in result["skipped"] and "zipf" not in result
    assert f"\n| {nmax} |" in (out / "serve.md").read_text()


def test_skip_full_cold_keeps_the_delta_cold_start(tmp_path):
    """``--skip-full-cold`` drops only the full fine-tune's cold start (a 13 GB write at 7B): the delta's
    is still measured, and the report says what was skipped."""
    out = run_smoke(tmp_path, "--ns", "1", "--skip-reference", "--skip-merged", "--skip-full-cold",
                    "--zipf-deltas", "0", "--poisson-rate", "0")
    result = json.loads((out / "serve.json").read_text())
    assert "full_cold" not in result and result["delta_cold"]["cold_start_s"] > 0
    assert result["delta_cold"]["beyond_read_s"] >= 0
    assert any(s.startswith("full fine-tune cold start") for s in result["skipped"])
