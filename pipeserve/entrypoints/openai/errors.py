"""OpenAI-style errors: one exception type for the routes, one JSON shape for every failure.

Every error the server returns has the body `{"error": {"message", "type", "param", "code"}}`, as the
OpenAI API does, so that the official client raises its usual exception classes with a readable message.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# The `type` field by status: what the OpenAI API and its client use.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A request that cannot be served; turned into an OpenAI-style JSON error with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)


def param_of(message: str, fields: set[str]) -> str | None:
    """The field a validation message is about, when it starts with the field's name ("top_p must be ...")."""
    first = message.split(" ", 1)[0]
    return first if first in fields else None


_MESSAGE_ROLES = {"system", "developer", "user", "assistant", "tool"}
_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}


def field_path(loc: tuple | list) -> str:
    """A pydantic error location as a path: ("body", "messages", 0, "user", "content") -> messages[0].content.
    Dropped: the role a tagged union of messages adds after a list index, and the member labels a plain
    union adds ("str", "list[str]")."""
    path = ""
    prev: Any = None
    for x in loc:
        if x == "body" and prev is None:
            continue
        if isinstance(x, int):
            path += f"[{x}]"
        elif not (isinstance(prev, int) and x in _MESSAGE_ROLES) and not _is_type_label(x):
            path += f".{x}" if path else str(x)
        prev = x
    return path


def _is_type_label(x: Any) -> bool:
    return isinstance(x, str) and (x in _TYPE_LABELS or "[" in x)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message (and the first offending field, as a path like `messages[0].content`) from
    pydantic's error list."""
    parts, param = [], None
    # A union reports one error per member; where one member got further into the value (a list whose
    # element is wrong), the others' complaints about its type say less.
    paths = [field_path(err.get("loc", ())) for err in errors]
    deeper = [any(q != p and (q.startswith(p + ".") or q.startswith(p + "[")) for q in paths) if p else False
              for p in paths]
    errors = [err for err, d in zip(errors, deeper, strict=True) if not d]
    for err in errors[:3]:
        loc = [x for x in err.get("loc", ()) if x != "body"]
        where = field_path(loc)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', msg)})")
            continue
        if not where and err.get("type") in ("model_attributes_type", "dict_type"):
            msg = "the request body must be a JSON object (Content-Type: application/json)"
        if err.get("type") == "missing":
            msg = "field required" if where else "the request body is missing: send a JSON object"
        parts.append(f"{where}: {msg}" if where else msg)
        param = param or where or None
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more problems")
    return "; ".join(parts), param


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"


def explain_unparsable_body(body: bytes) -> str:
    """Why a body that FastAPI could not parse (and that is not plain malformed JSON) was refused."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not valid UTF-8 (byte {exc.start})"
    try:
        json.loads(body)
    except RecursionError:
        return "the request body nests JSON arrays or objects too deeply"
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        return f"the request body is not valid JSON ({exc})"
    return "the request body could not be parsed"


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to an OpenAI-style body: validation → 400, HTTP errors keep their status, bugs → 500."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _FASTAPI_PARSE_ERROR:  # say what is wrong with the body
            return error_response(explain_unparsable_body(await request.body()), 400)
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return error_response(f"internal error: {type(exc).__name__}: {exc}", 500)
