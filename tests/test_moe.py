"""Mixture-of-experts fine-tunes and the nothing-lost guarantee.

Every expert's matrix gets its own sign plane and scales (fused experts in the model, per-expert or
fused tensors in the checkpoint); apply, merge and distillation carry them; a base and fine-tune of
different structure, or any changed tensor a delta would not carry, is an error naming tensors.
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitdelta
from arch_pairs import VOCAB, load_model, make_arch_model, make_arch_pair
from bitdelta.calibration import Calibration, TokenBatches
from bitdelta.cli import main
from bitdelta.coverage import CoverageError
from bitdelta.distill import distill_scales
from bitdelta.errors import BitDeltaError, ShapeMismatchError
from bitdelta.layers import DeltaParametrization
from bitdelta.report import describe_artifact, format_report


def _ids(seed=0, n=2, length=9):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_arch_pair("mixtral", tmp_path_factory.mktemp("mixtral"))


def test_each_expert_gets_its_own_signs_and_scales(mixtral):
    base_dir, ft_dir = mixtral
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", bits=2, progress=False)
    base, ft = load_model(base_dir), load_model(ft_dir)
    experts = base.model.layers[0].mlp.experts
    E, two_i, h = experts.gate_up_proj.shape
    for e in range(E):
        packed = delta.modules[f"model.layers.0.mlp.experts.gate_up_proj[{e}]"]
        assert (packed.bits, packed.out_features, packed.in_features, packed.mode) == (2, two_i, h, "row")
        true = ft.model.layers[0].mlp.experts.gate_up_proj[e] - experts.gate_up_proj[e]
        approx = packed.dense()
        # the expert's own delta, not a neighbour's: signs agree where the change is clear
        clear = true.abs() > true.abs().median()
        assert (torch.sign(approx[clear]) == torch.sign(true[clear])).float().mean() > 0.99
    scales = [delta.modules[f"model.layers.0.mlp.experts.down_proj[{e}]"].scale for e in range(E)]
    assert all(not torch.equal(scales[0], s) for s in scales[1:])
    # the router (not an nn.Linear) is compressed as a linear
    assert delta.modules["model.layers.0.mlp.gate"].kind == "linear"
    assert not any("experts" in n or ".gate." in n for n in delta.dense)


def test_apply_matches_merge_unapply_restores_and_distillation_trains_expert_scales(mixtral):
    base_dir, ft_dir = mixtral
    delta = bitdelta.compress(base_dir, ft_dir, scale="scalar", progress=False)
    model, ft = load_model(base_dir), load_model(ft_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = dict(model.named_parameters())
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids).logits
        bitdelta.apply(model, delta)
        assert any(isinstance(m, DeltaParametrization) for m in model.modules())
        applied = model(ids).logits
        bitdelta.unapply(model)
        assert torch.equal(model(ids).logits, base_logits)
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        merged = bitdelta.merge(load_model(base_dir), delta)(ids).logits
        ft_logits = ft(ids).logits
    torch.testing.assert_close(applied, merged, rtol=1e-4, atol=1e-4)
    assert (merged - ft_logits).norm() < 0.9 * (base_logits - ft_logits).norm()

    g = torch.Generator().manual_seed(3)

    def batches(n):
        return TokenBatches(torch.randint(0, VOCAB, (n, 10), generator=g), torch.ones(n, 10, dtype=torch.long))

    cal = Calibration(batches(16), batches(8), "random-ids")
    out = distill_scales(delta, model, ft, cal, steps=15, lr=3e-2, lr_mode="relative", batch_size=4,
                         keep_better=False, progress=False)
    expert_names = [n for n in delta.modules if n.endswith("]")]
    assert expert_names and all(not torch.equal(out.modules[n].scale, delta.modules[n].scale) for n in expert_names)
    assert not torch.equal(out.modules["model.layers.1.mlp.gate"].scale, delta.modules["model.layers.1.mlp.gate"].scale)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the base is never written"


def test_fused_checkpoint_experts_transposed_in_the_model(tmp_path):
    """GPT-OSS stores its experts fused and in × out (the forward computes x @ W[e])."""
    base_dir, ft_dir = make_arch_pair("gpt_oss", tmp_path)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(base_dir / "model.safetensors")
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", progress=False)
    base = load_model(base_dir)
    stored = base.model.layers[0].mlp.experts.gate_up_proj  # [E, hidden, 2 * intermediate]
    packed = delta.modules["model.layers.0.mlp.experts.gate_up_proj[1]"]
    assert packed.kind == "conv1d" and (packed.out_features, packed.in_features) == (stored.shape[2], stored.shape[1])
    before = stored.detach().clone()
    merged = bitdelta.merge(base, delta).model.layers[0].mlp.experts.gate_up_proj
    torch.testing.assert_close(merged[1] - before[1], packed.dense().t(), rtol=0, atol=1e-6)


def test_structure_mismatch_is_an_error_naming_tensors_before_any_work(tmp_path, monkeypatch):
    base = make_arch_model("llama", num_hidden_layers=4)
    base.save_pretrained(tmp_path / "base4")
    make_arch_model("llama").save_pretrained(tmp_path / "ft2")
    calls = []
    monkeypatch.setattr(sys.modules["bitdelta.compress"], "binarize", lambda *a, **k: calls.append(1))
    with pytest.raises(ShapeMismatchError, match=r"only in the base: model\.layers\.2\.") as e:
        bitdelta.compress(tmp_path / "base4", tmp_path / "ft2", progress=False)
    assert "must come from this base" in str(e.value) and not calls
    assert main(["compress", "--base", str(tmp_path / "base4"), "--finetuned", str(tmp_path / "ft2"),
                 "--out", str(tmp_path / "d"), "-q"]) == 2
    assert not (tmp_path / "d").exists()


def test_a_changed_tensor_the_delta_would_lose_stops_compression(mixtral, tmp_path, monkeypatch):
    base_dir, ft_dir = mixtral
    # a bug that would drop dense extras (norms) must be caught by the audit, not pass silently
    monkeypatch.setattr(sys.modules["bitdelta.compress"], "_dense_extras", lambda *a, **k: {})
    with pytest.raises(CoverageError, match=r"input_layernorm\.weight") as e:
        bitdelta.compress(base_dir, ft_dir, progress=False)
    assert "neither compressed nor stored dense" in str(e.value)


def test_stored_tensors_the_model_does_not_load_need_exclude(mixtral, tmp_path):
    base_dir, ft_dir = mixtral
    pair = []
    for src, value in ((base_dir, 0.0), (ft_dir, 1.0)):
        out = tmp_path / src.name
        out.mkdir()
        for f in src.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
        tensors = load_file(out / "model.safetensors")
        tensors["model.extra_scratch.weight"] = torch.full((3,), value)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        pair.append(out)
    with pytest.raises(CoverageError, match=r"model\.extra_scratch\.weight"):
        bitdelta.compress(*pair, progress=False)
    art = tmp_path / "art"
    assert main(["compress", "--base", str(pair[0]), "--finetuned", str(pair[1]), "--out", str(art), "-q",
                 "--exclude", "extra_scratch"]) == 0
    comp = json.loads((art / "delta_config.json").read_text())["compression"]
    assert comp["excluded_tensors"] == ["model.extra_scratch.weight"]
    assert comp["coverage"]["tensors"]["excluded"] == 1 and comp["coverage"]["parameters"]["excluded"] == 3


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_inspect_shows_coverage(arch, tmp_path, capsys):
    base_dir, ft_dir = make_arch_pair(arch, tmp_path)
    art = tmp_path / "art"
    assert main(["compress", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(art), "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(art)]) == 0
    text = capsys.readouterr().out
    stored = load_file(ft_dir / "model.safetensors")
    cov = describe_artifact(art)["coverage"]
    assert sum(cov["tensors"].values()) == len(stored)
    assert sum(cov["parameters"].values()) == sum(t.numel() for t in stored.values())
    experts = [k for k in stored if ".experts." in k]
    assert cov["tensors"]["compressed"] >= len(experts) > 0 and cov["tensors"]["unchanged"] == 0
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ") and "tensors" in line}
    for cat in ("compressed", "dense", "excluded", "unchanged"):
        assert lines[cat][1:] == [f"{cov['tensors'][cat]:,}", "tensors", f"{cov['parameters'][cat]:,}", "parameters"]
    assert cov["expert_matrices"] == 2 * 2 * 4 and "expert matrices" in format_report(describe_artifact(art))


def test_serving_engine_refuses_moe_bases_and_says_to_merge():
    from bitdelta.serving.model import DeltaLlama

    with pytest.raises(BitDeltaError, match="bitdelta merge"):
        DeltaLlama.from_hf(make_arch_model("mixtral"))


def test_auto_scale_chooses_row_or_col_per_expert(mixtral):
    from bitdelta.distill import TeacherLogits, choose_auto

    base_dir, ft_dir = mixtral
    row = bitdelta.compress(base_dir, ft_dir, scale="row", progress=False)
    col = bitdelta.compress(base_dir, ft_dir, scale="col", progress=False)
    model, ft = load_model(base_dir), load_model(ft_dir)
    held = TokenBatches(_ids(5, n=6, length=10), torch.ones(6, 10, dtype=torch.long))
    chosen = choose_auto(row, col, model, TeacherLogits(model=ft), held, progress=False)
    experts = [n for n in chosen.modules if n.endswith("]")]
    modes = {chosen.modules[n].mode for n in experts}
    by_mode = {"row": row, "col": col}
    assert modes <= {"row", "col"}
    assert all(chosen.modules[n] is by_mode[chosen.modules[n].mode].modules[n] for n in experts)
    auto = chosen.info["distillation"]["auto"]
    assert auto["heldout_loss_chosen"] <= min(auto["heldout_loss_all_row"], auto["heldout_loss_all_col_here"])
    assert not any(isinstance(m, DeltaParametrization) for m in model.modules()), "unapplied afterwards"


def test_cli_distillation_and_eval_on_a_moe_pair(tmp_path, capsys):
    """`compress --distill-steps` and `eval` run a Mixtral delta end to end (tokenizer included)."""
    from arch_pairs import byte_tokenizer

    tok = byte_tokenizer()
    base_dir, ft_dir = make_arch_pair("mixtral", tmp_path, vocab_size=len(tok))
    tok.save_pretrained(ft_dir)
    tok.save_pretrained(base_dir)
    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"sample {i}: the quick brown fox jumps {i * 7} times"})
                              for i in range(24)))
    art = tmp_path / "art"
    assert main(["compress", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(art), "-q",
                 "--distill-steps", "4", "--calibration", str(data), "--num-samples", "16", "--seq-len", "24",
                 "--heldout-samples", "4", "--distill-lr", "3e-2", "--distill-lr-mode", "relative",
                 "--device", "cpu"]) == 0
    cfg = json.loads((art / "delta_config.json").read_text())
    assert cfg["distillation"]["steps"] == 4 and cfg["compression"]["coverage"]["tensors"]["compressed"] > 0
    capsys.readouterr()
    assert main(["eval", "fidelity", "--base", str(base_dir), "--finetuned", str(ft_dir), "--delta", str(art),
                 "--data", str(data), "--limit", "6", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main(["eval", "fidelity", "--base", str(base_dir), "--finetuned", str(ft_dir),
                 "--data", str(data), "--limit", "6", "--device", "cpu"]) == 0
    without = json.loads(capsys.readouterr().out)
    # the delta brings the base closer to the fine-tune than the base alone: KL(fine-tune || model)
    assert out["n_tokens"] == without["n_tokens"] > 0
    assert 0 < out["kl"] < without["kl"], (out, without)


def test_base_stored_per_expert_and_fine_tune_stored_fused_give_the_same_delta(mixtral, tmp_path):
    base_dir, ft_dir = mixtral
    fused = tmp_path / "ft-fused"
    fused.mkdir()
    for f in ft_dir.iterdir():
        if f.suffix != ".safetensors":
            (fused / f.name).write_bytes(f.read_bytes())
    state = {k: v.contiguous() for k, v in load_model(ft_dir).state_dict().items()}
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(fused / "model.safetensors")
    a = bitdelta.compress(base_dir, ft_dir, progress=False)
    b = bitdelta.compress(base_dir, fused, progress=False)
    assert a.modules.keys() == b.modules.keys()
    for name, m in a.modules.items():
        assert torch.equal(m.sign, b.modules[name].sign) and torch.equal(m.scale, b.modules[name].scale)
    assert b.info["compression"]["coverage"]["tensors"]["compressed"] == 2 * (4 + 1 + 2) + 2


@pytest.mark.parametrize("mode", ["scalar", "row", "col"])
def test_expert_delta_gradients_match_autograd_through_the_dense_reconstruction(mode):
    from bitdelta.binarize import binarize, reconstruct
    from bitdelta.layers import packed_delta

    g = torch.Generator().manual_seed(0)
    sign, scale = binarize(torch.randn(6, 13, generator=g), mode, bits=2)
    weights = torch.randn(6, 13, generator=g)
    a = scale.clone().requires_grad_(True)
    b = scale.clone().requires_grad_(True)
    (packed_delta(sign, a, mode, 13) * weights).sum().backward()
    (reconstruct(sign, b, 13, mode) * weights).sum().backward()
    torch.testing.assert_close(packed_delta(sign, scale, mode, 13), reconstruct(sign, scale, 13, mode))
    torch.testing.assert_close(a.grad, b.grad)
