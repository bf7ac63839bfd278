"""The FastAPI app: routes, middleware, error handlers, and the engine's loops in the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pipeserve import __version__
from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.entrypoints.openai.dashboard.routes import add_dashboard_routes
from pipeserve.entrypoints.openai.errors import error_response, install_error_handlers
from pipeserve.entrypoints.openai.metrics import ServerMetrics
from pipeserve.entrypoints.openai.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from pipeserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from pipeserve.entrypoints.openai.serving_chat import ChatServing
from pipeserve.entrypoints.openai.serving_completion import CompletionServing
from pipeserve.entrypoints.openai.serving_tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizationServing,
    TokenizeRequest,
    TokenizeResponse,
)
from pipeserve.entrypoints.openai.streams import DEFAULT_SSE_KEEPALIVE_S

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 << 20


@dataclass
class ServeSettings:
    """The server's own settings (the engine's are in EngineConfig)."""

    served_model_names: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    sse_keepalive_s: float = DEFAULT_SSE_KEEPALIVE_S  # a silent stream gets an SSE comment this often


def build_app(engine: AsyncEngine, settings: ServeSettings,
              on_engine_dead: Callable[[BaseException], None] | None = None) -> FastAPI:
    """An app serving `engine`; its lifespan runs the engine loops and shuts the engine down at the end.
    `on_engine_dead` is called once if the engine fails for good (a stage that could not be recovered)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watch = asyncio.create_task(_watch_engine(engine, on_engine_dead)) if on_engine_dead else None
        try:
            async with engine.running():
                yield
        finally:
            if watch is not None:
                watch.cancel()
            engine.shutdown()  # stops every stage process

    app = FastAPI(title="pipeserve", version=__version__, lifespan=lifespan)
    metrics = ServerMetrics(engine)
    completions = CompletionServing(engine, metrics, settings.served_model_names, settings.sse_keepalive_s)
    chats = ChatServing(engine, metrics, settings.served_model_names, settings.sse_keepalive_s)
    install_error_handlers(app)
    _add_routes(app, engine, settings, metrics, completions, chats)
    _add_tokenizer_routes(app, TokenizationServing(engine, settings.served_model_names))
    add_dashboard_routes(app, engine, settings.served_model_names[0], settings.api_key, metrics.live)
    # Added last = outermost: the key is checked before the body is buffered.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    return app


def _add_routes(app: FastAPI, engine: AsyncEngine, settings: ServeSettings, metrics: ServerMetrics,
                completions: CompletionServing, chats: ChatServing) -> None:
    max_len = engine.config.scheduler.max_model_len

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=engine.config.model.path, max_model_len=max_len)
                               for name in settings.served_model_names])

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        return await completions.create(body, raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        return await chats.create(body, raw)

    @app.get("/health")
    async def health() -> Response:
        """Readiness: 200 when requests are served now; 503 while a failed stage is being replaced (requests
        still queue and finish) and when the engine has failed for good."""
        try:
            engine.check_health()
        except Exception as exc:
            return error_response(f"unhealthy: {exc}", 503)
        if engine.recovering:
            return JSONResponse({"status": "recovering", "detail": "a failed pipeline stage is being replaced; "
                                 "requests are accepted and will complete"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/live")
    async def live() -> Response:
        """Liveness: 200 while this process serves HTTP, recovering or not (a recovery must never get the
        server restarted). An engine that failed for good makes `pipeserve serve` exit instead."""
        return JSONResponse({"status": "recovering" if engine.recovering else "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}


def _add_tokenizer_routes(app: FastAPI, serving: TokenizationServing) -> None:
    """vLLM's extra endpoints (not under /v1, as in vLLM)."""

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return serving.detokenize(body)


ENGINE_WATCH_S = 0.5


async def _watch_engine(engine: AsyncEngine, on_dead: Callable[[BaseException], None]) -> None:
    """Call `on_dead` once the engine has failed for good, so the server can exit for its supervisor."""
    while True:
        await asyncio.sleep(ENGINE_WATCH_S)
        try:
            engine.check_health()
        except Exception as exc:  # noqa: BLE001 - whatever killed the engine is reported as it is
            on_dead(exc)
            return
