"""Per-request sampling for the engine: settings, penalties, the sampler itself and log-probabilities.

One step's logits hold a row per sequence. For each request whose next token is due, the sampler
takes that row, applies the request's penalties on the device (:class:`PenaltyTable`), picks the
token (greedy below :data:`MIN_TEMPERATURE`, else temperature, top-k, top-p on the host with the
request's own generator) and, when asked, reports log-probabilities. A row that is not finite, or
whose sampling raises, fails its own request only (:class:`Outcome` with an error code).

Penalties follow OpenAI for ``presence_penalty`` and ``frequency_penalty`` (over the tokens generated
so far: ``logit -= frequency * count + presence * (count > 0)``) and vLLM for ``repetition_penalty``
(over the prompt's and the generated tokens: a positive logit is divided by it, a negative one
multiplied). Log-probabilities are those of the model itself: the log-softmax of its raw logits,
before penalties and temperature, whatever distribution the token was drawn from.

    params = SamplingParams(max_tokens=8, temperature=0.7, frequency_penalty=0.5, logprobs=3)
    check_params(params)                                    # InvalidRequest naming the field
    outcomes = sample_step(logits, rows, requests, penalties)
    scores = token_logprobs(logits, rows=[0, 1], targets=[17, 4], k=2)   # prompt scoring
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Below this, dividing logits by the temperature overflows float32 (1e-300 even rounds to 0): such a
# temperature means "pick the most likely token", which is what greedy decoding does exactly.
MIN_TEMPERATURE = 1e-5
# torch.Generator.manual_seed takes a signed or unsigned 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_LOGPROBS = 20  # top log-probabilities per token, as OpenAI allows for chat
PENALTY_MIN, PENALTY_MAX = -2.0, 2.0  # presence and frequency penalties (OpenAI's range)
# repetition_penalty scales logits by at most 100 either way: a finite model's logits stay finite.
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0
# JSON has no -inf: a token the model rules out entirely (an added token another tenant owns) gets
# this log-probability instead, as OpenAI-compatible servers report it.
LOGPROB_FLOOR = -9999.0


class InvalidRequest(ValueError):
    """A request the engine cannot run; ``param`` names the offending field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # below MIN_TEMPERATURE (0 included) = greedy (argmax, exact)
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # always stop (the token is not part of the output)
    ignore_eos: bool = False  # keep going past eos_token_ids (stop_token_ids still stop)
    eos_token_ids: tuple[int, ...] = ()  # the tokenizer's end tokens: stop unless ignore_eos
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # report each generated token's log-probability and this many top ones
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (all but the first)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_params(p: SamplingParams) -> None:
    """Raises :class:`InvalidRequest` naming the first field outside its range."""
    if p.seed is not None and (not isinstance(p.seed, int) or isinstance(p.seed, bool)
                               or not SEED_MIN <= p.seed <= SEED_MAX):
        raise InvalidRequest(f"seed must be an integer from -2**63 to 2**64 - 1 (got {str(p.seed)[:40]})", "seed")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if not _is_number(v) or not PENALTY_MIN <= v <= PENALTY_MAX:
            raise InvalidRequest(f"{name} must be a number from -2 to 2 (got {str(v)[:40]})", name)
    v = p.repetition_penalty
    if not _is_number(v) or not REPETITION_PENALTY_MIN <= v <= REPETITION_PENALTY_MAX:
        raise InvalidRequest(f"repetition_penalty must be a number from {REPETITION_PENALTY_MIN} to "
                             f"{REPETITION_PENALTY_MAX:g} (1 = off; got {str(v)[:40]})", "repetition_penalty")
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(p, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_LOGPROBS):
            raise InvalidRequest(f"{name} must be an integer from 0 to {MAX_LOGPROBS} (got {str(v)[:40]})", name)


def derive_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request seeded with ``seed``: the seed itself for the first,
    for the others a well-mixed function of both (so seeds 7 and 8 share no choice)."""
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) % 2**64  # splitmix64's finaliser
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def on_device(values, device, dtype=torch.long) -> torch.Tensor:
    """A small host list as a device tensor; on CUDA through pinned memory without waiting for the
    device, so building a step's indices does not stall the host behind the forward."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------------------------- log-probabilities


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, with the ``k`` most likely tokens (best first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def _json_safe(v: float) -> float:
    return max(v, LOGPROB_FLOOR)  # -inf included


def token_logprobs(logits: torch.Tensor, rows: list[int], targets: list[int], k: int) -> list[TokenLogprob | None]:
    """Log-softmax of ``logits[rows]`` read at ``targets``, plus the top ``k`` of each row, in one
    read-back. None for a row that is not finite (NaN anywhere, +inf, or everything -inf)."""
    if not rows:
        return []
    dev, width = logits.device, logits.shape[-1]
    x = logits.index_select(0, on_device(rows, dev)).float()
    ok = torch.isfinite(x.amax(dim=-1))  # amax carries NaN through
    lp = torch.log_softmax(x, dim=-1)
    tgt = on_device([t if 0 <= t < width else 0 for t in targets], dev)
    parts = [ok.double()[:, None], lp.gather(-1, tgt[:, None]).double()]
    k = min(k, width)
    if k:
        vals, ids = lp.topk(k, dim=-1)  # sorted, best first
        parts += [vals.double(), ids.double()]
    host = torch.cat(parts, dim=1).tolist()
    out = []
    for row, t in zip(host, targets):
        if not row[0] or not 0 <= t < width:
            out.append(None)
            continue
        top = [(int(i), _json_safe(v)) for v, i in zip(row[2:2 + k], row[2 + k:])]
        out.append(TokenLogprob(t, _json_safe(row[1]), top))
    return out


# ---------------------------------------------------------------------------------- penalties


class PenaltyTable:
    """Per-KV-slot token statistics for penalties, on the device: how often each token was generated,
    and which tokens were seen (prompt or output). Allocated on the first penalised request; updated
    with one scatter per step, so applying penalties needs no host read-back."""

    def __init__(self, num_slots: int, width: int, device):
        self.num_slots, self.width, self.device = num_slots, width, torch.device(device)
        self.counts: torch.Tensor | None = None  # [slots, width] float32
        self.seen: torch.Tensor | None = None  # [slots, width] bool

    def start(self, slot: int, prompt: list[int]) -> None:
        """A new sequence in ``slot``: no generated tokens yet, the prompt's tokens seen."""
        if self.counts is None:
            self.counts = torch.zeros(self.num_slots, self.width, device=self.device)
            self.seen = torch.zeros(self.num_slots, self.width, dtype=torch.bool, device=self.device)
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        ids = [t for t in prompt if 0 <= t < self.width]
        if ids:
            self.seen[slot, on_device(ids, self.device)] = True

    def record(self, slots: list[int], tokens: list[int]) -> None:
        """Each ``slots[i]`` generated ``tokens[i]`` this step."""
        if not slots or self.counts is None:
            return
        s, t = on_device(slots, self.device), on_device(tokens, self.device)
        self.counts.index_put_((s, t), torch.ones(len(slots), device=self.device), accumulate=True)
        self.seen[s, t] = True

    def apply(self, x: torch.Tensor, slots: list[int], params: list[SamplingParams]) -> torch.Tensor:
        """Rows ``x`` (one per entry of ``slots``) with their requests' penalties applied (a new tensor)."""
        w = min(self.width, x.shape[-1])
        dev = x.device
        s = on_device(slots, dev)
        knobs = on_device([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params], dev,
                          torch.float32)
        rep, freq, pres = knobs[:, 0:1], knobs[:, 1:2], knobs[:, 2:3]
        counts, seen = self.counts[s, :w], self.seen[s, :w]
        head = x[:, :w].float()
        head = torch.where(seen, torch.where(head > 0, head / rep, head * rep), head)
        head = head - freq * counts - pres * (counts > 0).float()
        return torch.cat([head, x[:, w:].float()], dim=1) if w < x.shape[-1] else head


# ---------------------------------------------------------------------------------- the sampler


@dataclass
class Outcome:
    """What sampling gave one request: a token (and its log-probabilities), or an error and its code."""

    token: int | None = None
    logprob: TokenLogprob | None = None
    error: str | None = None
    code: str | None = None


def non_finite_message(tenant: str | None) -> str:
    whose = "the base model's weights" if tenant is None else f"the delta of model {tenant!r}"
    return f"the model produced non-finite values (NaN or infinity) for this request; {whose} may hold corrupt values"


def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``logits`` ``[vocab]`` at temperature ``p.temperature`` with top-k and top-p."""
    x = logits.float().cpu()
    # Shift so the top logit is 0 before dividing: every value stays <= 0, so a small temperature
    # cannot overflow to +inf (which softmax turns into NaN); the distribution is unchanged.
    x = (x - x.max()) / p.temperature
    if p.top_k and p.top_k > 0:
        kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix with mass >= top_p
        x[order[drop]] = float("-inf")
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return logits if rows == list(range(logits.shape[0])) else logits.index_select(0, on_device(rows, logits.device))


def _greedy(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax on the device, -1 where the row is unusable: its top value is NaN (argmax
    lands on NaN), +inf, or -inf (all masked). One gather, read back with the argmax: no extra sync."""
    greedy = x.argmax(dim=-1)
    top = x.gather(-1, greedy[:, None])[:, 0]
    return torch.where(torch.isfinite(top), greedy, -1)


def device_greedy(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The greedy token of each row ``rows[i]`` of ``logits`` as a device tensor (-1: not finite),
    without waiting for the device: what a step launched ahead feeds back (``sample_step(greedy=)``
    then reads the same tensor)."""
    return _greedy(_rows(logits, rows))


def sample_step(logits: torch.Tensor, rows: list[int], reqs: list, penalties: PenaltyTable | None,
                greedy: torch.Tensor | None = None) -> list[Outcome]:
    """Samples each request of ``reqs`` from its row ``rows[i]`` of ``logits``.

    Requests carry ``params`` (:class:`SamplingParams`), ``generator``, ``kv_slot``, ``tenant`` and
    ``id``. Penalties apply on the device; the greedy choice and the finiteness check come back in
    one read; only rows that sample at a temperature go to the host one by one. ``greedy``: the
    rows' :func:`device_greedy`, already computed (on the device or copied to the host; only for
    requests without penalties)."""
    if not reqs:
        return []
    dev = logits.device
    x = _rows(logits, rows)
    pen = [i for i, r in enumerate(reqs) if r.params.penalized] if penalties is not None else []
    if pen:
        if greedy is not None:
            raise ValueError("sample_step: a greedy choice computed beforehand ignores penalties")
        idx = on_device(pen, dev)
        shaped = penalties.apply(x.index_select(0, idx), [reqs[i].kv_slot for i in pen], [reqs[i].params for i in pen])
        x = x.float().index_copy(0, idx, shaped)  # out of place: the raw logits stay for log-probabilities
    greedy = (_greedy(x) if greedy is None else greedy).tolist()
    out: list[Outcome] = []
    for i, r in enumerate(reqs):
        if greedy[i] < 0:
            out.append(Outcome(error=non_finite_message(r.tenant), code="invalid_output"))
            continue
        p = r.params
        if not p.temperature >= MIN_TEMPERATURE:  # also catches NaN
            out.append(Outcome(token=greedy[i]))
            continue
        try:
            out.append(Outcome(token=sample_row(x[i], p, r.generator)))
        except Exception as e:  # noqa: BLE001 (this request's sampling failed; the batch goes on)
            logger.warning("request %d: sampling failed", r.id, exc_info=True)
            out.append(Outcome(error=f"sampling failed: {type(e).__name__}: {e}", code="engine_error"))
    want = [i for i, o in enumerate(out) if o.token is not None and reqs[i].params.logprobs is not None]
    if want:
        k = max(reqs[i].params.logprobs for i in want)
        scored = token_logprobs(logits, [rows[i] for i in want], [out[i].token for i in want], k)
        for i, lp in zip(want, scored):
            if lp is None:  # the raw row is not finite although its penalised one was
                out[i] = Outcome(error=non_finite_message(reqs[i].tenant), code="invalid_output")
            else:
                lp.top = lp.top[:reqs[i].params.logprobs]
                out[i].logprob = lp
    if pen:
        done = [i for i in pen if out[i].token is not None]
        penalties.record([reqs[i].kv_slot for i in done], [out[i].token for i in done])
    return out
