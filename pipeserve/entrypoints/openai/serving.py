"""The one request path both generation endpoints share: check, build sampling params, submit, then answer
whole or as a stream of chunks. An endpoint says only what differs: its prompts, its limits, the shape of
its response and of one choice's streamed delta (`serving_completion.py`, `serving_chat.py`).

Choices are numbered as OpenAI does: with several prompts (completions) and `n` choices each, prompt p's
choice j has index p * n + j.
"""

from __future__ import annotations

import abc
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.engine.request_stream import RequestStream
from pipeserve.entrypoints.openai.errors import APIError, error_body, param_of
from pipeserve.entrypoints.openai.metrics import RequestTimer, ServerMetrics
from pipeserve.entrypoints.openai.protocol import SamplingFields
from pipeserve.entrypoints.openai.streams import (
    DEFAULT_SSE_KEEPALIVE_S,
    SSE_DONE,
    EngineRequest,
    SSEResponse,
    close_all,
    collect,
    merge,
    sse,
)
from pipeserve.outputs import CompletionOutput, RequestOutput
from pipeserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_PARAM_NAMES = {f.name for f in fields(SamplingParams)} | {"prompt", "stop_token_ids", "max_tokens", "cache_salt"}


@dataclass
class Prompt:
    """One prompt ready for the engine."""

    token_ids: list[int]
    text: str | None


@dataclass
class SentSoFar:
    """How much of one choice a stream has sent."""

    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0  # completions logprobs: where the next token's text starts
    finished: bool = False


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIServing(abc.ABC):
    """Turns validated request bodies into engine requests and their outputs into OpenAI bodies; every
    check raises an APIError."""

    id_prefix: ClassVar[str]
    chunk_object: ClassVar[str]  # the `object` of a streamed chunk

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, served_model_names: list[str],
                 sse_keepalive_s: float = DEFAULT_SSE_KEEPALIVE_S):
        self.engine, self.metrics = engine, metrics
        self.sse_keepalive_s = sse_keepalive_s
        self.served_model_names = served_model_names
        self.tokenizer = engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    # ---- what each endpoint says -----------------------------------------------------------------------

    @abc.abstractmethod
    def prompts(self, req: Any) -> list[Prompt]:
        """The request's prompts, as token ids (and text where there is one)."""

    @abc.abstractmethod
    def limits(self, req: Any) -> tuple[int | None, int | None]:
        """(max_tokens, logprobs) as the engine takes them."""

    @abc.abstractmethod
    def response(self, req: Any, request_id: str, prompts: list[Prompt], finals: list[RequestOutput]) -> BaseModel:
        """The whole (non-streamed) answer."""

    def first_choices(self, req: Any, num_choices: int) -> list[dict[str, Any]]:
        """Choices of a first chunk sent before any token (chat: the assistant role)."""
        return []

    @abc.abstractmethod
    def choice_delta(self, req: Any, prompt: Prompt, out: RequestOutput, c: CompletionOutput, sent: SentSoFar,
                     index: int) -> dict[str, Any] | None:
        """One choice's new text since `sent` (updating it); None when nothing is new."""

    # ---- the shared path -----------------------------------------------------------------------------

    async def create(self, req: Any, raw: Request) -> Response:
        arrival = self.now()
        self.check_request(req)
        params = self.sampling_params(req, *self.limits(req))
        prompts = self.prompts(req)
        request_id = random_id(self.id_prefix)
        requests = self.submit(request_id, prompts, params, arrival, req.cache_salt)
        if req.stream:
            return SSEResponse(self._stream(req, request_id, prompts, requests, params.n),
                               on_close=lambda: close_all(requests), keepalive_s=self.sse_keepalive_s)
        try:
            finals = await collect(requests, raw)
        except APIError:
            raise
        except Exception as exc:
            raise engine_failure(exc) from exc
        return JSONResponse(self.response(req, request_id, prompts, finals).model_dump())

    async def _stream(self, req: Any, request_id: str, prompts: list[Prompt], requests: list[EngineRequest],
                      n: int) -> AsyncIterator[str]:
        created = int(time.time())
        sent = [[SentSoFar() for _ in range(n)] for _ in requests]
        finals: list[RequestOutput] = []

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            body = {"id": request_id, "object": self.chunk_object, "created": created, "model": self.model_name,
                    "choices": choices}
            if req.include_usage:  # OpenAI's chunks say `"usage": null` until the last one
                body["usage"] = None
            return body

        try:
            first = self.first_choices(req, len(requests) * n)
            if first:
                yield sse(chunk(first))
            async for i, out in merge(requests):
                choices = [d for c in out.outputs
                           if (d := self.choice_delta(req, prompts[i], out, c, sent[i][c.index], i * n + c.index))]
                if choices:
                    yield sse(chunk(choices))
                if out.finished:
                    finals.append(out)
            if req.include_usage:
                body = chunk([])
                body["usage"] = usage_dict(finals)
                yield sse(body)
        except Exception as exc:  # the status line is long gone: report in-band, as OpenAI does
            yield sse(error_body(engine_failure(exc).message, 503))
        yield SSE_DONE

    def check_request(self, req: SamplingFields) -> None:
        """Model name, supported fields, and a live engine."""
        if req.model is not None and req.model not in self.served_model_names:
            raise APIError(f"the model {req.model!r} does not exist: this server serves "
                           f"{', '.join(repr(n) for n in self.served_model_names)}", 404, "model", "model_not_found")
        req.check_supported()
        if req.model_extra:
            logger.warning("ignoring unsupported request fields: %s", ", ".join(sorted(req.model_extra)))
        try:
            self.engine.check_health()
        except Exception as exc:
            raise APIError(f"the engine is not running: {exc}", 503) from None

    def sampling_params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as exc:
            raise APIError(str(exc), 400, param_of(str(exc), _PARAM_NAMES)) from None

    def encode(self, prompt: str | list[int]) -> Prompt:
        if not isinstance(prompt, str):
            return Prompt(list(prompt), None)
        if self.tokenizer is None:
            raise APIError("this model ships no tokenizer: send the prompt as token ids", 400, "prompt")
        return Prompt(self.tokenizer.encode(prompt), prompt)

    def submit(self, request_id: str, prompts: list[Prompt], params: SamplingParams, arrival: float,
               cache_salt: str | None = None) -> list[EngineRequest]:
        """Queue every prompt. The engine checks each as it takes it; nothing runs before the last is queued (no
        await here), so a bad one is answered with a 400 after ending those already queued: it starts nothing."""
        streams: list[RequestStream] = []
        for i, p in enumerate(prompts):
            try:
                streams.append(self.engine.add_request(p.token_ids, params, p.text, request_id=f"{request_id}-{i}",
                                                       cache_salt=cache_salt))
            except ValueError as exc:
                for stream in streams:
                    self.engine.abort(stream.request_id)
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                raise APIError(f"{where}{exc}", 400, param_of(str(exc), _PARAM_NAMES)) from None
        return [EngineRequest(self.engine, stream, RequestTimer(self.metrics, arrival, len(p.token_ids)))
                for stream, p in zip(streams, prompts, strict=True)]

    @staticmethod
    def now() -> float:
        return time.monotonic()


def engine_failure(exc: Exception) -> APIError:
    """A request that failed inside the engine (a stage died): the server cannot serve it."""
    return APIError(f"the engine failed while serving the request: {exc}", 503)


def usage_dict(finals: list[RequestOutput]) -> dict[str, Any]:
    """Token counts of the finished requests of one API request; `cached_tokens`: prompt tokens whose KV came
    from the prefix cache."""
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens or 0 for o in finals)}}
