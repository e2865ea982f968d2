"""HTTP plumbing around the routes: X-Request-Id, the request-size limit, the API key, the last-resort 500.

The two middlewares are plain ASGI (no BaseHTTPMiddleware), so streamed responses pass straight through.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from headrace.services.api.errors import ApiError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII only: it goes back out in a header


class RequestIdMiddleware:
    """Echo the client's X-Request-Id (or a fresh one) on every response; turn an unhandled exception into
    the OpenAI 500 body instead of a bare text page."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", []) if h[0].lower() != header[0]]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # headers are out; all we can do is drop the connection
            error = ApiError(500, "The server had an internal error while processing the request.")
            await error.response(headers={"X-Request-Id": request_id})(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: from Content-Length up front, and counted while reading (chunked
    uploads have no length)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status = 413 if length.isdigit() else 400
            await ApiError(status, self._message() if status == 413 else "Invalid Content-Length header.")\
                .response()(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(413, self._message())
            return message

        await self.app(scope, counted_receive, send)

    def _message(self) -> str:
        return f"The request body is larger than the server's limit of {self.max_bytes} bytes."


def api_key_check(api_key: str | None):
    """A route dependency: 401 unless `Authorization: Bearer <api_key>` (no check when no key is set). The
    scheme name is case-insensitive (RFC 7235 section 2.1), so `bearer <key>` passes as well."""
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        # 1*SP separates scheme and credentials; compare_digest keeps the key's check constant-time.
        given = credentials.lstrip(" ").encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            raise ApiError(401, "Missing or invalid API key; send it as `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    return check
