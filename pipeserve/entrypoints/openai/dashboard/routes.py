"""The dashboard's routes: `/dashboard` (the page), `/dashboard/dashboard.js` (its script) and `/dashboard/stream`
(server-sent events, about three a second, each a whole snapshot). Guarded by auth.DashboardAuth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.entrypoints.openai.dashboard.auth import (
    COOKIE,
    COOKIE_MAX_AGE_S,
    COOKIE_PATH,
    DashboardAuth,
    redact_access_log,
)
from pipeserve.entrypoints.openai.dashboard.snapshot import LiveSnapshot, layout
from pipeserve.entrypoints.openai.dashboard.stream import EventStream, SnapshotHub
from pipeserve.entrypoints.openai.dashboard.window import LiveRequestStats
from pipeserve.entrypoints.openai.errors import error_response

STATIC = Path(__file__).resolve().parent / "static"
# The page loads nothing from anywhere but this server, and sends no Referer (its first address held the key).
HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                      "frame-ancestors 'none'"}


def add_dashboard_routes(app: FastAPI, engine: AsyncEngine, model_name: str, api_key: str | None,
                         requests: LiveRequestStats) -> SnapshotHub:
    """Add the routes; returns the hub (its subscribers are what the tests count)."""
    auth = DashboardAuth(api_key)
    if auth.required:
        redact_access_log()
    shape = layout(engine, model_name)
    live = LiveSnapshot(engine, requests)
    hub = SnapshotHub(lambda: {"layout": shape, **live.build()}, engine.executor.step_feed)
    app.state.dashboard_hub = hub

    def refused() -> Response:
        return error_response("the dashboard needs the API key: open /dashboard?api_key=<key> once (it is "
                              "exchanged for a cookie), or send 'Authorization: Bearer <key>'", 401,
                              code="invalid_api_key")

    @app.get("/dashboard", include_in_schema=False)
    async def page(request: Request) -> Response:
        given = auth.query_key(request)
        if given is not None:
            if not auth.key_matches(given):
                return refused()
            # Trade the key for a cookie, and take it out of the address bar (and the browser's history).
            response = RedirectResponse(COOKIE_PATH, status_code=303, headers=HEADERS)
            response.set_cookie(COOKIE, auth.issue_cookie(), max_age=COOKIE_MAX_AGE_S, path=COOKIE_PATH,
                                httponly=True, samesite="strict")
            return response
        if not auth.allowed(request):
            return refused()
        return _static("index.html", "text/html; charset=utf-8")

    @app.get("/dashboard/dashboard.js", include_in_schema=False)
    async def script(request: Request) -> Response:
        return _static("dashboard.js", "text/javascript") if auth.allowed(request) else refused()

    @app.get("/dashboard/stream", include_in_schema=False)
    async def stream(request: Request) -> Any:
        return EventStream(hub) if auth.allowed(request) else refused()

    return hub


def _static(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=HEADERS)
