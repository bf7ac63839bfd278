"""Engine requests seen from HTTP: metrics on every output, several prompts merged, and aborts that always happen.

The rule: whatever ends an HTTP request (done, error, client gone, server stopping), each of its engine
requests is aborted (a no-op once finished) so its KV blocks go back to the pool at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.engine.request_stream import RequestStream
from pipeserve.entrypoints.openai.errors import APIError
from pipeserve.entrypoints.openai.metrics import RequestTimer
from pipeserve.outputs import RequestOutput

DISCONNECT_POLL_S = 0.5


class EngineRequest:
    """One prompt's engine request: its output stream, its metrics, and a `close` that aborts it."""

    def __init__(self, engine: AsyncEngine, stream: RequestStream, timer: RequestTimer):
        self.engine, self.stream, self.timer = engine, stream, timer
        self._closed = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until the request finishes; closes the request however iteration ends."""
        reason = "abort"
        try:
            async for out in self.stream:
                self.timer.tokens(sum(len(c.token_ids) for c in out.outputs))
                if out.finished:
                    reason = out.outputs[0].finish_reason or "stop"
                yield out
        except Exception:
            reason = "error"
            raise
        finally:
            self.close(reason)

    def close(self, reason: str = "abort") -> None:
        """Abort the engine request (frees its KV blocks; no-op once finished) and record how it ended."""
        if self._closed:
            return
        self._closed = True
        self.engine.abort(self.stream.request_id)
        self.timer.finished(reason)


def close_all(requests: list[EngineRequest]) -> None:
    for r in requests:
        r.close()


async def merge(requests: list[EngineRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) pairs of all requests as they arrive; an error in one ends them all."""
    if len(requests) == 1:  # the common case needs no tasks
        async for out in requests[0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, r: EngineRequest) -> None:
        try:
            async for out in r.outputs():
                queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        close_all(requests)


async def collect(requests: list[EngineRequest], raw: Request) -> list[RequestOutput]:
    """Every request's final output; aborts them all if the client disconnects first."""
    finals: list[RequestOutput | None] = [None] * len(requests)

    async def run() -> None:
        async for i, out in merge(requests):
            finals[i] = out

    await _until_disconnect(run(), raw)
    return finals  # type: ignore[return-value]


async def _until_disconnect(coro: Coroutine[Any, Any, None], raw: Request) -> None:
    # A non-streaming handler is not cancelled when its client leaves; poll, so the work stops too.
    task = asyncio.create_task(coro)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await raw.is_disconnected():
                raise APIError("the client disconnected", 499)
        task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def sse(data: Any) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


SSE_KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see a live connection
DEFAULT_SSE_KEEPALIVE_S = 5.0


async def with_keepalive(content: AsyncIterator[str], interval_s: float) -> AsyncIterator[str]:
    """`content`, plus a keep-alive comment whenever it has been silent for `interval_s` (for instance while
    a failed stage is being replaced), so that proxies do not cut a paused stream."""
    it = aiter(content)
    pending: asyncio.Task | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield SSE_KEEPALIVE  # the pending read goes on: cancelling it would break the generator
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):  # the cancelled read ends however it ends
                await pending
        elif pending is not None and not pending.cancelled():
            pending.exception()  # a read that ended as the client left: seen, so asyncio does not log it
        with contextlib.suppress(Exception):
            await it.aclose()  # type: ignore[attr-defined]


class SSEResponse(StreamingResponse):
    """An event stream that runs `on_close` however it ends: finished, failed, or cancelled by a disconnect.

    Starlette cancels the body on disconnect; if that happens while the body generator waits on `send`,
    nothing reaches the generator's own `finally`, so the response closes it (and the engine requests) itself.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 keepalive_s: float = DEFAULT_SSE_KEEPALIVE_S):
        super().__init__(with_keepalive(content, keepalive_s), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._on_close()
