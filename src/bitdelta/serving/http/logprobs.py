"""Log-probabilities in OpenAI's two shapes: the completions one and the chat one.

The engine reports each token's log-probability under the model (log-softmax of the raw logits,
before penalties and temperature) with the ``k`` most likely tokens. Completions list them as
parallel arrays, ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, where a token's
``top_logprobs`` maps text to log-probability for the top ``k`` plus the token itself (so up to
``k + 1`` entries, as OpenAI says) and an echoed prompt's first token has ``null`` for both. Chat
lists ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`` with exactly the top ``k``.

    entries = [Scored(token=17, logprob=lp, offset=0), ...]
    completion_logprobs(text, entries)   # {"tokens": [...], ...}
    chat_logprobs(text, entries)         # {"content": [...], "refusal": None}
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling import TokenLogprob
from ..text import TenantText


@dataclass
class Scored:
    """One token of an answer: its id, its log-probabilities (None: an echoed prompt's first token)
    and where its text starts in the choice's text."""

    token: int
    logprob: TokenLogprob | None
    offset: int


def completion_logprobs(text: TenantText, entries: list[Scored]) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(text.token_text(e.token))
        offsets.append(e.offset)
        if e.logprob is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(e.logprob.logprob)
        top = {text.token_text(t): v for t, v in e.logprob.top}
        top.setdefault(text.token_text(e.token), e.logprob.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _chat_token(text: TenantText, token: int, logprob: float) -> dict:
    return {"token": text.token_text(token), "logprob": logprob, "bytes": list(text.token_bytes(token))}


def chat_logprobs(text: TenantText, entries: list[Scored]) -> dict:
    content = []
    for e in entries:
        if e.logprob is None:
            continue
        item = _chat_token(text, e.token, e.logprob.logprob)
        item["top_logprobs"] = [_chat_token(text, t, v) for t, v in e.logprob.top]
        content.append(item)
    return {"content": content, "refusal": None}
