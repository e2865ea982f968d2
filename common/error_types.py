"""OpenAI's error `type` for an HTTP status: what an error carries when nothing more specific names it.
Shared by the api (its own errors) and the tokenizer (errors it reports for a request)."""

from __future__ import annotations

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
