"""Tiny local models and tokenizers for the evaluation tests (nothing is downloaded).

* ``word_tokenizer``: WordLevel over a fixed vocabulary, whitespace split, BOS added by default.
* ``bpe_tokenizer``: byte-level BPE trained here on a few sentences, no BOS by default.
* ``tiny_llama``: a randomly initialised 2-layer Llama.
* ``SuccessorLM``: predicts token ``id + 1`` with logit ``BIG`` (others 0), so log-probabilities
  are known in closed form; ``UniformLM``: all-zero logits.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Which gas do plants absorb from the air?",
    "Answer: carbon dioxide is absorbed by the leaves of green plants.",
    "She poured milk in the bowl and lost her appetite.",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
    "In my palm is a clear stone, and inside it is a small ivory statuette.",
    "The man turned on the faucet, therefore water flowed from the spout.",
] * 3

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(28)]


def make_word_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def make_bpe_tokenizer(add_bos: bool = False, with_bos_token: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    kwargs = {"bos_token": "<s>"} if with_bos_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", **kwargs)


def make_tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, max_position_embeddings=max_positions,
        initializer_range=0.2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


class SuccessorLM(torch.nn.Module):
    """Logit BIG for token ``id + 1`` (mod V), 0 elsewhere: log p(next = id+1) = BIG - LSE."""

    BIG = 4.0

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    @classmethod
    def logp(cls, vocab_size: int, hit: bool) -> float:
        lse = math.log(math.exp(cls.BIG) + vocab_size - 1)
        return (cls.BIG if hit else 0.0) - lse

    def forward(self, input_ids, attention_mask=None, **kwargs):
        nxt = (input_ids + 1) % self.vocab_size
        logits = torch.nn.functional.one_hot(nxt, self.vocab_size).float() * self.BIG
        return SimpleNamespace(logits=logits + 0 * self.dummy)


class UniformLM(torch.nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer(add_bos=True)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return make_bpe_tokenizer(add_bos=False)


@pytest.fixture(scope="session")
def tiny_llama(bpe_tokenizer):
    return make_tiny_llama(len(bpe_tokenizer))


def manual_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1 from a single unpadded forward: ``[len(ids) - 1]``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and far faster than with many on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
