"""Import of the BitDelta research code's diff.pt, with a fixture built here from its description.

The reference stores, per compressed linear, ``<m>.mask``: int32 ``[in/32, out]``, bit j (LSB
first) of word w in column o = 1 where Δ[o, 32w + j] >= 0, and ``<m>.coeff``: fp32 mean |Δ|; plus
dense bf16 values for what it trained (embeddings, lm_head, norms). Its ``load_diff`` then does
``W += ((bits * 2 - 1) * coeff).T.to(W.dtype)`` and replaces the dense parameters outright.
"""

import pytest
import torch

import bitdelta
from bitdelta.errors import FormatError, ShapeMismatchError
from models import load, make_pair


def reference_pack(positive_in_out: torch.Tensor) -> torch.Tensor:
    """bool [in, out] -> int32 [in/32, out], LSB first (written independently of bitdelta)."""
    k, n = positive_in_out.shape
    words = torch.zeros(k // 32, n, dtype=torch.int64)
    for j in range(32):
        words |= positive_in_out[j::32].long() << j
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def make_reference_diff(base, ft, path):
    diff = {}
    for name, module in ft.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            delta = module.weight.detach().float() - base.get_submodule(name).weight.detach().float()
            diff[f"{name}.mask"] = reference_pack((delta >= 0).t())
            diff[f"{name}.coeff"] = delta.abs().mean()
    for pname, p in ft.named_parameters():
        if "embed_tokens" in pname or "lm_head" in pname or "norm" in pname:
            diff[pname] = p.detach().to(torch.bfloat16)
    torch.save(diff, path)
    return diff


def reference_load_diff(model, diff):
    """The reference's merge semantics, re-stated: add the cast scaled signs, replace dense."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if f"{name}.mask" in diff:
                mask = diff[f"{name}.mask"]
                bits = torch.stack([(mask >> j) & 1 for j in range(32)], dim=1).reshape(-1, mask.shape[1])
                weight = (bits.bool().long() * 2 - 1) * diff[f"{name}.coeff"]
                module.weight.add_(weight.T.to(module.weight.dtype))
            elif f"{name}.weight" in diff:
                module.weight = torch.nn.Parameter(diff[f"{name}.weight"].to(module.weight.dtype))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_then_merge_equals_reference_load_diff(tmp_path, dtype):
    # the reference packs 32 input rows per int32, so in_features must be a multiple of 32
    import transformers

    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.MistralForCausalLM(cfg).eval()
    from models import finetune_like

    ft = finetune_like(base)
    base.save_pretrained(tmp_path / "base")
    diff = make_reference_diff(base, ft, tmp_path / "diff.pt")

    delta = bitdelta.import_reference(tmp_path / "base", tmp_path / "diff.pt", progress=False)
    delta.save_pretrained(tmp_path / "imported")
    delta = bitdelta.Delta.from_pretrained(tmp_path / "imported")
    ours = bitdelta.merge(load(tmp_path / "base").to(dtype), delta)
    theirs = reference_load_diff(load(tmp_path / "base").to(dtype), diff)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # and the 1-bit result is a usable approximation of the fine-tune
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        err = (ours.float()(ids).logits - ft(ids).logits).abs().mean()
        base_err = (base(ids).logits - ft(ids).logits).abs().mean()
    assert err < base_err


def test_import_errors(tmp_path):
    base_dir, ft_dir = make_pair("llama", tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(FormatError, match="weights_only"):
        bitdelta.import_reference(base_dir, tmp_path / "junk.pt", progress=False)
    torch.save({"model.layers.0.self_attn.q_proj.mask": torch.zeros(2, 40, dtype=torch.int32),
                "model.layers.0.self_attn.q_proj.coeff": torch.tensor(0.1)}, tmp_path / "wrong.pt")
    with pytest.raises(ShapeMismatchError, match="wrong base"):
        bitdelta.import_reference(base_dir, tmp_path / "wrong.pt", progress=False)
    torch.save({"x": torch.zeros(1)}, tmp_path / "nomask.pt")
    with pytest.raises(FormatError, match="no '<module>.mask'"):
        bitdelta.import_reference(base_dir, tmp_path / "nomask.pt", progress=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"a": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(FormatError):
        bitdelta.import_reference(base_dir, tmp_path / "evil.pt", progress=False)
