"""The reference recipe (``train_dense=True``): dense embeddings/lm_head/norms train too, the base
stays bit-identical, and the default keeps every dense extra untouched."""

import torch

import bitdelta
from bitdelta.calibration import Calibration, TokenBatches
from bitdelta.distill import distill_scales
from models import load, make_pair


def _samples(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return TokenBatches(torch.randint(1, vocab, (n, length), generator=g), torch.ones(n, length, dtype=torch.long))


def test_train_dense_trains_embeddings_and_norms_only_in_the_delta(tmp_path):
    torch.set_num_threads(1)
    base_dir, ft_dir = make_pair("llama", tmp_path)
    cal = Calibration(_samples(16, 10, 97, 0), _samples(4, 10, 97, 1), "random-ids")
    delta = bitdelta.compress(base_dir, ft_dir, scale="scalar", dense_embeddings=True, progress=False)
    assert "model.embed_tokens.weight" in delta.dense
    base, ft = load(base_dir), load(ft_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}

    plain = distill_scales(delta, base, ft, cal, steps=5, lr=1e-3, batch_size=4, progress=False)
    for k, v in delta.dense.items():  # default: dense extras are copied, never trained
        assert torch.equal(plain.dense[k], v)
    assert "train_dense" not in plain.info["distillation"]

    ref = distill_scales(delta, base, ft, cal, steps=5, lr=1e-3, batch_size=4, progress=False, train_dense=True)
    trained = ref.info["distillation"]["train_dense"]
    assert "model.embed_tokens.weight" in trained and any("norm" in k for k in trained)
    for k in trained:
        assert not torch.equal(ref.dense[k], delta.dense[k]), k
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # base untouched
    assert all(torch.equal(delta.dense[k], v) for k, v in delta.dense.items())
    for name, m in ref.modules.items():  # scales trained as before
        assert not torch.equal(m.scale, delta.modules[name].scale), name
