"""The dashboard's key exchange, and keeping the key out of the access log.

A browser cannot send an `Authorization` header when it first loads a page, and an EventSource cannot send
headers at all. So the page is opened once as `/dashboard?api_key=KEY`: a right key is exchanged for a cookie
and the browser is redirected to `/dashboard`, which strips the key from its address bar and history. The cookie
is HttpOnly (no script reads it) and SameSite=Strict (no other site's page sends it), scoped to /dashboard, and
holds no key: a random nonce and its HMAC under a secret the server draws at start (a restart invalidates every
cookie). A key in the query string is accepted on the dashboard's routes only; /v1 wants the header
(middleware.APIKeyMiddleware never reads the query string).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets

from starlette.requests import Request

COOKIE = "pipeserve_dashboard"
COOKIE_PATH = "/dashboard"
COOKIE_MAX_AGE_S = 7 * 24 * 3600
QUERY_KEY = "api_key"
_KEY_IN_QUERY = re.compile(r"((?:^|[?&])api_key=)[^&\s\"]*")


class DashboardAuth:
    """Who may see the dashboard: everyone without an API key; with one, a bearer header, the key in the
    query string (to be exchanged), or a cookie this server issued."""

    def __init__(self, api_key: str | None):
        self.api_key = api_key
        self._secret = secrets.token_bytes(32)

    @property
    def required(self) -> bool:
        return bool(self.api_key)

    def key_matches(self, given: str | None) -> bool:
        return given is not None and self.api_key is not None and secrets.compare_digest(
            given.encode(), self.api_key.encode())

    def query_key(self, request: Request) -> str | None:
        return request.query_params.get(QUERY_KEY)

    def allowed(self, request: Request) -> bool:
        """Whether this request may see the dashboard (its page, script or stream)."""
        if not self.required:
            return True
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer ") and self.key_matches(header[len("Bearer "):]):
            return True
        return self.cookie_valid(request.cookies.get(COOKIE)) or self.key_matches(self.query_key(request))

    def issue_cookie(self) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._sign(nonce)}"

    def cookie_valid(self, value: str | None) -> bool:
        if not value or "." not in value:
            return False
        nonce, mac = value.split(".", 1)
        return hmac.compare_digest(mac, self._sign(nonce))

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()


def redact_query(text: str) -> str:
    """`text` with the value of any `api_key=` query parameter replaced."""
    return _KEY_IN_QUERY.sub(r"\1REDACTED", text)


class RedactKeyFilter(logging.Filter):
    """Rewrites uvicorn's access-log lines so that an `api_key=` in a request's query string never reaches a log
    (uvicorn logs the path with its query string as one argument of the record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "api_key=" in a for a in record.args):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str) and "api_key=" in record.msg:
            record.msg = redact_query(record.msg)
        return True


_FILTER = RedactKeyFilter()


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (once per process, whatever the number of apps)."""
    logger = logging.getLogger("uvicorn.access")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
