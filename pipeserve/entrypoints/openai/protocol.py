"""The wire schema: OpenAI request and response bodies as pydantic models.

Requests are validated strictly (a string is not a number, 1.0 is not a token id, NaN is not a
temperature), so a wrong type is a 400 naming the field rather than a surprise later. Unknown fields
are kept and ignored (with a log line), as vLLM does, so clients that send extra OpenAI fields still work.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeserve.entrypoints.openai.chat_messages import ChatMessage
from pipeserve.entrypoints.openai.errors import APIError
from pipeserve.sampling_params import SamplingParams

_REQUEST_CONFIG = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
INT64 = dict(ge=-(2**63), lt=2**64)


class StreamOptions(BaseModel):
    """`stream_options`: `include_usage` adds a final chunk with the request's token counts."""

    model_config = _REQUEST_CONFIG
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, plus vLLM's extras)."""

    model_config = _REQUEST_CONFIG

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, **INT64)
    min_p: float | None = None
    seed: int | None = Field(None, **INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, **INT64)
    skip_special_tokens: bool = True
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM's extra
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's: logprob tokens spelled `token_id:N`
    cache_salt: str | None = None  # vLLM's: only requests with the same salt share cached prompt KV

    def check_supported(self) -> None:
        """Reject what this server cannot do, rather than silently doing something else."""
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed with stream=true", param="stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams; raises ValueError naming a field that is out of range."""
        top_k = self.top_k if self.top_k is not None else 0
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if top_k == -1 else top_k,  # vLLM spells "disabled" as -1
            min_p=self.min_p or 0.0, max_tokens=max_tokens, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens, n=self.n,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=self._logit_bias(),
        )

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI sends token ids as JSON object keys, hence strings."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.isdecimal():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            bias[int(key)] = value
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Any
    max_tokens: int | None = Field(16, **INT64)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v: Any) -> PromptInput:
        return normalize_prompt(v)

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:  # vLLM's current engine dropped best_of too
            raise APIError(f"best_of must equal n ({self.n}): choosing the best of more samples is not supported",
                           param="best_of")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        params = super().sampling_params(max_tokens, logprobs)
        if self.echo and logprobs is not None:  # echoed prompt tokens come with their logprobs too
            params.prompt_logprobs = logprobs
        return params

    def prompts(self) -> list[str | list[int]]:
        """The batch: one text or token-id list per prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


def normalize_prompt(v: Any) -> PromptInput:
    """Accept a text, a list of texts, a token-id list, or a list of token-id lists; nothing else."""
    shape = "a string, a list of strings, a list of token ids, or a list of token-id lists"
    if isinstance(v, str):
        return v
    if not isinstance(v, list) or not v:
        raise ValueError(f"prompt must be {shape} (and not empty)")
    if all(_is_token_id(t) for t in v) or all(isinstance(t, str) for t in v):
        return v
    if all(isinstance(x, list) and all(_is_token_id(t) for t in x) for x in v):
        return v
    raise ValueError(f"prompt must be {shape}")


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, **INT64)
    max_completion_tokens: int | None = Field(None, **INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise APIError("messages must not be empty", param="messages")
        if self.tools:
            raise APIError("tools are not supported", param="tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs requires logprobs=true", param="top_logprobs")

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses ---------------------------------------------------------------------------------------
# Streamed chunks are plain dicts built in serving_completion.py / serving_chat.py with these same fields:
# OpenAI's chunks carry an explicit `"usage": null` when usage is asked for, which a model would drop or force.


class PromptTokensDetails(BaseModel):
    """`cached_tokens`: prompt tokens whose KV the prefix cache supplied."""

    cached_tokens: int = 0


class UsageInfo(BaseModel):
    """Exact token counts of a request: prompt, generated, and their sum."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One prompt's completion."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """The body of a non-streamed /v1/completions answer."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    """A candidate token and its log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    """A generated token, its log-probability, and the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Per-token logprobs of a chat reply."""

    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    """The one reply of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    """The body of a non-streamed /v1/chat/completions answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    """A served model, as /v1/models lists it."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pipeserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    """The body of /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
