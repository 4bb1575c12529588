"""Errors in OpenAI's wire shape, so clients raise their usual exceptions (``openai.BadRequestError`` ...)."""

from __future__ import annotations

from typing import Any

from laformer.errors import LaFormerError


class APIError(LaFormerError):
    """A request the server refuses: an HTTP status and OpenAI's ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "service_unavailable"}.get(self.status, "invalid_request_error" if self.status < 500
                                                 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_parameter") -> APIError:
    return APIError(400, message, code, param)


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param} is not supported by laformer serve: {why}", "unsupported_parameter", param)
