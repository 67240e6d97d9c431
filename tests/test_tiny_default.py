"""The embedded default models (models/tiny) load with plain transformers and are real fine-tunes.

Built by `recipes/tiny_default.py`; these checks guard the committed files:
same architecture, tied embeddings, every fine-tune weight differs from the base, and each fine-tune
is better than the base on its own held-out domain (and worse on the other one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny"
NAMES = ("base", "shakespeare", "gsm8k")
SEQ_LEN = 256
EVAL_CHARS = 20_000  # enough held-out text for a stable loss, small enough to stay fast

pytestmark = pytest.mark.skipif(not (TINY / "base" / "model.safetensors").exists(),
                                reason="models/tiny not built (run recipes/tiny_default.py)")


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(2)
    return {n: AutoModelForCausalLM.from_pretrained(TINY / n, dtype=torch.float32).eval() for n in NAMES}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY / "base")


@pytest.fixture(scope="module")
def heldout(tokenizer):
    """Held-out token streams per domain, laid out as in training: <bos> doc <eos> ..."""

    def stream(docs: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for enc in tokenizer(docs)["input_ids"]:
            ids += enc + [tokenizer.eos_token_id]
        return torch.tensor(ids)

    shk = (TINY / "heldout" / "shakespeare.txt").read_text(encoding="utf-8")[:EVAL_CHARS]
    gsm, size = [], 0
    for line in (TINY / "heldout" / "gsm8k.jsonl").read_text(encoding="utf-8").splitlines():
        gsm.append(json.loads(line)["text"])
        size += len(gsm[-1])
        if size >= EVAL_CHARS:
            break
    return {"shakespeare": stream([shk]), "gsm8k": stream(gsm)}


@torch.no_grad()
def nll(model, stream: torch.Tensor) -> float:
    n = len(stream) // SEQ_LEN
    x = stream[: n * SEQ_LEN].view(n, SEQ_LEN)
    return model(input_ids=x, labels=x).loss.item()


def test_configs_agree_and_embeddings_tied(models):
    cfgs = {n: AutoConfig.from_pretrained(TINY / n).to_dict() for n in NAMES}
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")
    for n in NAMES:
        assert {k: cfgs[n][k] for k in keys} == {k: cfgs["base"][k] for k in keys}, n
        assert cfgs[n]["tie_word_embeddings"] is True
        m = models[n]
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), n
        assert all(p.dtype == torch.float32 for p in m.parameters())
    shapes = {n: {k: tuple(v.shape) for k, v in models[n].state_dict().items()} for n in NAMES}
    assert shapes["shakespeare"] == shapes["base"] == shapes["gsm8k"]


def test_tokenizer_offline_and_special_tokens(tokenizer):
    ids = tokenizer("Question: 2 + 3?")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Question: 2 + 3?"
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert len(tokenizer) <= 2048 + 8
    for n in ("shakespeare", "gsm8k"):
        assert (TINY / n / "generation_config.json").exists()
        tok = AutoTokenizer.from_pretrained(TINY / n)
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        assert "Hi" in text


@pytest.mark.parametrize("name", ["shakespeare", "gsm8k"])
def test_every_finetune_tensor_differs_from_base(models, name):
    base, ft = models["base"].state_dict(), models[name].state_dict()
    assert base.keys() == ft.keys()
    for key in base:
        changed = (base[key] != ft[key]).float().mean().item()
        assert changed > 0.5, f"{name}: only {changed:.1%} of {key} differs from the base"
        rel = ((ft[key] - base[key]).norm() / base[key].norm()).item()
        assert 1e-4 < rel < 1.0, f"{name}: relative delta of {key} is {rel:.2e}"


@pytest.mark.slow  # perplexity of three models on three domains
def test_each_finetune_wins_on_its_own_domain(models, heldout):
    loss = {n: {d: nll(models[n], s) for d, s in heldout.items()} for n in NAMES}
    for dom in ("shakespeare", "gsm8k"):
        other = "gsm8k" if dom == "shakespeare" else "shakespeare"
        assert loss[dom][dom] < loss["base"][dom] - 0.05, loss
        assert loss[dom][dom] < loss[other][dom], loss
        assert math.isfinite(loss[dom][other])
