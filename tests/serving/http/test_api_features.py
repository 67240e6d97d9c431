"""The OpenAI parameters as clients use them, through the official ``openai`` client on a live server.

``n`` choices, log-probabilities (completions and chat, streamed and not), presence, frequency and
repetition penalties, ``echo``, stop token ids and the tokenizer's end tokens, seeds, usage in
streams, and the validation of each. Expected values come from the models themselves: the tiny
base (served with no delta) and a delta merged into the base (what the server computes for that
tenant), run with plain Hugging Face forwards.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import bitdelta
from bitdelta.serving.text import TenantText, chat_end_ids
from serving.engine_checks import load_hf

PROMPT = "To be, or not to be"
TOL = 2e-4  # float32 logits of the engine's forward against Hugging Face's, as log-probabilities


@pytest.fixture(scope="module")
def text(tiny_models) -> TenantText:
    """The tiny models' tokenizer, as the server holds it (every tenant shares it)."""
    return TenantText.load(tiny_models["base"])


@pytest.fixture(scope="module")
def ids_of(text):
    """Token text (as log-probabilities name tokens) -> token id."""
    table = {}
    for i in range(len(text.tokenizer)):
        table.setdefault(text.token_text(i), i)
    return lambda tokens: [table[t] for t in tokens]


@pytest.fixture(scope="module")
def models(tiny_models, delta_dir):
    """Reference models by tenant: the base, and the base with the shakespeare delta merged in."""
    base = load_hf(tiny_models["base"])
    merged = bitdelta.merge(copy.deepcopy(base), bitdelta.Delta.from_pretrained(delta_dir / "shakespeare"))
    return {"base": base, "shakespeare": merged}


@torch.no_grad()
def _log_softmax(model, ids: list[int]) -> torch.Tensor:
    """Log-probabilities of the next token after each prefix of ``ids``: ``[len(ids), vocab]``."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@torch.no_grad()
def _penalised_greedy(model, prompt: list[int], n: int, rep=1.0, freq=0.0, pres=0.0) -> list[int]:
    """Greedy decoding with vLLM's repetition penalty and OpenAI's frequency/presence penalties."""
    out: list[int] = []
    for _ in range(n):
        x = model(torch.tensor([prompt + out])).logits[0, -1].float()
        for t in set(prompt) | set(out):
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        for t in set(out):
            x[t] -= freq * out.count(t) + pres
        out.append(int(x.argmax()))
    return out


def _prompt_ids(text, prompt=PROMPT) -> list[int]:
    return text.encode_prompt(prompt)


def _repeats(tokens) -> int:
    return len(tokens) - len(set(tokens))


# ---------------------------------------------------------------------------------- n and seed


def test_n_choices_differ_and_repeat_with_a_seed(client):
    kw = dict(model="gsm8k", prompt="Once upon", max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})
    first = client.completions.create(n=4, seed=11, **kw)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) >= 3  # independent samples, not one sample four times
    assert first.usage.completion_tokens == 4 * 12
    again = client.completions.create(n=4, seed=11, **kw)
    assert [c.text for c in again.choices] == texts  # same seed, same choices
    single = client.completions.create(n=1, seed=11, **kw)
    assert single.choices[0].text == texts[0]  # choice 0 uses the seed itself
    other = client.completions.create(n=4, seed=12, **kw)
    assert not set(c.text for c in other.choices) & set(texts)  # seeds 11 and 12 share no choice
    chat = dict(model="shakespeare", messages=[{"role": "user", "content": "Speak"}], max_tokens=10, temperature=1.0,
                seed=5, n=3, extra_body={"ignore_eos": True})
    a, b = client.chat.completions.create(**chat), client.chat.completions.create(**chat)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) >= 2 and [c.index for c in a.choices] == [0, 1, 2]


def test_n_usage_counts_every_choice_once_and_the_prompt_once(client, text):
    r = client.completions.create(model="base", prompt=PROMPT, n=3, max_tokens=5, temperature=1.0, seed=1,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(_prompt_ids(text))
    assert r.usage.completion_tokens == 15 and r.usage.total_tokens == r.usage.prompt_tokens + 15


def test_greedy_choices_are_identical(client):
    r = client.completions.create(model="shakespeare", prompt=PROMPT, n=3, max_tokens=8, temperature=0)
    assert len({c.text for c in r.choices}) == 1


def test_each_choice_finishes_on_its_own(client):
    kw = dict(model="gsm8k", prompt="The", max_tokens=16, temperature=1.0, seed=3, n=4,
              extra_body={"ignore_eos": True})
    texts = [c.text for c in client.completions.create(**kw).choices]
    # a character choice 0 produces after its first few and another choice never produces
    other = next(j for j in range(1, 4) if any(ch not in texts[j] for ch in texts[0][2:]))
    stop = next(ch for ch in texts[0][2:] if ch not in texts[other])
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == texts[0][:texts[0].index(stop)]
    assert r.choices[other].finish_reason == "length" and r.choices[other].text == texts[other]


def test_n_streams_interleave_choices_by_index(client):
    kw = dict(model="base", prompt="Once upon", max_tokens=12, temperature=1.0, seed=21, n=3,
              extra_body={"ignore_eos": True})
    want = [c.text for c in client.completions.create(**kw).choices]
    order, parts, finishes = [], {0: [], 1: [], 2: []}, {}
    for chunk in client.completions.create(stream=True, **kw):
        c = chunk.choices[0]
        order.append(c.index)
        parts[c.index].append(c.text)
        if c.finish_reason:
            assert c.index not in finishes
            finishes[c.index] = c.finish_reason
    assert ["".join(parts[i]) for i in range(3)] == want
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert order != sorted(order)  # the choices' chunks come as they are made, not one choice after another
    chat = list(client.chat.completions.create(model="gsm8k", messages=[{"role": "user", "content": "hi"}], n=2,
                                               max_tokens=6, temperature=1.0, seed=2, stream=True))
    assert {c.choices[0].index for c in chat if c.choices[0].delta.role == "assistant"} == {0, 1}


def test_best_of_equal_to_n_is_served(client):
    r = client.completions.create(model="base", prompt="Hi", n=2, best_of=2, max_tokens=3, temperature=0)
    assert len(r.choices) == 2


# ---------------------------------------------------------------------------------- log-probabilities


@pytest.mark.parametrize("tenant", ["base", "shakespeare"])
def test_completion_logprobs_equal_the_model(client, models, text, ids_of, tenant):
    prompt = _prompt_ids(text)
    r = client.completions.create(model=tenant, prompt=prompt, max_tokens=10, temperature=0, logprobs=5,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    out = ids_of(lp.tokens)
    assert len(out) == 10 and "".join(lp.tokens) == r.choices[0].text
    want = _log_softmax(models[tenant], prompt + out)[len(prompt) - 1:-1]
    for i, t in enumerate(out):
        assert lp.token_logprobs[i] == pytest.approx(float(want[i, t]), abs=TOL)
        top = lp.top_logprobs[i]
        values = list(top.values())
        assert len(top) == 5 and values == sorted(values, reverse=True)
        assert list(top)[0] == lp.tokens[i]  # greedy: the token is the most likely one
        best = want[i].topk(5)
        assert ids_of(list(top)) == best.indices.tolist()
        assert values == pytest.approx(best.values.tolist(), abs=TOL)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(10)]


def test_logprobs_are_the_models_before_temperature_and_penalties(client, models, text, ids_of):
    prompt = _prompt_ids(text, "Once upon a time")
    r = client.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=1.7, seed=4, logprobs=0,
                                  frequency_penalty=1.5, extra_body={"ignore_eos": True, "repetition_penalty": 1.4})
    lp = r.choices[0].logprobs
    out = ids_of(lp.tokens)
    want = _log_softmax(models["base"], prompt + out)[len(prompt) - 1:-1]
    assert lp.token_logprobs == pytest.approx([float(want[i, t]) for i, t in enumerate(out)], abs=TOL)
    assert all(list(top) == [tok] for top, tok in zip(lp.top_logprobs, lp.tokens))  # logprobs=0: the token only


def test_chat_logprobs_equal_the_model(client, models, text):
    msgs = [{"role": "user", "content": "What is love?"}]
    prompt = text.encode_chat(msgs)  # the base's template (the shakespeare artifact carries the same files)
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    assert bytes(b for c in content for b in c.bytes).decode() == r.choices[0].message.content
    by_bytes = {}
    for i in range(len(text.tokenizer)):
        by_bytes.setdefault(text.token_bytes(i), i)
    out = [by_bytes[bytes(c.bytes)] for c in content]
    want = _log_softmax(models["base"], prompt + out)[len(prompt) - 1:-1]
    for i, c in enumerate(content):
        assert c.logprob == pytest.approx(float(want[i, out[i]]), abs=TOL)
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)
        values = [t.logprob for t in c.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(want[i].topk(3).values.tolist(), abs=TOL)
    plain = client.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content


def test_streamed_logprobs_match_the_whole_answer(client):
    kw = dict(model="shakespeare", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    tokens, values, offsets, text = [], [], [], []
    for chunk in client.completions.create(stream=True, **kw):
        c = chunk.choices[0]
        text.append(c.text)
        if c.logprobs is not None:
            tokens += c.logprobs.tokens
            values += c.logprobs.token_logprobs
            offsets += c.logprobs.text_offset
    assert "".join(text) == whole.text and tokens == whole.logprobs.tokens
    assert offsets == whole.logprobs.text_offset
    assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    msgs = [{"role": "user", "content": "hi"}]
    chat = dict(model="gsm8k", messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [t for ch in client.chat.completions.create(stream=True, **chat) if ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in full]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in full], abs=1e-5)


# ---------------------------------------------------------------------------------- penalties


def test_penalties_match_their_definitions(client, models, text, ids_of):
    prompt = _prompt_ids(text)
    for rep, freq, pres in ((1.3, 0.0, 0.0), (1.0, 1.2, 0.0), (1.0, 0.0, 1.5), (1.2, 0.7, 0.4)):
        r = client.completions.create(model="base", prompt=prompt, max_tokens=16, temperature=0, logprobs=0,
                                      frequency_penalty=freq, presence_penalty=pres,
                                      extra_body={"ignore_eos": True, "repetition_penalty": rep})
        got = ids_of(r.choices[0].logprobs.tokens)
        assert got == _penalised_greedy(models["base"], prompt, 16, rep, freq, pres), (rep, freq, pres)


def test_penalties_change_greedy_output_in_their_direction(client, text, ids_of):
    kw = dict(model="base", prompt=PROMPT, max_tokens=32, temperature=0, logprobs=0)
    prompt = set(_prompt_ids(text))

    def tokens(**extra):
        body = {"ignore_eos": True, **extra.pop("extra_body", {})}
        return ids_of(client.completions.create(**kw, **extra, extra_body=body).choices[0].logprobs.tokens)

    plain = tokens()
    assert _repeats(plain) >= 3  # the tiny model repeats itself when left alone
    assert tokens(extra_body={"repetition_penalty": 1.0}) == plain  # 1 = off
    assert tokens(frequency_penalty=0.0, presence_penalty=0.0) == plain
    assert _repeats(tokens(frequency_penalty=2.0)) < _repeats(plain)
    assert _repeats(tokens(presence_penalty=2.0)) < _repeats(plain)
    assert _repeats(tokens(presence_penalty=-2.0)) > _repeats(plain)  # a negative penalty rewards repeats
    # the largest repetition penalty rules out every token seen: no repeats, nothing from the prompt
    strict = tokens(extra_body={"repetition_penalty": 100.0})
    assert _repeats(strict) == 0 and not prompt & set(strict)


def test_penalised_choices_keep_their_own_counts(client):
    """Penalties count each choice's own tokens: n greedy choices under a penalty stay identical."""
    r = client.completions.create(model="gsm8k", prompt="The", n=3, max_tokens=16, temperature=0,
                                  frequency_penalty=1.0, extra_body={"ignore_eos": True})
    alone = client.completions.create(model="gsm8k", prompt="The", max_tokens=16, temperature=0,
                                      frequency_penalty=1.0, extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [alone.choices[0].text] * 3


# ---------------------------------------------------------------------------------- echo


def test_echo_returns_prompt_and_completion(client, text):
    kw = dict(model="shakespeare", max_tokens=6, temperature=0)
    plain = client.completions.create(prompt=PROMPT, **kw).choices[0].text
    assert client.completions.create(prompt=PROMPT, echo=True, **kw).choices[0].text == PROMPT + plain
    ids = _prompt_ids(text)
    assert client.completions.create(prompt=ids, echo=True, **kw).choices[0].text == text.decode(ids) + plain
    chunks = client.completions.create(prompt=PROMPT, echo=True, stream=True, **kw)
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == PROMPT + plain
    # echo is no chat parameter: ignored there
    msgs = [{"role": "user", "content": "Speak"}]
    chat = client.chat.completions.create(model="gsm8k", messages=msgs, max_tokens=6, temperature=0)
    echoed = client.chat.completions.create(model="gsm8k", messages=msgs, max_tokens=6, temperature=0,
                                            extra_body={"echo": True})
    assert echoed.choices[0].message.content == chat.choices[0].message.content


def test_echo_with_logprobs_scores_the_prompt(client, models, text, ids_of):
    prompt = _prompt_ids(text, "Once upon a time, there was")
    r = client.completions.create(model="shakespeare", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    n = len(prompt)
    assert ids_of(lp.tokens[:n]) == prompt and len(lp.tokens) == n + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    want = _log_softmax(models["shakespeare"], ids_of(lp.tokens))
    for i in range(1, n + 4):
        t = ids_of([lp.tokens[i]])[0]
        assert lp.token_logprobs[i] == pytest.approx(float(want[i - 1, t]), abs=TOL), i
        assert len(lp.top_logprobs[i]) in (2, 3)  # the top 2, plus the token itself when it is not among them
    assert lp.text_offset[n] == len(r.choices[0].text) - len("".join(lp.tokens[n:]))
    assert lp.text_offset == sorted(lp.text_offset)
    plain = client.completions.create(model="shakespeare", prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.choices[0].text == text.decode(prompt) + plain.choices[0].text
    # streamed: the prompt's chunk first, then the tokens, the same log-probabilities
    chunks = list(client.completions.create(model="shakespeare", prompt=prompt, max_tokens=4, temperature=0,
                                            echo=True, logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].logprobs.tokens == lp.tokens[:n]
    streamed = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)


def test_scored_prefill_of_a_long_prompt(client, models, server, text, ids_of):
    """A prompt longer than one scoring chunk is scored over several steps, still exactly."""
    from bitdelta.serving.engine import SCORED_PREFILL_CHUNK

    n = min(SCORED_PREFILL_CHUNK + 20, server.runtime.engine.max_len - 4)
    g = torch.Generator().manual_seed(0)
    prompt = [0] + torch.randint(3, len(text.tokenizer), (n - 1,), generator=g).tolist()
    r = client.completions.create(model="base", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1,
                                  extra_body={"ignore_eos": True})
    got = r.choices[0].logprobs.token_logprobs
    want = _log_softmax(models["base"], prompt + ids_of(r.choices[0].logprobs.tokens[n:]))
    assert got[0] is None and len(got) == n + 2
    full = prompt + ids_of(r.choices[0].logprobs.tokens[n:])
    assert got[1:] == pytest.approx([float(want[i - 1, full[i]]) for i in range(1, n + 2)], abs=TOL)


# ---------------------------------------------------------------------------------- stops


def test_stop_token_ids_stop_at_that_token(client, text, ids_of):
    kw = dict(model="base", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0]
    out = ids_of(full.logprobs.tokens)
    k = next(i for i in range(2, len(out)) if out[i] not in out[:i])  # a token's first appearance
    stop = dict(kw, extra_body={"ignore_eos": True, "stop_token_ids": [out[k]]})
    r = client.completions.create(**stop).choices[0]
    assert r.finish_reason == "stop" and r.text == "".join(full.logprobs.tokens[:k])
    assert ids_of(r.logprobs.tokens) == out[:k]  # the stop token is not part of the answer
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                          temperature=0, extra_body={"stop_token_ids": [out[k]], "ignore_eos": True})
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_end_tokens_stop_unless_ignored(client, server, ids_of):
    """The tokenizer's end tokens end generation (finish "stop", not in the text) unless ignore_eos;
    the chat template's end-of-turn token ends chat answers only."""
    kw = dict(model="base", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    full = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0]
    out = ids_of(full.logprobs.tokens)
    k = next(i for i in range(2, len(out)) if out[i] not in out[:i])
    msgs = [{"role": "user", "content": "x"}]
    chat_kw = dict(model="base", messages=msgs, max_tokens=12, temperature=0, logprobs=True)
    chat_full = client.chat.completions.create(**chat_kw, extra_body={"ignore_eos": True}).choices[0]
    chat_out = [t.token for t in chat_full.logprobs.content]
    j = next(i for i in range(1, len(chat_out)) if chat_out[i] not in chat_out[:i])
    tt = server.runtime.text("base")
    saved = tt.eos_ids, tt.chat_end_ids
    try:
        tt.eos_ids = (out[k],)
        r = client.completions.create(**kw).choices[0]
        assert r.finish_reason == "stop" and ids_of(r.logprobs.tokens) == out[:k]
        r = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0]
        assert r.finish_reason == "length" and ids_of(r.logprobs.tokens) == out
        tt.eos_ids, tt.chat_end_ids = saved[0], tuple(ids_of([chat_out[j]]))
        c = client.chat.completions.create(**chat_kw).choices[0]
        assert c.finish_reason == "stop" and [t.token for t in c.logprobs.content] == chat_out[:j]
        r = client.completions.create(**{**kw, "prompt": tt.encode_chat(msgs)}).choices[0]
        assert len(r.logprobs.tokens) == 12  # completions do not end at the template's end of turn
    finally:
        tt.eos_ids, tt.chat_end_ids = saved


def test_chat_template_end_token_is_an_end_token(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|pad|>\n{% endfor %}"
    assert chat_end_ids(tok) == (tok.pad_token_id,)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert chat_end_ids(tok) == ()


# ---------------------------------------------------------------------------------- usage in streams


@pytest.mark.parametrize("n", [1, 2])
def test_include_usage_adds_a_final_usage_chunk(client, n):
    kw = dict(model="gsm8k", prompt="Once", max_tokens=7, temperature=0, n=n)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(stream=True, **kw))
    assert all(c.usage is None and c.choices for c in plain)  # no usage chunk unless asked
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="gsm8k", messages=msgs, max_tokens=5, temperature=0, n=n)
    last = list(client.chat.completions.create(model="gsm8k", messages=msgs, max_tokens=5, temperature=0, n=n,
                                               stream=True, stream_options={"include_usage": True}))[-1]
    assert last.choices == [] and last.usage.completion_tokens == chat.usage.completion_tokens
    assert last.usage.prompt_tokens == chat.usage.prompt_tokens


# ---------------------------------------------------------------------------------- validation


OK = {"model": "shakespeare", "prompt": "hi", "max_tokens": 2}
CHAT = {"model": "gsm8k", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [  # (id, path, body, status, param)
    ("n-17", "/v1/completions", {**OK, "n": 17}, 400, "n"),
    ("n-huge", "/v1/chat/completions", {**CHAT, "n": 10**9}, 400, "n"),
    ("n-string", "/v1/completions", {**OK, "n": "two"}, 422, "n"),
    ("best_of-below-n", "/v1/completions", {**OK, "n": 3, "best_of": 2}, 400, "best_of"),
    ("logprobs-negative", "/v1/completions", {**OK, "logprobs": -1}, 400, "logprobs"),
    ("logprobs-huge", "/v1/completions", {**OK, "logprobs": 10**30}, 400, "logprobs"),
    ("top_logprobs-without-logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs-negative", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}, 400,
     "top_logprobs"),
    ("top_logprobs-string", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": "x"}, 422,
     "top_logprobs"),
    ("frequency_penalty-above", "/v1/completions", {**OK, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("frequency_penalty-huge", "/v1/chat/completions", {**CHAT, "frequency_penalty": -1e308}, 400,
     "frequency_penalty"),
    ("presence_penalty-below", "/v1/chat/completions", {**CHAT, "presence_penalty": -2.01}, 400, "presence_penalty"),
    ("presence_penalty-string", "/v1/completions", {**OK, "presence_penalty": "lots"}, 422, "presence_penalty"),
    ("repetition_penalty-negative", "/v1/completions", {**OK, "repetition_penalty": -1.0}, 400, "repetition_penalty"),
    ("repetition_penalty-tiny", "/v1/completions", {**OK, "repetition_penalty": 1e-30}, 400, "repetition_penalty"),
    ("repetition_penalty-huge", "/v1/completions", {**OK, "repetition_penalty": 1e6}, 400, "repetition_penalty"),
    ("stop_token_ids-strings", "/v1/completions", {**OK, "stop_token_ids": ["a"]}, 422, "stop_token_ids.0"),
    ("stop_token_ids-too-many", "/v1/completions", {**OK, "stop_token_ids": list(range(257))}, 400,
     "stop_token_ids"),
    ("stream_options-without-stream", "/v1/completions", {**OK, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("stream_options-not-object", "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": 5}, 422,
     "stream_options"),
    ("include_usage-object", "/v1/completions", {**OK, "stream": True, "stream_options": {"include_usage": {}}},
     422, "stream_options.include_usage"),
    ("echo-object", "/v1/completions", {**OK, "echo": {"a": 1}}, 422, "echo"),
]


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_parameters_get_4xx_naming_them(http, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_value" or (status == 400 and err["code"] == "unsupported_parameter")
    assert err["param"] == param and len(err["message"]) < 400


def test_nan_penalty_is_refused(http):
    raw = b'{"model": "shakespeare", "prompt": "hi", "max_tokens": 2, "frequency_penalty": NaN}'
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frequency_penalty"


def test_edge_values_are_served(client, http):
    r = client.completions.create(model="base", prompt="a", n=16, max_tokens=2, temperature=1.0, logprobs=20,
                                  presence_penalty=-2, frequency_penalty=2,
                                  extra_body={"repetition_penalty": 0.01})
    assert len(r.choices) == 16 and all(len(c.logprobs.top_logprobs[0]) >= 20 for c in r.choices)
    assert all(math.isfinite(v) for c in r.choices for v in c.logprobs.token_logprobs)
    c = client.chat.completions.create(model="gsm8k", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       logprobs=True, top_logprobs=0, extra_body={"repetition_penalty": 100})
    assert c.choices[0].logprobs.content and all(t.top_logprobs == [] for t in c.choices[0].logprobs.content)
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["restart_count"] == 0 and h["free_kv_slots"] == h["max_batch"]
