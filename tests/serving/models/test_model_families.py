"""Every served family against its merged Hugging Face model: tiny random base/fine-tune pairs.

For Qwen3, Gemma-2, Gemma-3 (text), Phi-3 and Mistral with a sliding window (smaller than prompt +
generated tokens, so the window changes the result): several tenants (the base, a row-scaled and a
column-scaled delta) in one continuously batched engine produce exactly the greedy tokens of their
merged models, and one step's logits agree with the merged models' within float32 tolerance.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import arch_pairs
import bitdelta
from arch_pairs import finetune_of, load_model, make_arch_model
from bitdelta.errors import BitDeltaError
from bitdelta.serving.engine import Engine
from bitdelta.serving.mapping import BatchMapping
from bitdelta.serving.models import DeltaModel, UnsupportedModel
from serving.engine_checks import (
    emulate_graph_layout,
    greedy,
    merged_models,
    random_prompts,
    run_to_completion,
    served_with_deltas,
)

WINDOW = 5
FAMILIES = {  # arch -> config overrides
    "qwen3": {},
    "gemma": {},  # Gemma (1): (1 + w) norms, GELU-tanh, scaled embeddings, no sandwich
    "gemma2": {"sliding_window": WINDOW},  # alternating sliding/global layers, both soft-caps on
    "gemma3": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"],
               "final_logit_softcapping": 20.0},
    "phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    "mistral": {"sliding_window": WINDOW},
}


def _base(arch):
    if arch != "gemma":
        return make_arch_model(arch, **FAMILIES[arch])
    import transformers

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GemmaConfig(**arch_pairs._COMMON, head_dim=8)
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # as arch_pairs does: a spread everywhere (Gemma's norms start at zero)
        g = torch.Generator().manual_seed(100)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _pair(arch, tmp):
    base = _base(arch)
    d = {"base": tmp / "base"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(d["base"])
        for seed in (1, 2):
            # larger moves than arch_pairs' default, so that each tenant's greedy path is its own
            finetune_of(base, seed, scale=0.3).save_pretrained(tmp / f"ft{seed}")
    deltas = {"row": bitdelta.compress(d["base"], tmp / "ft1", scale="row", progress=False),
              "col": bitdelta.compress(d["base"], tmp / "ft2", scale="col", progress=False)}
    return load_model(d["base"]), deltas


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_mixed_batch_matches_merged(arch, tmp_path):
    base_hf, deltas = _pair(arch, tmp_path)
    model, slots = served_with_deltas(base_hf, deltas, max_gpu_deltas=2, max_cpu_deltas=4)
    assert model.arch.family == base_hf.config.model_type
    windowed = "sliding_window" in FAMILIES[arch]
    assert any(w == WINDOW for w in model.arch.windows) == windowed
    merged = merged_models(base_hf, deltas)
    engine = Engine(model, slots, max_batch=8, kv_cache_mb=16)
    emulate_graph_layout(engine)

    g = torch.Generator().manual_seed(0)
    vocab = model.vocab_size
    plan = [(None, 0, 9, 8), ("row", 0, 6, 18), ("col", 0, 33, 6), ("row", 2, 4, 8), ("col", 3, 7, 9),
            (None, 4, 12, 5)]  # (tenant, arrival step, prompt length, new tokens): prompt + output > WINDOW
    reqs = run_to_completion(engine, random_prompts(plan, vocab, g), max_steps=100)
    assert engine.graphs.replays >= 1
    for r in reqs:
        assert r.finish_reason == "length"
        want = greedy(merged[r.tenant], r.prompt, r.params.max_tokens)
        assert r.output == want, f"{arch} tenant {r.tenant}: {r.output} != merged {want}"

    # One prefill step of three tenants: logits against each merged model's last-position logits.
    prompts = [torch.randint(0, vocab, (11,), generator=g).tolist() for _ in range(3)]
    tenants = [None, "row", "col"]
    entries = [(i, 0, p, -1 if t is None else slots.load(t)) for i, (t, p) in enumerate(zip(tenants, prompts))]
    got = model.forward(BatchMapping.build(entries, model.device), engine.kv, slots)
    with torch.no_grad():
        want = torch.stack([merged[t](torch.tensor([p])).logits[0, -1] for t, p in zip(tenants, prompts)])
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    if windowed:  # the window changes these logits: without it they would not match
        for layer in model.model.layers:
            layer.self_attn.window = None
        full = model.forward(BatchMapping.build(entries, model.device), engine.kv, slots)
        assert (full - want).abs().max() > 1e-3


def test_from_hf_refuses_what_it_does_not_implement():
    with pytest.raises(UnsupportedModel, match="rope_type 'dynamic'"):
        DeltaModel.from_hf(make_arch_model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                     "factor": 2.0}))
    with pytest.raises(UnsupportedModel, match="hidden_act 'gelu'"):
        DeltaModel.from_hf(make_arch_model("qwen3", hidden_act="gelu"))
    with pytest.raises(UnsupportedModel, match="'gpt2'"):
        DeltaModel.from_hf(make_arch_model("gpt2"))
    with pytest.raises(BitDeltaError, match="bitdelta merge"):
        DeltaModel.from_hf(make_arch_model("olmo2"))
