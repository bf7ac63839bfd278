"""ASGI middleware that answers before the app sees a request: API key (401) and body size (413).

Both read (and discard) a rejected request's body before answering. A server that replies and closes
while the client is still uploading makes the client's TCP stack see a reset instead of the reply.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeserve.entrypoints.openai.errors import error_response

DRAIN_CAP_BYTES = 256 << 20  # past this a rejected upload is cut off rather than read to the end


async def drain(receive: Receive, cap: int = DRAIN_CAP_BYTES) -> None:
    """Read the rest of the request body and throw it away (up to `cap` bytes)."""
    seen = 0
    while seen <= cap:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/*; /health, /metrics and /version stay open for probes."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self._expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        given = _header(scope, b"authorization") or b""
        if secrets.compare_digest(given, self._expected):
            return await self.app(scope, receive, send)
        await drain(receive)
        message = "missing API key" if not given else "invalid API key"
        await error_response(f"{message}: send the header 'Authorization: Bearer <key>'", 401,
                             code="invalid_api_key")(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answers 413 for a body over `max_bytes`; otherwise hands the app the body it buffered while counting."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await drain(receive)
            return await self._too_large(scope, receive, send)
        chunks: list[bytes] = []
        size, more = 0, True
        while more:  # chunked uploads carry no length: count as they arrive
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before finishing its upload
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await drain(receive)
                return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(f"the request body exceeds the limit of {self.max_bytes} bytes", 413,
                             code="request_too_large")(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that returns the buffered body once, then defers to the real one (for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
