"""The error a tokenizer raises for one request's bad input; it becomes that request's error reply only."""

from __future__ import annotations

from headrace.common.messages import ErrorInfo


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: int = 400, type: str = "BadRequestError"):
        super().__init__(message)
        self.param = param
        self.code = code
        self.type = type

    def info(self) -> ErrorInfo:
        return ErrorInfo(message=str(self), type=self.type, param=self.param, code=self.code)
