"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

Handlers raise ``APIError`` (or let ``InvalidRequestError`` / the engine's errors through);
``exc_to_error`` is the one mapping from an exception to a status and a body, used by the app's
exception handlers, by the ASGI guard's catch-all and in-band by streams that already started.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fdpp.errors import FdppError, InvalidRequestError
from fdpp.server.async_engine import EngineDeadError, RequestAbortedError
from fdpp.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error response: ``status`` and OpenAI's ``message``, ``param``, ``code`` and ``type``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the offending parameter."""
    return APIError(400, message, param=param, code=code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    t = type or ("invalid_request_error" if status < 500 else "server_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=t, param=param, code=code)).model_dump()


def error_response(status: int, message: str, *, headers: dict[str, str] | None = None, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kw), status_code=status, headers=headers)


def exc_to_error(e: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI error body for ``e``."""
    if isinstance(e, APIError):
        return e.status, error_body(e.status, e.message, param=e.param, code=e.code, type=e.type)
    if isinstance(e, InvalidRequestError):
        return 400, error_body(400, str(e), param=getattr(e, "param", None), code="invalid_request")
    if isinstance(e, EngineDeadError):
        return 503, error_body(503, str(e), code="engine_unavailable", type="service_unavailable")
    if isinstance(e, RequestAbortedError):
        return 503, error_body(503, str(e), code="request_aborted", type="service_unavailable")
    if isinstance(e, FdppError):
        return 500, error_body(500, f"{type(e).__name__}: {e}", code="internal_error")
    return 500, error_body(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


def response_for_exception(e: BaseException, path: str) -> JSONResponse:
    """The error response for an exception a handler raised, logged once (a traceback only for a bug).

    A 503 (the engine stopped or is stopping) also says ``Connection: close``: the server is going
    away, so a keep-alive client should not send its next request on this socket."""
    status, body = exc_to_error(e)
    headers = None
    if status >= 500:
        if status == 503:
            logger.warning("%s: %s", path, body["error"]["message"])
            headers = {"Connection": "close"}
        elif isinstance(e, APIError):
            logger.error("%s: %s", path, e.message)
        else:
            logger.exception("unhandled error on %s", path, exc_info=e)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error a handler raises becomes an OpenAI error body. These handlers run inside Starlette's
    ExceptionMiddleware, which answers without re-raising (so a failure is logged once, counted with the
    status that was sent, and the connection stays usable); anything else is caught by the guard."""

    async def known(request: Request, e: Exception) -> JSONResponse:
        return response_for_exception(e, request.url.path)

    for cls in (APIError, FdppError, EngineDeadError, RequestAbortedError):
        app.add_exception_handler(cls, known)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = str(e.detail)
        if e.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see /v1/completions, /v1/chat/completions, /v1/models"
        return error_response(e.status_code, msg, code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(400, str(e), code="invalid_request")
