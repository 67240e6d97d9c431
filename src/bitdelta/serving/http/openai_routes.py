"""The OpenAI endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

``model`` names a registered delta or the base itself. Each generation request is checked here
(key scope, model, sampling settings, prompt length) before it reaches the engine, so a bad
request costs no engine time; :mod:`.streaming` then runs it. Sampling: ``temperature`` 0..2, where
anything below 1e-5 (0 included) means greedy decoding; ``top_p`` in (0, 1]; ``top_k`` -1/0 (off)
or any positive count; ``seed`` a 64-bit integer (-2**63 .. 2**64 - 1); ``max_tokens`` at most the
model's context length (what does not fit after the prompt is cut, finish "length"); ``n`` 1..16
choices (``best_of`` only equal to ``n``); ``presence_penalty`` and ``frequency_penalty`` -2..2,
``repetition_penalty`` 0.01..100; log-probabilities (completions ``logprobs`` 0..20, chat
``logprobs: true`` with ``top_logprobs`` 0..20); ``echo`` (completions); ``stop`` strings and
``stop_token_ids``; ``stream_options.include_usage`` (streams only). docs/serving.md has the table.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..metrics import UNKNOWN_MODEL
from ..sampling import MAX_LOGPROBS, InvalidRequest, SamplingParams, check_params
from .auth import check_access
from .errors import ApiError, quoted_name
from .schemas import ChatBody, CompletionBody, GenerationBody
from .state import Config, Runtime
from .streaming import Answer, generate

# A token covers far fewer characters than this with any real tokenizer: a longer prompt cannot fit
# the context, and is refused before spending seconds tokenizing it.
MAX_CHARS_PER_TOKEN = 1024
# Longer texts are tokenized in a worker thread, so other requests' streams keep flowing meanwhile.
THREAD_ENCODE_CHARS = 16384
MAX_STOP_SEQUENCES = 16
MAX_STOP_TOKEN_IDS = 256
# Choices per request: each is a sequence of its own in the batch (and a place in the queue).
N_MAX = 16

router = APIRouter()


def model_card(rt, name: str, started: float) -> dict:
    """OpenAI's model object for ``name`` (the base, or a registered delta of it)."""
    e = rt.slots.get(name)
    return {"id": name, "object": "model", "created": int(started), "owned_by": "bitdelta",
            "parent": None if e is None else rt.base_name,
            "root": rt.base_path if e is None else e.info.get("finetuned_model_name_or_path", name)}


def visible_models(rt, scope: set[str] | None) -> list[str]:
    names = rt.models()
    return names if scope is None else [n for n in names if n in scope]


@router.get("/v1/models")
async def list_models(request: Request, rt: Runtime, config: Config):
    scope = check_access(config, request.headers.get("authorization"), None)
    return {"object": "list", "data": [model_card(rt, n, request.app.state.started) for n in visible_models(rt, scope)]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request, rt: Runtime, config: Config):
    scope = check_access(config, request.headers.get("authorization"), None)
    if not rt.has(name) or name not in visible_models(rt, scope):
        raise ApiError(404, f"the model {quoted_name(name)} does not exist", "model_not_found", "model")
    return model_card(rt, name, request.app.state.started)


# ---------------------------------------------------------------------------------- request checks


def resolve(rt, config, request: Request, body: GenerationBody) -> str:
    """The tenant a generation request asks for, once its key may use it and its settings are supported."""
    check_access(config, request.headers.get("authorization"), body.model)
    if not rt.has(body.model):
        rt.metrics.rejected(UNKNOWN_MODEL, 404)  # client-chosen names never become metric labels
        raise ApiError(404, f"the model {quoted_name(body.model)} does not exist; GET /v1/models lists them",
                       "model_not_found", "model")
    try:  # seed and penalties, with the engine's own rules
        check_params(SamplingParams(seed=body.seed, presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty,
                                    repetition_penalty=body.repetition_penalty))
    except InvalidRequest as e:
        raise ApiError(400, str(e), "invalid_value", e.param) from None
    if body.n > N_MAX:
        raise ApiError(400, f"n must be from 1 to {N_MAX} (got {str(body.n)[:40]})", "invalid_value", "n")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "invalid_value", "stream_options")
    if body.stop_token_ids is not None and len(body.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ApiError(400, f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids", "invalid_value", "stop_token_ids")
    return body.model


def _logprobs_range(value: int, param: str) -> int:
    if not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"{param} must be an integer from 0 to {MAX_LOGPROBS} (got {str(value)[:40]})",
                       "invalid_value", param)
    return value


def completion_logprobs_count(body: CompletionBody) -> int | None:
    """How many alternatives per token a completion request wants (None: no log-probabilities)."""
    if body.logprobs is None or body.logprobs is False:
        return None
    if body.logprobs is True:
        raise ApiError(400, f"logprobs of a completion is an integer from 0 to {MAX_LOGPROBS} (how many "
                            "alternatives to list per token)", "invalid_value", "logprobs")
    return _logprobs_range(body.logprobs, "logprobs")


def chat_logprobs_count(body: ChatBody) -> int | None:
    """How many alternatives per token a chat request wants (None: no log-probabilities)."""
    if body.logprobs is not None and not isinstance(body.logprobs, bool):
        raise ApiError(400, f"logprobs of a chat completion is true or false; top_logprobs (0 to {MAX_LOGPROBS}) "
                            "says how many alternatives to list per token", "invalid_value", "logprobs")
    top = body.top_logprobs
    if top is not None:
        _logprobs_range(top, "top_logprobs")
        if top and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
    return (top or 0) if body.logprobs else None


def check_best_of(body: CompletionBody) -> None:
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, f"best_of must equal n ({body.n}): choosing the best of more sequences than are returned "
                            "is not supported", "unsupported_parameter", "best_of")


def stop_strings(body: GenerationBody) -> list[str]:
    s = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(s) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", "invalid_value", "stop")
    return s


def sampling_params(rt, body: GenerationBody, name: str, prompt: list[int], max_tokens: int | None,
                    max_tokens_param: str = "max_tokens", chat: bool = False, logprobs: int | None = None,
                    echo: bool = False) -> SamplingParams:
    """The engine's settings for this request; chat requests also end at the template's end-of-turn token."""
    if max_tokens is not None and max_tokens > rt.engine.max_len:
        raise ApiError(400, f"{max_tokens_param} is {str(max_tokens)[:40]}; this model's context length is "
                            f"{rt.engine.max_len} tokens (prompt included)", "invalid_value", max_tokens_param)
    room = rt.engine.max_len - len(prompt)
    text = rt.text(name)
    return SamplingParams(max_tokens=min(max_tokens or room, room), temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos,
                          eos_token_ids=tuple(text.eos_ids) + (tuple(text.chat_end_ids) if chat else ()),
                          stop_token_ids=tuple(sorted(set(body.stop_token_ids or ()))),
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          repetition_penalty=body.repetition_penalty, logprobs=logprobs,
                          prompt_logprobs=logprobs if echo else None)


def refuse_too_long_text(rt, name: str, chars: int, param: str) -> None:
    """Refuses text that cannot fit the context whatever the tokenizer, before tokenizing it."""
    if chars > MAX_CHARS_PER_TOKEN * rt.engine.max_len:
        rt.metrics.rejected(name, 400)
        raise ApiError(400, f"the {param} has {chars} characters, more than this model's context of "
                            f"{rt.engine.max_len} tokens can hold", "context_length_exceeded", param)


async def encode(fn, arg, chars: int):
    return await run_in_threadpool(fn, arg) if chars > THREAD_ENCODE_CHARS else fn(arg)


def check_prompt(rt, name: str, prompt: list[int]) -> None:
    if not prompt:
        raise ApiError(400, "the prompt is empty", "invalid_value", "prompt")
    if len(prompt) >= rt.engine.max_len:
        rt.metrics.rejected(name, 400)
        raise ApiError(400, f"this model's maximum context length is {rt.engine.max_len} tokens; the prompt has "
                            f"{len(prompt)} tokens (at least one must be left to generate)",
                       "context_length_exceeded", "prompt")
    vocab = rt.model.vocab_size + rt.slots.max_extra
    if any(t < 0 or t >= vocab for t in prompt):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "invalid_value", "prompt")


def _include_usage(body: GenerationBody) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


# ---------------------------------------------------------------------------------- generation


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request, rt: Runtime, config: Config):
    name = resolve(rt, config, request, body)
    check_best_of(body)
    logprobs = completion_logprobs_count(body)
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], str):
        if len(p) != 1:
            raise ApiError(400, "send one prompt per request (batched prompts are not supported)", "invalid_value",
                           "prompt")
        p = p[0]
    if isinstance(p, str):
        refuse_too_long_text(rt, name, len(p), "prompt")
        prompt = await encode(rt.text(name).encode_prompt, p, len(p))
    else:
        prompt = list(p)
    check_prompt(rt, name, prompt)
    sp = sampling_params(rt, body, name, prompt, body.max_tokens or 16, logprobs=logprobs, echo=body.echo)
    echo = None
    if body.echo:  # the prompt as sent; token ids as their text
        echo = p if isinstance(p, str) else rt.text(name).decode(prompt)
    answer = Answer(chat=False, stream=body.stream, include_usage=_include_usage(body), stop=stop_strings(body),
                    echo=echo, logprobs=logprobs is not None)
    return await generate(request, rt, name, prompt, sp, body.n, answer)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request, rt: Runtime, config: Config):
    name = resolve(rt, config, request, body)
    logprobs = chat_logprobs_count(body)
    if not body.messages:
        raise ApiError(400, "messages must not be empty", "invalid_value", "messages")
    msgs = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            texts = [part.get("text") for part in content if part.get("type") == "text"]
            if not all(isinstance(t, str) for t in texts):
                raise ApiError(400, "a text content part needs a string 'text'", "invalid_value", "messages")
            content = "".join(texts)
        msgs.append({"role": m.role, "content": content or ""})
    chars = sum(len(m["content"]) for m in msgs)
    refuse_too_long_text(rt, name, chars, "messages")
    try:
        prompt = await encode(rt.text(name).encode_chat, msgs, chars)
    except Exception as e:  # template errors (e.g. role order a template rejects)
        raise ApiError(400, f"the chat template of {name!r} rejected these messages: {e}", "invalid_value",
                       "messages") from None
    check_prompt(rt, name, prompt)
    sp = sampling_params(rt, body, name, prompt, body.max_completion_tokens or body.max_tokens,
                         "max_completion_tokens" if body.max_completion_tokens else "max_tokens", chat=True,
                         logprobs=logprobs)
    answer = Answer(chat=True, stream=body.stream, include_usage=_include_usage(body), stop=stop_strings(body),
                    logprobs=logprobs is not None)
    return await generate(request, rt, name, prompt, sp, body.n, answer)
