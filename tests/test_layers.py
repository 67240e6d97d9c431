"""DeltaWrapper's kernel path (used on CUDA for fp16/bf16 inference) agrees with its plain path,
for modules with and without a bias. On CPU the op dispatcher runs the reference op."""

import pytest
import torch

import bitdelta
from bitdelta.layers import DeltaWrapper
from models import load, make_pair


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama: no biases; qwen2: q/k/v biases
def test_kernel_path_matches_plain_path(arch, tmp_path):
    base_dir, ft_dir = make_pair(arch, tmp_path)
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", bits=2, progress=False)
    model = bitdelta.apply(load(base_dir), delta)
    wrappers = [m for m in model.modules() if isinstance(m, DeltaWrapper) and m.kind == "linear"]
    assert any(w.base_module.bias is None for w in wrappers)
    if arch == "qwen2":
        assert any(w.base_module.bias is not None for w in wrappers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in wrappers:
            for tokens in (3, 70):  # the decode-sized and the segmented (prefill) call
                x = torch.randn(tokens, w.packed.in_features, generator=g)
                torch.testing.assert_close(w._fused(x), w._linear(x), rtol=1e-4, atol=1e-5)
