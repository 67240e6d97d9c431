"""Stacked projections (bitdelta.serving.models.stacked): q/k/v and gate/up become views of one matrix
per group when a served model is built; the logits are those of the separate matrices, with and
without deltas, on prompt and decode steps, with row- and column-scaled tenants and a low-rank
correction; decode steps take the grouped op, prompt steps and column-scaled tenants the per-member
calls; what cannot be stacked (biases, Phi-3's already fused matrices) stays as it was."""

from __future__ import annotations

import warnings

import pytest
import torch

import bitdelta
from arch_pairs import finetune_of, load_model, make_arch_model
from bitdelta.serving import dispatch as dispatch_mod
from bitdelta.serving.kv_cache import KVCache
from bitdelta.serving.mapping import BatchMapping
from bitdelta.serving.models import DeltaModel
from bitdelta.serving.models.stacked import STACKED_ENV, stacking_on
from bitdelta.serving.slots import DeltaSlots


def _pair(arch, tmp_path):
    base = make_arch_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp_path / "base")
        for seed in (1, 2, 3):
            finetune_of(base, seed, scale=0.3).save_pretrained(tmp_path / f"ft{seed}")
    return load_model(tmp_path / "base")


def _deltas(tmp_path) -> dict:
    """A row-scaled, a column-scaled and a low-rank-corrected delta of the three fine-tunes of ``_pair``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"row": bitdelta.compress(tmp_path / "base", tmp_path / "ft1", scale="row", progress=False),
                "col": bitdelta.compress(tmp_path / "base", tmp_path / "ft2", scale="col", progress=False),
                "low": bitdelta.compress(tmp_path / "base", tmp_path / "ft3", scale="row", lowrank_rank=4,
                                         progress=False)}


def _served(base_hf, deltas, monkeypatch, stacked: bool, device=None, dtype=None):
    monkeypatch.setenv(STACKED_ENV, "1" if stacked else "0")
    model = DeltaModel.from_hf(base_hf, device=device, dtype=dtype)
    slots = DeltaSlots(model, max_gpu_deltas=len(deltas), max_lowrank_rank=4)
    for name, delta in deltas.items():
        slots.register(name, f"<memory:{name}>", delta=delta)
    return model, slots, {name: slots.load(name) for name in deltas}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3", "qwen2"])
def test_stacked_weights_are_views_of_one_matrix(arch, tmp_path, monkeypatch):
    base = _pair(arch, tmp_path)
    monkeypatch.setenv(STACKED_ENV, "0")
    separate = DeltaModel.from_hf(base)
    monkeypatch.setenv(STACKED_ENV, "1")
    model = DeltaModel.from_hf(base)
    # the same checkpoint names, shapes and values: delta artifacts and slots see no difference
    assert model.delta_modules() == separate.delta_modules()
    for name, w in model.weights.items():
        assert torch.equal(w, separate.weights[name]), name
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = [(attn.qkv_stack, ("q_proj", "k_proj", "v_proj"), attn), (mlp.gate_up_stack, ("gate_proj", "up_proj"),
                                                                           mlp)]
        for stack, keys, owner in groups:
            if arch == "phi3" or (arch == "qwen2" and keys[0] == "q_proj"):
                # Phi-3's matrices are fused already; Qwen2's q/k/v carry biases (per-tenant deltas): apart
                assert stack is None
                continue
            assert stack is not None
            members = [getattr(owner, k) for k in keys]
            assert stack.names == [m.name for m in members]
            at = 0
            for m in members:  # each member's weight is its rows of the stack, not a copy
                n = m.weight.shape[0]
                assert m.weight.data_ptr() == stack.weight[at:at + n].data_ptr()
                at += n
            assert at == stack.weight.shape[0]


def _steps(vocab, slots_of):
    """Prefill and decode steps over four sequences: base rows, row-scaled, column-scaled and
    low-rank tenants, a chunk continuing beside decode rows."""
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    row, col, low = slots_of["row"], slots_of["col"], slots_of["low"]
    return [
        [(0, 0, toks(5), row), (1, 0, toks(5), -1), (2, 0, toks(6), low)],   # prompts
        [(0, 5, toks(1), row), (1, 5, toks(1), -1)],                          # decode: the grouped op
        [(0, 6, toks(1), row), (1, 6, toks(1), -1), (2, 6, toks(1), low)],   # decode with a low-rank tenant
        [(0, 7, toks(1), row), (3, 0, toks(4), col)],                        # a col tenant's prompt
        [(0, 8, toks(1), row), (3, 4, toks(1), col), (1, 7, toks(1), -1)],  # decode with a col tenant
        [(0, 9, toks(1), -1), (1, 8, toks(1), -1)],                           # no delta at all
        [(0, 10, toks(1), row), (1, 9, toks(3), row)],                       # a chunk beside a decode row
        [(4, 0, toks(40), row), (0, 11, toks(1), row)],                      # a long prompt: segmented op
    ]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_stacked_and_separate_projections_give_the_same_logits(arch, tmp_path, monkeypatch):
    base = _pair(arch, tmp_path)
    deltas = _deltas(tmp_path)
    grouped = []
    real = dispatch_mod.bitdelta_linear_group

    def counted(x, w, members, *args, **kwargs):
        grouped.append(x.shape[0])
        return real(x, w, members, *args, **kwargs)

    monkeypatch.setattr(dispatch_mod, "bitdelta_linear_group", counted)
    logits = {}
    for stacked in (False, True):
        model, slots, slot_of = _served(base, deltas, monkeypatch, stacked)
        kv = KVCache(model.num_layers, 5, 64, model.kv_heads, model.head_dim, model.dtype, model.device, block_size=4)
        per_step = []
        for entries in _steps(model.vocab_size, slot_of):
            before = len(grouped)
            per_step.append(model.forward(BatchMapping.build(entries, model.device, kv), kv, slots))
            per_step.append(len(grouped) - before)
        logits[stacked] = per_step
    calls = logits[True][1::2]
    # two groups a layer (q/k/v, gate/up) on steps of short sequences, low-rank terms included; a
    # column-scaled tenant in the step or a long prompt (the segmented op) goes member by member; a
    # step without deltas takes the stacked base GEMM alone
    two = 2 * len(model.model.layers)
    assert calls == [two, two, two, 0, 0, 0, two, 0]
    assert logits[False][1::2] == [0] * 8
    for i, (a, b) in enumerate(zip(logits[True][0::2], logits[False][0::2])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {i}")


def test_stacking_switch(monkeypatch):
    monkeypatch.delenv(STACKED_ENV, raising=False)
    assert stacking_on()
    monkeypatch.setenv(STACKED_ENV, "0")
    assert not stacking_on()
    monkeypatch.setenv(STACKED_ENV, "yes")
    with pytest.raises(ValueError, match="BITDELTA_STACKED_PROJECTIONS must be 1 or 0"):
        stacking_on()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stacked_projections_on_the_gpu(tmp_path, monkeypatch):
    """bf16 on a GPU: the grouped binary tensor-core op (sm_90) or the per-member Triton calls give
    the logits of separate matrices, step after step, with row, column-scaled and low-rank tenants."""
    base = _pair("llama", tmp_path).to(torch.bfloat16)
    deltas = _deltas(tmp_path)
    logits = {}
    for stacked in (False, True):
        model, slots, slot_of = _served(base, deltas, monkeypatch, stacked, device="cuda", dtype=torch.bfloat16)
        kv = KVCache(model.num_layers, 5, 64, model.kv_heads, model.head_dim, model.dtype, model.device, block_size=4)
        logits[stacked] = [model.forward(BatchMapping.build(entries, model.device, kv), kv, slots).cpu()
                           for entries in _steps(model.vocab_size, slot_of)]
    for i, (a, b) in enumerate(zip(logits[True], logits[False])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2, msg=f"step {i}")
