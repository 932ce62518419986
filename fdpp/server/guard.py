"""The pure ASGI middleware in front of the app: the request body size limit (413 before the app
reads it), the API key, counting every response by endpoint and status for /metrics, and the
catch-all that turns an exception no handler took into one logged error response."""
from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fdpp.server.errors import error_response, response_for_exception
from fdpp.server.state import ServerState

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/version",
             "/tokenize", "/detokenize")
# Open with an API key set: probes and scrapers, which send no body and no prompt text.
OPEN_ENDPOINTS = frozenset({"/health", "/ping", "/version", "/metrics"})


def has_api_key(headers: list[tuple[bytes, bytes]], api_key: str) -> bool:
    """``Authorization: Bearer <api_key>``; the scheme is case-insensitive (RFC 7235)."""
    auth = dict(headers).get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = auth.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class Guard:
    """Pure ASGI middleware: rejects bodies over ``max_body_bytes`` (413) before the app sees them,
    checks the API key, and counts every response by endpoint and status."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        method = scope.get("method", "GET")
        status_box = [0]  # 0: no response started

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, counting_send)
        except Exception as e:  # noqa: BLE001 - no handler took it: answer here, log once
            if status_box[0]:
                raise  # too late for a response: the server closes the connection
            await response_for_exception(e, path)(scope, receive, counting_send)
        finally:
            self.state.metrics.requests.labels(endpoint, method, str(status_box[0] or 500)).inc()

    async def _handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        st = self.state
        if st.api_key and scope.get("path", "") not in OPEN_ENDPOINTS \
                and not has_api_key(scope.get("headers") or [], st.api_key):
            resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = st.max_body_bytes
        too_big = error_response(
            413, f"the request body is larger than the server's limit of {limit} bytes (--max-body-bytes)",
            code="request_too_large")
        for k, v in scope.get("headers") or []:
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        return await too_big(scope, receive, send)
                except ValueError:
                    return await error_response(400, "invalid Content-Length header")(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                return await too_big(scope, receive, send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
