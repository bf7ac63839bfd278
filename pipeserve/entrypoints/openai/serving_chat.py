"""POST /v1/chat/completions: messages through the model's chat template, one assistant reply, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pipeserve.entrypoints.openai.errors import APIError, error_body
from pipeserve.entrypoints.openai.logprobs import chat_logprobs
from pipeserve.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatResponseMessage,
)
from pipeserve.entrypoints.openai.serving import OpenAIServing, Prompt, engine_failure, random_id, usage_dict
from pipeserve.entrypoints.openai.streams import SSE_DONE, EngineRequest, SSEResponse, close_all, collect, merge, sse
from pipeserve.outputs import RequestOutput


class ChatServing(OpenAIServing):
    """Serves /v1/chat/completions."""

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = self.now()
        self.check_request(req)
        params = self.sampling_params(req, req.max_new_tokens(), req.num_logprobs())
        prompt = self.apply_template(req.messages)
        request_id = random_id("chatcmpl")
        requests = self.submit(request_id, [prompt], params, arrival, req.cache_salt)
        if req.stream:
            return SSEResponse(self._stream(req, request_id, requests[0]), on_close=lambda: close_all(requests),
                               keepalive_s=self.sse_keepalive_s)
        try:
            (final,) = await collect(requests, raw)
        except APIError:
            raise
        except Exception as exc:
            raise engine_failure(exc) from exc
        return JSONResponse(self._response(req, request_id, final).model_dump())

    def apply_template(self, messages: list[ChatMessage]) -> Prompt:
        """The conversation as the model was trained to see it, ending where the assistant speaks next."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError("this model has no chat template: use /v1/completions", 400, "messages")
        conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in messages]
        try:
            text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise on conversations they do not accept (e.g. role order)
            raise APIError(f"the chat template rejected the messages: {exc}", 400, "messages") from None
        # The template already holds the special tokens (BOS and friends): do not add them twice.
        return Prompt(tok.encode(text, add_special_tokens=False), text)

    def _response(self, req: ChatCompletionRequest, request_id: str, final: RequestOutput) -> ChatCompletionResponse:
        c = final.outputs[0]
        logprobs = chat_logprobs(c.token_ids, c.logprobs or [], req.top_logprobs or 0) if req.logprobs else None
        choice = ChatChoice(index=0, message=ChatResponseMessage(content=c.text), logprobs=logprobs,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=[choice],
                                      usage=usage_dict([final]))

    async def _stream(self, req: ChatCompletionRequest, request_id: str,
                      request: EngineRequest) -> AsyncIterator[str]:
        created = int(time.time())
        text_len = num_tokens = 0
        final: RequestOutput | None = None
        try:
            yield sse(self._chunk(req, request_id, created, {"role": "assistant", "content": ""}))
            async for _, out in merge([request]):
                c = out.outputs[0]
                new_ids = c.token_ids[num_tokens:]
                if c.text[text_len:] or new_ids or out.finished:
                    logprobs = None
                    if req.logprobs:
                        entries = (c.logprobs or [])[num_tokens:]
                        logprobs = chat_logprobs(new_ids, entries, req.top_logprobs or 0).model_dump()
                    yield sse(self._chunk(req, request_id, created, {"content": c.text[text_len:]}, logprobs,
                                          c.finish_reason if out.finished else None))
                text_len, num_tokens, final = len(c.text), len(c.token_ids), out
            if req.include_usage and final is not None:
                body = self._chunk(req, request_id, created, None)
                body["usage"] = usage_dict([final])
                yield sse(body)
        except Exception as exc:  # the status line is long gone: report in-band
            yield sse(error_body(engine_failure(exc).message, 503))
        yield SSE_DONE

    def _chunk(self, req: ChatCompletionRequest, request_id: str, created: int, delta: dict[str, Any] | None,
               logprobs: dict[str, Any] | None = None, finish_reason: str | None = None) -> dict[str, Any]:
        """A `chat.completion.chunk`; `delta=None` makes the usage-only chunk (no choices)."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish_reason}]
        body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "choices": choices}
        if req.include_usage:
            body["usage"] = None
        return body
