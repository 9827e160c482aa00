"""Error responses: OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``,
and Anthropic-shaped on the Messages API's paths (``/v1/messages``,
``/v1/messages/count_tokens``): ``{"type": "error", "error": {"type", "message"}}``.

Mapping from kvchat's errors (see :mod:`kvchat.errors`):

- `ContextOverflowError` -> 400, code ``context_length_exceeded``;
- `InvalidRequestError` -> 400, ``param`` = its `field`;
- request validation (malformed JSON, wrong types) -> 400;
- :class:`APIError` raised by the server itself (401, 404, 413, 429, ...) -> its own status;
- anything else -> 500 with a generic message; the traceback goes to the log only.

On the Messages API's paths (:func:`speaks_anthropic`) the same errors, with the
same HTTP statuses, take Anthropic's shape (:func:`anthropic_error_body`): the
``type`` follows the status (400 ``invalid_request_error``, 401
``authentication_error``, 403 ``permission_error``, 404 ``not_found_error``, 413
``request_too_large``, 429 ``rate_limit_error``, 503 and 529 ``overloaded_error``,
504 ``timeout_error``, other 5xx ``api_error``, other 4xx
``invalid_request_error``), and the message begins with the ``param`` it is
about (Anthropic's body has no ``param``). Validation errors are 400 there too.

Error text may echo what the client sent (a schema's ``$ref``, a tool name).
Text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``, which
JSON's escapes can carry) is written as its escape sequence, so rendering an
error never fails and the client gets the error it earned, not a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvchat.errors import ContextOverflowError, EngineClosedError, InvalidRequestError

log = logging.getLogger("kvchat.server")


class APIError(Exception):
    """An error the server answers with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an error response (also sent as an SSE event mid-stream); its
    texts are valid Unicode (see :func:`valid_text`)."""
    return {
        "error": {
            "message": valid_text(message),
            "type": type,
            "param": None if param is None else valid_text(param),
            "code": code,
        }
    }


ANTHROPIC_PATH = "/v1/messages"
"""The path of Anthropic's Messages API; it and the paths under it answer errors in Anthropic's shape."""

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def speaks_anthropic(path: str) -> bool:
    """Whether errors on `path` take Anthropic's shape (the Messages API's paths)."""
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def anthropic_error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP `status`."""
    return _ANTHROPIC_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_body(error: APIError) -> dict:
    """`error` in Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``
    (also the data of a stream's ``error`` event). The message names the ``param``
    first, unless it does already; its text is valid Unicode."""
    message = error.message
    if error.param and not message.startswith(error.param):
        message = f"{error.param}: {message}"
    return {"type": "error", "error": {"type": anthropic_error_type(error.status), "message": valid_text(message)}}


def valid_text(text: str) -> str:
    """`text` with each lone surrogate written as its escape (``\\ud800``), so it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(value: object) -> str:
    """`value` as an error message shows it: its repr, cut to 60 characters."""
    return repr(value)[:60]


def quoted(text: str, limit: int = 40) -> str:
    """`text` quoted (escapes shown), cut to its first `limit` characters."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def error_for(exc: BaseException) -> APIError:
    """The API error that `exc` becomes."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param=exc.field, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.field)
    if isinstance(exc, EngineClosedError):
        return APIError(503, "the model is not available", type="server_error", code="engine_closed")
    log.exception("unhandled error while serving a request", exc_info=exc)
    return APIError(500, "internal server error", type="server_error")


def error_response(error: APIError, *, path: str = "") -> JSONResponse:
    """The HTTP response for `error` to a request for `path` (an ASGI app too):
    Anthropic-shaped on the Messages API's paths, OpenAI-shaped elsewhere."""
    headers = dict(error.headers)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = (
        anthropic_error_body(error)
        if speaks_anthropic(path)
        else error_body(error.message, type=error.type, param=error.param, code=error.code)
    )
    return JSONResponse(body, status_code=error.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error response of `app` OpenAI-shaped (Anthropic-shaped on the
    Messages API's paths, see :func:`speaks_anthropic`)."""

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(error_for(exc), path=request.url.path)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        return error_response(APIError(400, message, param=param), path=request.url.path)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind), path=request.url.path)

    app.add_exception_handler(APIError, on_error)
    app.add_exception_handler(InvalidRequestError, on_error)
    # Through the decorator: add_exception_handler is typed for handlers of any Exception, not of one class.
    app.exception_handler(RequestValidationError)(on_validation)
    app.exception_handler(StarletteHTTPException)(on_http)
    app.add_exception_handler(Exception, on_error)
