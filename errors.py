"""OpenAI-style errors: one small hierarchy, one renderer.

Clients and SDKs parse ``{"error": {"message", "type", "param", "code"}}``; every error the proxy
produces itself goes through ``error_body`` so the shape can never drift between routes.
"""

from __future__ import annotations

import json
from typing import Any


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered to the client; subclasses fix the status and type."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeaderTooLarge(ApiError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class AuthenticationFailed(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class UpstreamFailed(ApiError):
    """The upstream could not be reached or broke off; nothing it said can be passed on."""

    status = 502
    type = "upstream_error"
    code = "upstream_request_failed"


class UpstreamTimeout(UpstreamFailed):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(ApiError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
