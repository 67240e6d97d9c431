"""What the engine-against-merged-model tests share: the reference side (plain Hugging Face greedy
decoding and one merged model per tenant), the served side (a DeltaModel with its deltas registered,
an engine run until every request of a plan finished, decode steps in the CUDA-graph layout run
eagerly), and the tiny random Llama those tests serve.

A plan lists requests as ``(tenant, arrival step, prompt, new tokens)``; ``random_prompts`` turns
prompt lengths into random prompts.
"""

from __future__ import annotations

import copy
import warnings

import torch

import bitdelta
from bitdelta.serving.engine import Request, SamplingParams
from bitdelta.serving.graphs import DecodeGraphs
from bitdelta.serving.models import DeltaModel
from bitdelta.serving.slots import DeltaSlots


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of a Hugging Face causal LM after ``prompt``, one full forward per token."""
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        nxt = int(model(ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def load_hf(path):
    """A saved Hugging Face causal LM in float32, in eval mode (load-time warnings silenced)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def base_and_row_deltas(tiny_models) -> tuple:
    """The shipped tiny base (float32 Hugging Face model) and its two fine-tunes compressed with row
    scales, as ``{"shk": ..., "gsm": ...}``."""
    base = tiny_models["base"]
    deltas = {"shk": bitdelta.compress(base, tiny_models["shakespeare"], scale="row", progress=False),
              "gsm": bitdelta.compress(base, tiny_models["gsm8k"], scale="row", progress=False)}
    return load_hf(base), deltas


def merged_models(base_hf, deltas: dict) -> dict:
    """Tenant -> reference model: ``None`` the base itself, each delta merged into its own copy."""
    merged = {None: base_hf}
    for name, delta in deltas.items():
        merged[name] = bitdelta.merge(copy.deepcopy(base_hf), delta)
    return merged


def served_with_deltas(base_hf, deltas: dict, **slot_settings) -> tuple[DeltaModel, DeltaSlots]:
    """The served model of ``base_hf`` and a delta pool with every delta registered under its name."""
    model = DeltaModel.from_hf(base_hf)
    slots = DeltaSlots(model, **slot_settings)
    for name, delta in deltas.items():
        slots.register(name, f"<memory:{name}>", delta=delta)
    return model, slots


def emulate_graph_layout(engine, prompts: bool = True) -> DecodeGraphs:
    """Steps in the CUDA-graph layout (one-token rows, padding rows, span buckets, masks), run eagerly,
    so that the layout is checked on a CPU; ``prompts``: steps with short prompts too, split into
    one-token rows as the engine does on CUDA (else they run eagerly)."""
    engine.graphs = DecodeGraphs(engine.model, engine.kv, engine.slots, engine.max_batch, capture=False,
                                 min_span=8, max_tokens=engine._graph_tokens() if prompts else 0)
    return engine.graphs


def random_prompts(plan, vocab: int, generator: torch.Generator, low: int = 0) -> list[tuple]:
    """``plan`` with each prompt length replaced by that many random token ids in ``[low, vocab)``, drawn
    in plan order (the arrival order of a plan sorted by arrival step)."""
    return [(tenant, arrival, torch.randint(low, vocab, (plen,), generator=generator).tolist(), n)
            for tenant, arrival, plen, n in plan]


def run_to_completion(engine, plan, max_steps: int, on_step=None) -> list[Request]:
    """Submits each request of ``plan`` (greedy) at its arrival step and steps the engine until all
    finished, at most ``max_steps`` steps; ``on_step(requests)`` runs after every step. Returns the
    requests in submission order."""
    reqs, step, pending = [], 0, list(plan)
    while pending or any(r.finish_reason is None for r in reqs):
        for item in [p for p in pending if p[1] == step]:
            tenant, _, prompt, n = item
            reqs.append(engine.submit(Request(prompt=prompt, tenant=tenant,
                                              params=SamplingParams(max_tokens=n, temperature=0))))
            pending.remove(item)
        engine.step()
        if on_step is not None:
            on_step(reqs)
        step += 1
        assert step < max_steps, f"requests still unfinished after {max_steps} steps"
    return reqs


def tiny_llama(tokenizer, max_positions: int):
    """A random tiny Llama (hidden 64, 2 layers, grouped-query heads, tied embeddings) over
    ``tokenizer``'s vocabulary, drawn from seed 0."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_positions, tie_word_embeddings=True,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg).eval()
