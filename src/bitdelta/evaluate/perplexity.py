"""Perplexity of a causal LM: sliding window over one long text, or one score per document.

``perplexity`` follows the Hugging Face perplexity guide: the text is tokenized once, windows of
``window`` tokens start every ``stride`` tokens, and each window scores only the tokens the previous
window did not, so every token after the first is scored exactly once, with up to
``window - stride`` tokens of left context. ``perplexity_of_documents`` scores each document on its
own (truncated to ``max_length`` tokens); padding is never counted.

    r = perplexity(model, tok, open("wikitext2_test.txt").read(), window=2048, stride=512)
    print(r.ppl, r.n_tokens, r.window, r.stride)
    r = perplexity_of_documents(model, tok, ["doc one ...", "doc two ..."], max_length=512)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ._common import encode, forward_logits, model_device, model_max_length, pad_right, resolve_add_bos


@dataclass
class PerplexityResult:
    """Sum of token negative log-likelihoods (nats), tokens scored, and ``exp(nll_sum / n_tokens)``.

    ``window``/``stride``/``n_windows`` are set by ``perplexity``; ``n_docs``/``max_length`` by
    ``perplexity_of_documents``.
    """

    ppl: float
    nll_sum: float
    n_tokens: int
    mean_nll: float
    window: int | None = None
    stride: int | None = None
    n_windows: int | None = None
    n_docs: int | None = None
    max_length: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _make_result(nll_sum: float, n_tokens: int, **extra) -> PerplexityResult:
    if n_tokens == 0:
        raise ValueError("no token could be scored: the text needs at least 2 tokens (or 1 with BOS)")
    mean = nll_sum / n_tokens
    return PerplexityResult(ppl=math.exp(mean), nll_sum=nll_sum, n_tokens=n_tokens, mean_nll=mean, **extra)


def score_spans(
    model: torch.nn.Module,
    seqs: list[list[int]],  # token ids, one list per row
    starts: list[int],  # row i scores tokens seqs[i][starts[i]:], starts[i] >= 1
) -> list[tuple[float, int]]:
    """Run one padded forward and return ``(nll_sum, n_scored)`` per row.

    Token ``j`` of a row is scored by the logits at position ``j - 1``; padding is never scored.
    """
    ids, mask = pad_right(seqs, model_device(model))
    logits = forward_logits(model, ids, mask)
    out = []
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        n = len(seq)
        if start >= n:
            out.append((0.0, 0))
            continue
        assert start >= 1, "the first token of a sequence has no context and cannot be scored"
        logp = torch.log_softmax(logits[i, start - 1 : n - 1].float(), dim=-1)
        target = ids[i, start:n].to(logp.device)
        nll = -logp.gather(-1, target[:, None]).sum().item()
        out.append((nll, n - start))
    return out


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    add_bos: bool | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Sliding-window perplexity of one long text (the HF perplexity guide's method).

    Args:
        model: a causal LM; ``model(input_ids, attention_mask).logits`` is ``[B, L, V]``.
        tokenizer: its Hugging Face tokenizer.
        text: the whole text (e.g. WikiText-2 test joined), tokenized once.
        window: tokens per forward; default the model's maximum length.
        stride: tokens between window starts (each window scores ``stride`` new tokens with
            ``window - stride`` tokens of context); default ``window // 2``. ``stride == window``
            gives disjoint chunks.
        batch_size: windows per forward.
        add_bos: prepend BOS to the text; default what the tokenizer does.
        progress: show a tqdm bar.

    Returns:
        ``PerplexityResult`` with ``window``, ``stride`` and ``n_windows`` set.
    """
    window = int(window or model_max_length(model, tokenizer))
    stride = int(stride or max(1, window // 2))
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (got {window})")
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in [1, window={window}] (got {stride})")
    ids = encode(tokenizer, text, resolve_add_bos(tokenizer, add_bos))
    seq_len = len(ids)

    # (begin, end, first scored token) per window, exactly as in the HF guide's loop.
    windows = []
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == seq_len:
            break

    was_training = model.training
    model.eval()
    nll_sum, n_tokens = 0.0, 0
    try:
        with torch.no_grad():
            batches = range(0, len(windows), batch_size)
            for b in tqdm(batches, desc="perplexity", disable=not progress):
                chunk = windows[b : b + batch_size]
                seqs = [ids[begin:end] for begin, end, _ in chunk]
                starts = [first - begin for begin, _, first in chunk]
                for nll, n in score_spans(model, seqs, starts):
                    nll_sum += nll
                    n_tokens += n
    finally:
        model.train(was_training)
    return _make_result(nll_sum, n_tokens, window=window, stride=stride, n_windows=len(windows))


def perplexity_of_documents(
    model: torch.nn.Module,
    tokenizer,
    docs: list[str],
    max_length: int | None = None,
    batch_size: int = 8,
    add_bos: bool | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity over documents scored separately (each truncated to its first ``max_length``
    tokens, BOS included), batched with right padding that is never counted.

    Every token after a document's first is scored (with BOS, every text token). Documents too
    short to score anything contribute nothing; ``n_docs`` counts all documents given.
    """
    max_length = int(max_length or model_max_length(model, tokenizer))
    bos = resolve_add_bos(tokenizer, add_bos)
    seqs = [encode(tokenizer, d, bos)[:max_length] for d in docs]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # less padding per batch
    order = [i for i in order if len(seqs[i]) >= 2]

    was_training = model.training
    model.eval()
    nll_sum, n_tokens = 0.0, 0
    try:
        with torch.no_grad():
            batches = range(0, len(order), batch_size)
            for b in tqdm(batches, desc="perplexity", disable=not progress):
                chunk = [seqs[i] for i in order[b : b + batch_size]]
                for nll, n in score_spans(model, chunk, [1] * len(chunk)):
                    nll_sum += nll
                    n_tokens += n
    finally:
        model.train(was_training)
    return _make_result(nll_sum, n_tokens, n_docs=len(docs), max_length=max_length)
