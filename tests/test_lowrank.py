"""The low-rank correction of the sign-plane residual: decomposition, rank allocation under a byte
budget, the artifact (format_version 2, shapes and values checked on load), apply/merge/distill, CLI."""

import json

import pytest
import torch

import bitdelta
from bitdelta import artifact_info
from bitdelta.artifact import format_version_of
from bitdelta.binarize import binarize, reconstruct
from bitdelta.calibration import Calibration, TokenBatches
from bitdelta.cli import main
from bitdelta.configs import CompressConfig
from bitdelta.distill import distill_scales
from bitdelta.errors import ConfigError, FormatError, InvalidDeltaError
from bitdelta.lowrank import (
    LowRankPlanner,
    allocate_ranks,
    direction_bytes,
    factor_bytes,
    sign_plane_bytes,
    split_factors,
    truncated_svd,
)
from bitdelta.report import describe_artifact, format_report
from models import load, make_pair


def _low_rank_plus_noise(out, inp, rank, strength, seed):
    g = torch.Generator().manual_seed(seed)
    strong = torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)
    return strength * strong / rank + 0.01 * torch.randn(out, inp, generator=g)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("lowrank"), tie=False)


@pytest.fixture(scope="module")
def lowrank_delta(pair):
    base_dir, ft_dir = pair
    return bitdelta.compress(base_dir, ft_dir, lowrank_budget=1.0, progress=False)


# ------------------------------------------------------------------ decomposition and allocation


def test_reconstruction_error_falls_with_rank():
    delta = _low_rank_plus_noise(48, 40, 6, 0.05, 0)
    sign, scale = binarize(delta, "row", 1)
    residual = delta - reconstruct(sign, scale, 40, "row")
    u, s, vh = truncated_svd(residual, 40)
    errors = []
    for r in (0, 1, 2, 4, 8, 16):
        b, a = split_factors(u, s, vh, r)
        errors.append(float((residual - b.float() @ a.float()).norm()))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]


def test_randomised_svd_of_a_large_matrix_finds_the_strong_directions(monkeypatch):
    from bitdelta import lowrank

    monkeypatch.setattr(lowrank, "EXACT_SVD_MAX", 16)  # take the randomised path on a small matrix
    residual = _low_rank_plus_noise(96, 80, 4, 1.0, 1)
    u, s, vh = truncated_svd(residual, 4)
    exact = torch.linalg.svdvals(residual)[:4]
    assert u.shape == (96, 4) and vh.shape == (4, 80)
    assert torch.allclose(s, exact, rtol=1e-3)


def test_budget_is_respected_exactly_in_bytes():
    planner = LowRankPlanner(budget=0.5)
    shapes = {"a": (64, 40), "b": (40, 64), "c": (33, 17)}
    for i, (name, shape) in enumerate(shapes.items()):
        planner.add(name, _low_rank_plus_noise(*shape, 5, 0.1, i))
    budget = planner.budget_bytes()
    assert budget == int(0.5 * sum(sign_plane_bytes(*s) for s in shapes.values()))
    factors = planner.factors()
    spent = sum(b.numel() * b.element_size() + a.numel() * a.element_size() for b, a in factors.values())
    ranks = planner.ranks()
    assert spent == sum(factor_bytes(*shapes[n], r) for n, r in ranks.items()) <= budget
    # nothing more fits: every module's next direction costs more than what is left
    assert all(direction_bytes(*shapes[n]) > budget - spent for n in shapes if ranks[n] < min(shapes[n]))


def test_energy_allocation_prefers_the_module_with_more_residual_energy():
    spectra = {"strong": (torch.tensor([5.0, 4.0, 3.0, 2.0]), 100), "weak": (torch.tensor([1.0, 0.5, 0.2, 0.1]), 100)}
    ranks = allocate_ranks(spectra, 300)
    assert ranks == {"strong": 3, "weak": 0}
    # per byte: a cheap module's weaker direction can beat an expensive one's stronger direction
    spectra = {"wide": (torch.tensor([3.0, 2.9]), 1000), "thin": (torch.tensor([1.0, 0.9]), 50)}
    assert allocate_ranks(spectra, 1100) == {"wide": 1, "thin": 2}


def test_fixed_rank_is_capped_by_the_smaller_side():
    planner = LowRankPlanner(rank=12)
    planner.add("small", torch.randn(8, 30))
    planner.add("big", torch.randn(40, 30))
    assert planner.ranks() == {"small": 8, "big": 12}


def test_config_checks_the_lowrank_fields():
    assert CompressConfig(lowrank_budget="0.5").lowrank_budget == 0.5
    with pytest.raises(ConfigError, match="not both"):
        CompressConfig(lowrank_budget=1.0, lowrank_rank=4)
    with pytest.raises(ConfigError, match="lowrank_budget must be a positive number"):
        CompressConfig(lowrank_budget=0)
    with pytest.raises(ConfigError, match="lowrank_rank must be an integer"):
        CompressConfig(lowrank_rank=0)
    with pytest.raises(ConfigError, match="not auto"):
        CompressConfig(scale="auto", lowrank_rank=2)


# ------------------------------------------------------------------ compress, artifact


def test_compress_records_ranks_and_spends_at_most_one_plane(lowrank_delta):
    record = lowrank_delta.info["compression"]["lowrank"]
    spent = sum(m.lowrank_nbytes() for m in lowrank_delta.modules.values())
    assert record["bytes"] == spent <= record["budget_bytes"]
    assert record["sign_plane_bytes"] == sum(m.sign[0].numel() for m in lowrank_delta.modules.values())
    assert lowrank_delta.modules["model.embed_tokens"].lowrank_rank == 0
    assert sum(m.lowrank_rank > 0 for m in lowrank_delta.modules.values()) >= 3


def test_lowrank_beats_two_bits_at_equal_bytes_on_a_low_rank_fine_tune(tmp_path):
    base = load(make_pair("llama", tmp_path, tie=False)[0])
    ft = load(tmp_path / "llama-base")
    with torch.no_grad():
        for i, p in enumerate(ft.parameters()):
            if p.dim() == 2:
                p.add_(_low_rank_plus_noise(*p.shape, 2, 0.05, i))
    base.save_pretrained(tmp_path / "b")
    ft.save_pretrained(tmp_path / "f")
    errors = {}
    for label, settings in {"1bit": {}, "2bit": {"bits": 2}, "1bit+lowrank": {"lowrank_budget": 1.0}}.items():
        d = bitdelta.compress(tmp_path / "b", tmp_path / "f", progress=False, **settings)
        with torch.no_grad():
            errors[label] = sum(float((ft.get_parameter(n + ".weight") - base.get_parameter(n + ".weight")
                                       - m.dense()).norm() ** 2) for n, m in d.modules.items() if m.kind == "linear")
    assert errors["1bit+lowrank"] < errors["2bit"] < errors["1bit"]


def test_artifact_round_trip_is_format_version_2(lowrank_delta, tmp_path):
    lowrank_delta.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "delta_config.json").read_text())
    assert cfg["format_version"] == 2 == format_version_of(lowrank_delta)
    ranked = {n: m.lowrank_rank for n, m in lowrank_delta.modules.items() if m.lowrank_rank}
    assert {n: e["lowrank_rank"] for n, e in cfg["modules"].items() if "lowrank_rank" in e} == ranked
    loaded = bitdelta.Delta.from_pretrained(tmp_path / "a")
    for name, m in lowrank_delta.modules.items():
        got = loaded.modules[name]
        assert got.lowrank_rank == m.lowrank_rank
        if m.lowrank_rank:
            assert torch.equal(got.lowrank_a, m.lowrank_a) and torch.equal(got.lowrank_b, m.lowrank_b)
    assert loaded.info["compression"]["lowrank"] == lowrank_delta.info["compression"]["lowrank"]
    report = format_report(describe_artifact(tmp_path / "a"))
    assert "low-rank" in report and f"{len(ranked)} modules" in report


def test_a_plain_delta_stays_format_version_1_and_old_files_load(pair, tmp_path):
    base_dir, ft_dir = pair
    bitdelta.compress(base_dir, ft_dir, progress=False).save_pretrained(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "delta_config.json").read_text())
    assert cfg["format_version"] == 1
    loaded = bitdelta.Delta.from_pretrained(tmp_path / "plain")
    assert all(m.lowrank_rank == 0 for m in loaded.modules.values())


def test_a_version_1_reader_refuses_a_lowrank_artifact(lowrank_delta, tmp_path, monkeypatch):
    lowrank_delta.save_pretrained(tmp_path / "a")
    monkeypatch.setattr(artifact_info, "FORMAT_VERSION", 1)
    with pytest.raises(FormatError, match="format_version 2.*upgrade"):
        bitdelta.Delta.from_pretrained(tmp_path / "a")


def _rewrite_tensor(path, key, value):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "delta.safetensors")
    tensors[key] = value
    save_file(tensors, path / "delta.safetensors", metadata={"format": "pt"})


def _first_ranked(delta):
    return next(n for n, m in delta.modules.items() if m.lowrank_rank)


def test_mismatched_factor_shapes_are_refused_naming_the_tensor(lowrank_delta, tmp_path):
    name = _first_ranked(lowrank_delta)
    m = lowrank_delta.modules[name]
    lowrank_delta.save_pretrained(tmp_path / "a")
    _rewrite_tensor(tmp_path / "a", f"{name}.lowrank_a", torch.zeros(m.lowrank_rank + 1, m.in_features).half())
    with pytest.raises(FormatError, match=rf"{name}.lowrank_a.*low-rank factor A.*implies \[{m.lowrank_rank}, "):
        bitdelta.Delta.from_pretrained(tmp_path / "a")


def test_a_rank_beyond_the_matrix_or_on_an_embedding_is_refused(lowrank_delta, tmp_path):
    lowrank_delta.save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "delta_config.json"
    cfg = json.loads(cfg_path.read_text())
    name = _first_ranked(lowrank_delta)
    cfg["modules"][name]["lowrank_rank"] = 10_000
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="lowrank_rank.*must be an integer from 0 to"):
        bitdelta.Delta.from_pretrained(tmp_path / "a")
    cfg["modules"][name]["lowrank_rank"] = lowrank_delta.modules[name].lowrank_rank
    cfg["modules"]["model.embed_tokens"]["lowrank_rank"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="embedding"):
        bitdelta.Delta.from_pretrained(tmp_path / "a")


def test_nan_factors_are_refused_on_load(lowrank_delta, tmp_path):
    name = _first_ranked(lowrank_delta)
    b = lowrank_delta.modules[name].lowrank_b.clone()
    b[0, 0] = float("nan")
    lowrank_delta.save_pretrained(tmp_path / "a")
    _rewrite_tensor(tmp_path / "a", f"{name}.lowrank_b", b)
    with pytest.raises(FormatError, match=f"module {name}: low-rank factors hold NaN or inf"):
        bitdelta.Delta.from_pretrained(tmp_path / "a")


def test_absurd_factors_are_refused_by_apply_and_merge(lowrank_delta, pair):
    name = _first_ranked(lowrank_delta)
    m = lowrank_delta.modules[name]
    bad = lowrank_delta.copy()
    bad.modules[name] = m.copy(lowrank_b=m.lowrank_b.float() * 1e6)
    for fn in (bitdelta.apply, bitdelta.merge):
        with pytest.raises(InvalidDeltaError, match=f"module {name}: scale \\+ low-rank term"):
            fn(load(pair[0]), bad)


# ------------------------------------------------------------------ apply, merge, distill


def test_apply_equals_merge_equals_the_dense_reconstruction(lowrank_delta, pair):
    base_dir, _ = pair
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    dense = load(base_dir)
    with torch.no_grad():
        for name, m in lowrank_delta.modules.items():
            w = dense.get_submodule(name).weight
            w[:m.out_features] += m.sign_dense() + m.lowrank_b.float() @ m.lowrank_a.float() if m.lowrank_rank \
                else m.sign_dense()
        for pname, value in lowrank_delta.dense.items():
            dense.get_parameter(pname).copy_(value)
        applied = bitdelta.apply(load(base_dir), lowrank_delta)(ids).logits
        merged = bitdelta.merge(load(base_dir), lowrank_delta)(ids).logits
        expected = dense(ids).logits
        without = bitdelta.apply(load(base_dir), lowrank_delta.copy(modules={
            n: m.copy(lowrank_a=None, lowrank_b=None) for n, m in lowrank_delta.modules.items()}))(ids).logits
    assert torch.allclose(applied, expected, atol=1e-5) and torch.allclose(merged, expected, atol=1e-5)
    assert not torch.allclose(applied, without, atol=1e-5)  # the low-rank term is really there


def test_distillation_trains_scales_with_the_fixed_term_in_the_forward(lowrank_delta, pair):
    base_dir, ft_dir = pair
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (24, 10), generator=g)
    cal = Calibration(TokenBatches(ids[:16], torch.ones_like(ids[:16])),
                      TokenBatches(ids[16:], torch.ones_like(ids[16:])), "random-ids")
    settings = dict(steps=6, lr=1e-6, batch_size=4, progress=False, keep_better=False)
    out = distill_scales(lowrank_delta, load(base_dir), load(ft_dir), cal, **settings)
    plain = distill_scales(bitdelta.compress(base_dir, ft_dir, progress=False), load(base_dir), load(ft_dir), cal,
                           **settings)
    name = _first_ranked(lowrank_delta)
    assert out.modules[name].lowrank_a is lowrank_delta.modules[name].lowrank_a  # fixed, shared
    assert any(not torch.equal(out.modules[n].scale, m.scale) for n, m in lowrank_delta.modules.items())
    # the student's forward holds B·A: it starts closer to the fine-tune than the plain 1-bit delta
    assert out.info["distillation"]["heldout_loss_before"] < plain.info["distillation"]["heldout_loss_before"]


def test_cli_compress_with_a_lowrank_rank(pair, tmp_path, capsys):
    base_dir, ft_dir = pair
    out = tmp_path / "a"
    assert main(["compress", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(out),
                 "--lowrank-rank", "2", "-q"]) == 0
    cfg = json.loads((out / "delta_config.json").read_text())
    assert cfg["compression"]["lowrank"]["rank"] == 2
    assert {e.get("lowrank_rank") for n, e in cfg["modules"].items() if e["kind"] == "linear"} == {2}
    assert main(["inspect", str(out)]) == 0
    assert "low-rank          15 modules" in capsys.readouterr().out
    assert main(["inspect", str(out), "--settings"]) == 0
    assert "lowrank_rank: 2" in capsys.readouterr().out


def test_signs_fitted_around_the_strong_directions_leave_less_than_correcting_after():
    delta = _low_rank_plus_noise(64, 48, 4, 0.2, 3)
    planner = LowRankPlanner(rank=4)
    sign, scale = planner.binarize(delta, "row", 1)
    residual = delta - reconstruct(sign, scale, 48, "row")
    u, s, vh = truncated_svd(residual, 4)
    fitted = float((residual - (u * s) @ vh).norm())
    plain_sign, plain_scale = binarize(delta, "row", 1)
    plain_residual = delta - reconstruct(plain_sign, plain_scale, 48, "row")
    u, s, vh = truncated_svd(plain_residual, 4)
    after = float((plain_residual - (u * s) @ vh).norm())
    assert fitted < 0.5 * after
    assert LowRankPlanner(budget=1e-3).binarize(delta, "row", 1)[0].equal(plain_sign)  # no share: plain signs
