"""On a GPU, apply() runs compressed linears through the fused Triton kernels; they must agree
with merge() and with the CPU reference path."""

import pytest
import torch

import bitdelta
from models import load, make_pair


@pytest.mark.cuda
@pytest.mark.parametrize("scale", ["scalar", "row", "col"])
def test_apply_on_cuda_uses_kernels_and_matches_merge(scale, tmp_path, monkeypatch):
    base_dir, ft_dir = make_pair("llama", tmp_path)
    delta = bitdelta.compress(base_dir, ft_dir, scale=scale, bits=2, progress=False)
    calls = []
    import bitdelta.ops as ops

    real = ops.bitdelta_linear_segmented
    monkeypatch.setattr(ops, "bitdelta_linear_segmented", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 97, (3, 40), device="cuda")
    model = load(base_dir).to("cuda", torch.float16)
    with torch.no_grad():
        applied = bitdelta.apply(model, delta)(ids).logits.float()
        bitdelta.unapply(model)
        merged = bitdelta.merge(model, delta)(ids).logits.float()
    assert calls, "the fused kernel path was not used"
    torch.testing.assert_close(applied, merged, rtol=2e-2, atol=2e-2)
