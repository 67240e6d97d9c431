"""Scale distillation on tiny models: only scales change, loss counts real tokens, auto works."""

import pytest
import torch

import bitdelta
from bitdelta.calibration import Calibration, TokenBatches
from bitdelta.delta import PackedModule
from bitdelta.distill import (
    TeacherLogits,
    choose_auto,
    distill_scales,
    heldout_loss,
    logits_loss,
    precompute_teacher_logits,
)
from models import load, make_pair


def _samples(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # ragged lengths: some right padding in most rows
        cut = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        mask[i, cut:] = 0
        ids[i, cut:] = 0
    return TokenBatches(ids, mask)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    base_dir, ft_dir = make_pair("llama", tmp)
    cal = Calibration(_samples(24, 12, 97, 0), _samples(8, 12, 97, 1), "random-ids")
    return base_dir, ft_dir, cal


def test_only_scales_change_and_heldout_loss_improves(setup):
    base_dir, ft_dir, cal = setup
    delta = bitdelta.compress(base_dir, ft_dir, scale="scalar", progress=False)
    base, ft = load(base_dir), load(ft_dir)
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    ft_before = {k: v.clone() for k, v in ft.state_dict().items()}
    out = distill_scales(delta, base, ft, cal, steps=60, lr=1e-6, batch_size=4, progress=False)
    assert all(torch.equal(base_before[k], v) for k, v in base.state_dict().items())
    assert all(torch.equal(ft_before[k], v) for k, v in ft.state_dict().items())
    assert not any(p.requires_grad is False for p in base.parameters()), "requires_grad flags restored"
    assert not any(isinstance(m, bitdelta.layers.DeltaWrapper) for m in base.modules())
    changed = 0
    for name, m in out.modules.items():
        assert torch.equal(m.sign, delta.modules[name].sign)
        changed += not torch.equal(m.scale, delta.modules[name].scale)
    assert changed == len(out.modules)
    d = out.info["distillation"]
    assert d["steps"] == 60 and d["heldout_loss_after"] < d["heldout_loss_before"] and d["kept"] == "distilled"
    assert d["final_loss"] < d["initial_loss"]
    # the input delta is untouched
    assert torch.equal(delta.modules["model.layers.0.mlp.up_proj"].scale,
                       bitdelta.compress(base_dir, ft_dir, progress=False).modules["model.layers.0.mlp.up_proj"].scale)


def test_a_run_that_worsens_the_heldout_loss_keeps_the_initial_scales(setup):
    base_dir, ft_dir, cal = setup
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", progress=False)
    base, ft = load(base_dir), load(ft_dir)
    # lr far above the scales' size: AdamW throws them about, the held-out loss rises
    wild = distill_scales(delta, base, ft, cal, steps=8, lr=0.05, progress=False, keep_better=False)
    d = wild.info["distillation"]
    assert d["heldout_loss_after"] > d["heldout_loss_before"] and d["kept"] == "distilled"
    assert any(not torch.equal(wild.modules[k].scale, delta.modules[k].scale) for k in delta.modules)
    guarded = distill_scales(delta, base, ft, cal, steps=8, lr=0.05, progress=False)
    g = guarded.info["distillation"]
    assert g["kept"] == "initial" and g["heldout_loss_after"] == d["heldout_loss_after"]
    assert all(torch.equal(guarded.modules[k].scale, delta.modules[k].scale.float()) for k in delta.modules)


def test_seeded_runs_are_reproducible(setup):
    base_dir, ft_dir, cal = setup
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", progress=False)
    base, ft = load(base_dir), load(ft_dir)
    a = distill_scales(delta, base, ft, cal, steps=5, progress=False, seed=3)
    b = distill_scales(delta, base, ft, cal, steps=5, progress=False, seed=3)
    assert all(torch.equal(a.modules[k].scale, b.modules[k].scale) for k in a.modules)


def test_padding_never_counts():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s2 = s.clone()
    s2[0, 3:] += 100.0  # garbage at padded positions
    for kind in ("mse", "kl"):
        assert torch.equal(logits_loss(s, t, mask, kind), logits_loss(s2, t, mask, kind))
        assert logits_loss(s, t, mask, kind) > 0


def test_precomputed_teacher_matches_live(setup, tmp_path):
    base_dir, ft_dir, cal = setup
    ft = load(ft_dir)
    cached = precompute_teacher_logits(ft, cal.train, tmp_path / "teacher.f16", progress=False)
    idx = torch.tensor([0, 5, 7])
    live = TeacherLogits(model=ft).get(cal.train, idx, "cpu")
    torch.testing.assert_close(cached.get(cal.train, idx, "cpu").float(), live, rtol=1e-3, atol=1e-3)
    delta = bitdelta.compress(base_dir, ft_dir, progress=False)
    from_cache = distill_scales(delta, load(base_dir), None, cal, steps=10, lr=1e-6, teacher=cached, progress=False)
    from_live = distill_scales(delta, load(base_dir), ft, cal, steps=10, lr=1e-6, progress=False)
    for name, m in from_cache.modules.items():
        torch.testing.assert_close(m.scale, from_live.modules[name].scale, rtol=1e-3, atol=1e-8)
    assert from_cache.info["distillation"]["heldout_loss_after"] is None  # the cache covers train samples only


def test_auto_picks_per_module_by_heldout_loss(setup):
    base_dir, ft_dir, cal = setup
    base, ft = load(base_dir), load(ft_dir)
    row = distill_scales(bitdelta.compress(base_dir, ft_dir, scale="row", progress=False), base, ft, cal, steps=10,
                         lr=1e-6, progress=False)
    col = distill_scales(bitdelta.compress(base_dir, ft_dir, scale="col", progress=False), base, ft, cal, steps=10,
                         lr=1e-6, progress=False)
    auto = choose_auto(row, col, base, TeacherLogits(model=ft), cal.heldout, progress=False)
    info = auto.info["distillation"]["auto"]
    assert info["heldout_loss_chosen"] <= min(info["heldout_loss_all_row"], info["heldout_loss_all_col_here"])
    assert info["start"] == ("col" if info["heldout_loss_all_col_here"] < info["heldout_loss_all_row"] else "row")
    assert info["col_modules"] + info["row_modules"] == sum(not m.vocab for m in auto.modules.values())
    assert {m.mode for m in auto.modules.values() if not m.vocab} <= {"row", "col"}
    # the recorded loss is what the chosen mixture really gets on the held-out split
    bitdelta.apply(base, auto)
    got = heldout_loss(base, TeacherLogits(model=ft), cal.heldout, 16, "mse")
    bitdelta.unapply(base)
    assert got == pytest.approx(info["heldout_loss_chosen"], rel=1e-4)
    # A row delta that does nothing (zero scales): the search starts from all-col and ends no worse.
    useless = bitdelta.Delta({k: PackedModule(m.kind, m.mode, m.sign, m.scale * 0, m.in_features, m.vocab, m.extra_rows)
                              for k, m in row.modules.items()}, dict(row.dense), row.fingerprint, dict(row.info))
    from_col = choose_auto(useless, col, base, TeacherLogits(model=ft), cal.heldout, progress=False)
    c = from_col.info["distillation"]["auto"]
    assert c["start"] == "col"
    assert c["heldout_loss_chosen"] <= c["heldout_loss_all_col_here"] < c["heldout_loss_all_row"]
    auto.save_pretrained(base_dir.parent / "auto.bitdelta")
    again = bitdelta.Delta.from_pretrained(base_dir.parent / "auto.bitdelta")
    assert again.info["compression"]["scale"] == "auto"


def test_relative_lr_steps_scale_with_each_scale(setup):
    """The scales here are ~3e-4: an absolute step of 1e-2 throws them about (held-out loss
    rises), the same lr as a relative step moves each by about 1% and fits them."""
    base_dir, ft_dir, cal = setup
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", bits=2, progress=False)
    base, ft = load(base_dir), load(ft_dir)
    wild = distill_scales(delta, base, ft, cal, steps=10, lr=1e-2, progress=False, keep_better=False)
    w = wild.info["distillation"]
    assert w["heldout_loss_after"] > 2 * w["heldout_loss_before"] and w["lr_mode"] == "absolute"
    rel = distill_scales(delta, base, ft, cal, steps=10, lr=1e-2, progress=False, keep_better=False,
                         lr_mode="relative")
    r = rel.info["distillation"]
    assert r["heldout_loss_after"] < r["heldout_loss_before"] and r["lr_mode"] == "relative"
    for name, m in rel.modules.items():
        s0 = delta.modules[name].scale.float()
        assert torch.equal(m.sign, delta.modules[name].sign) and not m.scale.requires_grad
        ratio = m.scale / s0
        # AdamW moves the multiplier by at most about lr per step: 10 steps of 1e-2 stay within 15%
        assert (ratio - 1).abs().max() < 0.15, name
        assert not torch.equal(m.scale, s0), name
    assert not any(isinstance(m, bitdelta.layers.DeltaWrapper) for m in base.modules())


def test_relative_mode_keeps_initial_scales_when_worse_and_rejects_unknown_modes(setup):
    base_dir, ft_dir, cal = setup
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", progress=False)
    base, ft = load(base_dir), load(ft_dir)
    # a relative step of 300% per step is wild too: the guard restores the initial multipliers
    guarded = distill_scales(delta, base, ft, cal, steps=8, lr=3.0, progress=False, lr_mode="relative")
    assert guarded.info["distillation"]["kept"] == "initial"
    assert all(torch.equal(guarded.modules[k].scale, delta.modules[k].scale.float()) for k in delta.modules)
    with pytest.raises(bitdelta.BitDeltaError, match="lr mode"):
        distill_scales(delta, base, ft, cal, steps=2, progress=False, lr_mode="sideways")
    assert not any(isinstance(m, bitdelta.layers.DeltaWrapper) for m in base.modules())


def test_choose_modes_scalar_row_or_col_by_heldout_kl(setup):
    from bitdelta.distill import choose_modes

    base_dir, ft_dir, cal = setup
    base, ft = load(base_dir), load(ft_dir)
    cands = {m: distill_scales(bitdelta.compress(base_dir, ft_dir, scale=m, progress=False), base, ft, cal, steps=6,
                               lr=3e-2, lr_mode="relative", progress=False) for m in ("scalar", "row", "col")}
    auto = choose_modes(cands, base, TeacherLogits(model=ft), cal.heldout, min_gain=0.0, progress=False)
    info = auto.info["distillation"]["auto"]
    uniform = {m: info[f"heldout_loss_all_{m}"] for m in cands}
    assert info["criterion"] == "kl" and info["start"] == min(uniform, key=uniform.get)
    assert info["heldout_loss_chosen"] <= min(uniform.values())
    matrices = [n for n, m in auto.modules.items() if not m.vocab]
    assert sum(info[f"{m}_modules"] for m in cands) == len(matrices)
    for n in matrices:  # each module is one candidate's object, its mode recorded in the module itself
        assert auto.modules[n] is cands[auto.modules[n].mode].modules[n]
    bitdelta.apply(base, auto)
    got = heldout_loss(base, TeacherLogits(model=ft), cal.heldout, 16, "kl")
    bitdelta.unapply(base)
    assert got == pytest.approx(info["heldout_loss_chosen"], rel=1e-4)
    # a huge min_gain accepts no swap: the best uniform candidate, unchanged
    strict = choose_modes(cands, base, TeacherLogits(model=ft), cal.heldout, min_gain=1.0, progress=False)
    s = strict.info["distillation"]["auto"]
    assert s[f"{s['start']}_modules"] == len(matrices) and s["heldout_loss_chosen"] == uniform[s["start"]]
    with pytest.raises(bitdelta.BitDeltaError, match="held-out"):
        choose_modes(cands, base, TeacherLogits(model=ft), None, progress=False)
