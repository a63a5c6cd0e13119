"""The one error type of the server and its answer in the OpenAI shape.

Every refusal, wherever it is decided (body parsing, the guard, the engine), is a `RequestError`
answered by `error_response`, so a client always gets `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from aded.server.schemas import error_payload

__all__ = ["RequestError", "error_response"]


class RequestError(Exception):
    """A request the server refuses, answered with `status` and the OpenAI error shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, self.param, self.code)


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)
