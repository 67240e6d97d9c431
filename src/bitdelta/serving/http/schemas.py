"""Request bodies of the OpenAI-compatible endpoints and the admin API (pydantic).

Unknown fields are accepted and ignored (``extra="allow"``), as OpenAI clients send many (``echo``
on a chat request is one of them). Ranges that pydantic can check (``temperature`` 0..2, ``top_p``
in (0, 1], ``max_tokens`` >= 1, ``n`` >= 1) answer 422, the rest is checked by the routes (400,
naming the field). ``repetition_penalty``, ``top_k``, ``stop_token_ids`` and ``ignore_eos`` are
vLLM's extra fields (the openai client sends them through ``extra_body``).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class GenerationBody(BaseModel):
    """What completions and chat completions share: the model and the sampling settings."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: Union[bool, int, None] = None


class CompletionBody(GenerationBody):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    best_of: Optional[int] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None


class ChatBody(GenerationBody):
    messages: list[Message]
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    top_logprobs: Optional[int] = None


class DeltaBody(BaseModel):
    name: str
    path: str
