"""Compress -> save -> load -> apply / merge on tiny random models of six architectures."""

import pytest
import torch

import bitdelta
from bitdelta.targets import CONV1D
from models import ARCHS, VOCAB, load, make_pair


def _ids(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 9), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_matches_merge_and_approaches_finetune(arch, tmp_path):
    base_dir, ft_dir = make_pair(arch, tmp_path)
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", progress=False)
    delta.save_pretrained(tmp_path / "delta")
    delta = bitdelta.Delta.from_pretrained(tmp_path / "delta")

    # every linear-like matrix and the embedding are compressed, found by type not name
    model = load(base_dir)
    linear_like = [n for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    expected = set(linear_like) - ({"lm_head"} if tied else set())
    embed = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    assert set(delta.modules) == expected | set(embed)
    if arch == "gpt2":
        assert any(m.kind == CONV1D for m in delta.modules.values())
    assert all(m.mode == "row" for m in delta.modules.values())

    ids = _ids(VOCAB)
    ft = load(ft_dir)
    with torch.no_grad():
        base_logits = model(ids).logits
        bitdelta.apply(model, delta)
        applied = model(ids).logits
        bitdelta.unapply(model)
        assert torch.equal(model(ids).logits, base_logits), "unapply must restore the base exactly"
        merged = bitdelta.merge(model, delta)(ids).logits
        ft_logits = ft(ids).logits
    torch.testing.assert_close(applied, merged, rtol=1e-4, atol=1e-4)
    # the compressed model is much closer to the fine-tune than the base is
    assert (merged - ft_logits).pow(2).mean() < 0.6 * (base_logits - ft_logits).pow(2).mean()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_delta_of_base_against_itself_merges_to_base_exactly(arch, tmp_path):
    base_dir, _ = make_pair(arch, tmp_path)
    delta = bitdelta.compress(base_dir, base_dir, scale="col", bits=2, progress=False)
    assert not delta.dense
    model = load(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bitdelta.merge(model, delta)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("gpt2", True), ("phi3", False)])
def test_added_tokens_are_stored_dense_and_work(arch, tie, tmp_path):
    base_dir, ft_dir = make_pair(arch, tmp_path, extra_vocab=3, tie=tie)
    delta = bitdelta.compress(base_dir, ft_dir, progress=False)
    vocab_modules = [m for m in delta.modules.values() if m.vocab and m.kind != "conv1d" and m.extra_rows is not None]
    assert vocab_modules and all(m.extra_rows.shape[0] == 3 and m.out_features == VOCAB for m in vocab_modules)
    assert len(vocab_modules) == (1 if tie else 2)
    assert delta.info["vocab_size"] == VOCAB + 3
    delta.save_pretrained(tmp_path / "d")
    delta = bitdelta.Delta.from_pretrained(tmp_path / "d")
    ids = torch.tensor([[1, VOCAB, VOCAB + 2, 5, VOCAB + 1]])
    model, ft = load(base_dir), load(ft_dir)
    with torch.no_grad():
        applied = bitdelta.apply(model, delta)(ids).logits
        bitdelta.unapply(model)
        merged = bitdelta.merge(model, delta)(ids).logits
        ft_logits = ft(ids).logits
    assert applied.shape[-1] == merged.shape[-1] == VOCAB + 3 == model.config.vocab_size
    torch.testing.assert_close(applied, merged, rtol=1e-4, atol=1e-4)
    # the added tokens' rows are exact: their embeddings and head rows come from the fine-tune
    emb_ft = ft.get_input_embeddings().weight[VOCAB:]
    assert torch.equal(model.get_input_embeddings().weight[VOCAB:], emb_ft)
    assert torch.equal(model.get_output_embeddings().weight[VOCAB:], ft.get_output_embeddings().weight[VOCAB:])
    assert (merged - ft_logits).abs().mean() < 0.05


def test_dense_embeddings_switch_keeps_reference_behaviour(tmp_path):
    base_dir, ft_dir = make_pair("mistral", tmp_path)
    delta = bitdelta.compress(base_dir, ft_dir, dense_embeddings=True, progress=False)
    assert "model.embed_tokens" not in delta.modules and "lm_head" not in delta.modules
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(delta.dense)
    model = bitdelta.merge(load(base_dir), delta)
    ft = load(ft_dir)
    assert torch.equal(model.lm_head.weight, ft.lm_head.weight)


def test_target_and_exclude_select_modules(tmp_path):
    base_dir, ft_dir = make_pair("llama", tmp_path)
    only_attn = bitdelta.compress(base_dir, ft_dir, target=["*.q_proj", "v_proj$"], progress=False)
    assert set(only_attn.modules) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    # modules not compressed but changed by fine-tuning are kept dense, so nothing is lost
    assert "model.layers.0.mlp.up_proj.weight" in only_attn.dense
    no_mlp = bitdelta.compress(base_dir, ft_dir, exclude=[r"\.mlp\."], progress=False)
    assert not any(".mlp." in n for n in no_mlp.modules) and "model.embed_tokens" in no_mlp.modules
    model = bitdelta.merge(load(base_dir), only_attn)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, load(ft_dir).model.layers[1].mlp.down_proj.weight)


def test_compress_accepts_loaded_models(tmp_path):
    base_dir, ft_dir = make_pair("qwen2", tmp_path)
    from_dirs = bitdelta.compress(base_dir, ft_dir, progress=False)
    from_models = bitdelta.compress(load(base_dir), load(ft_dir), progress=False)
    assert from_dirs.modules.keys() == from_models.modules.keys()
    for k, m in from_dirs.modules.items():
        assert torch.equal(m.sign, from_models.modules[k].sign)
        assert torch.equal(m.scale, from_models.modules[k].scale)
    assert from_dirs.fingerprint.sha256 == from_models.fingerprint.sha256
