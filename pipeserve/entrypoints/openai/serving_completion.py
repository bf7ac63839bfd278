"""POST /v1/completions: a text, texts, or token ids in; one choice per prompt out, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pipeserve.entrypoints.openai.errors import APIError, error_body
from pipeserve.entrypoints.openai.logprobs import completion_logprobs
from pipeserve.entrypoints.openai.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from pipeserve.entrypoints.openai.serving import OpenAIServing, engine_failure, random_id, usage_dict
from pipeserve.entrypoints.openai.streams import SSE_DONE, EngineRequest, SSEResponse, close_all, collect, merge, sse
from pipeserve.outputs import RequestOutput


@dataclass
class _Sent:
    """How much of one choice the stream has sent so far."""

    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0


class CompletionServing(OpenAIServing):
    """Serves /v1/completions."""

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = self.now()
        self.check_request(req)
        params = self.sampling_params(req, req.max_tokens, req.logprobs)
        prompts = [self.encode(p) for p in req.prompts()]
        request_id = random_id("cmpl")
        requests = self.submit(request_id, prompts, params, arrival, req.cache_salt)
        if req.stream:
            return SSEResponse(self._stream(req, request_id, requests), on_close=lambda: close_all(requests),
                               keepalive_s=self.sse_keepalive_s)
        try:
            finals = await collect(requests, raw)
        except APIError:
            raise
        except Exception as exc:
            raise engine_failure(exc) from exc
        return JSONResponse(self._response(req, request_id, finals).model_dump())

    def _response(self, req: CompletionRequest, request_id: str, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for i, out in enumerate(finals):
            c = out.outputs[0]
            logprobs = (completion_logprobs(c.token_ids, c.logprobs or [], req.logprobs)
                        if req.logprobs is not None else None)
            choices.append(CompletionChoice(index=i, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason,
                                            stop_reason=c.stop_reason))
        usage = usage_dict(finals)
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    async def _stream(self, req: CompletionRequest, request_id: str,
                      requests: list[EngineRequest]) -> AsyncIterator[str]:
        created, sent = int(time.time()), [_Sent() for _ in requests]
        finals: list[RequestOutput] = []
        try:
            async for i, out in merge(requests):
                chunk = self._chunk(req, out, sent[i], i)
                if chunk is not None:
                    yield sse(self._envelope(req, request_id, created, [chunk]))
                if out.finished:
                    finals.append(out)
            if req.include_usage:
                body = self._envelope(req, request_id, created, [])
                body["usage"] = usage_dict(finals)
                yield sse(body)
        except Exception as exc:  # the status line is long gone: report in-band, as OpenAI does
            yield sse(error_body(engine_failure(exc).message, 503))
        yield SSE_DONE

    def _envelope(self, req: CompletionRequest, request_id: str, created: int,
                  choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                                "model": self.model_name, "choices": choices}
        if req.include_usage:
            body["usage"] = None
        return body

    @staticmethod
    def _chunk(req: CompletionRequest, out: RequestOutput, sent: _Sent, index: int) -> dict[str, Any] | None:
        """The new text and tokens of one choice since the last chunk (None when nothing changed)."""
        c = out.outputs[0]
        new_text, new_ids = c.text[sent.text_len:], c.token_ids[sent.num_tokens:]
        if not new_text and not new_ids and not out.finished:
            return None
        logprobs = None
        if req.logprobs is not None:
            entries = (c.logprobs or [])[sent.num_tokens:]
            logprobs = completion_logprobs(new_ids, entries, req.logprobs, sent.text_offset).model_dump()
            sent.text_offset += sum(len(t) for t in logprobs["tokens"])
        sent.text_len, sent.num_tokens = len(c.text), len(c.token_ids)
        return {"index": index, "text": new_text, "logprobs": logprobs,
                "finish_reason": c.finish_reason if out.finished else None,
                "stop_reason": c.stop_reason if out.finished else None}
