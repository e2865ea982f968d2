"""OpenAI-shaped errors: one exception type for every failed request, and the handlers that render it.

Body: {"error": {"message", "type", "param", "code"}}. `code` is the HTTP status (as in ErrorInfo, which the
tokenizer sends), except where OpenAI clients know a named code ("model_not_found", "invalid_api_key").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from headrace.common.error_types import error_type
from headrace.common.messages import ErrorInfo

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request that fails with an HTTP error; raised anywhere below a route, rendered by `install`."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: int | str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = status if code is None else code

    @classmethod
    def from_info(cls, info: ErrorInfo) -> ApiError:
        """A tokenizer's (or our own) ErrorInfo; its code is the HTTP status, kept sane if a peer sent junk."""
        status = info.code if isinstance(info.code, int) and 400 <= info.code <= 599 else 500
        return cls(status, info.message, type=info.type, param=info.param)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers or self.headers)


def model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def from_validation_errors(errors: Sequence[Any]) -> ApiError:
    """Pydantic's error list -> one 400 naming the field, as "messages.[0].role" (the tokenizer's spelling)."""
    if not errors:
        return ApiError(400, "Invalid request.")
    first = errors[0]
    loc = _field_path(first)
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"Malformed JSON body: {detail}".rstrip(": "))
    # A union (`str | list[str]`) fails once per arm, each loc ending in the arm's name: keep the shared prefix.
    for other in errors[1:]:
        other_loc = _field_path(other)
        if other_loc[:1] != loc[:1]:
            continue
        n = 0
        while n < min(len(loc), len(other_loc)) and loc[n] == other_loc[n]:
            n += 1
        loc = loc[:n]
    param = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc) or None
    if first.get("type") == "value_error" and "error" in (first.get("ctx") or {}):
        reason = str(first["ctx"]["error"])  # our own validators' text, without pydantic's "Value error, "
    else:
        reason = str(first.get("msg", "invalid value"))
    where = f"'{param}'" if param else "the request body"
    return ApiError(400, f"Invalid value for {where}: {reason}", param=param)


def _field_path(error: Any) -> list[Any]:
    loc = list(error.get("loc", ()))
    # FastAPI prefixes where the value came from; the client knows the field by its name alone.
    return loc[1:] if loc[:1] and loc[0] in ("body", "query", "path", "header", "cookie") else loc


def install(app: FastAPI) -> None:
    """Render every failure as the OpenAI error body; FastAPI's 422 becomes a 400."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_errors(exc.errors()).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_errors(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return ApiError(exc.status_code, message).response(headers=getattr(exc, "headers", None))
