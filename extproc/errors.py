"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

One constructor per situation of SPEC §4, so status, type and code never drift apart.
Messages never contain a secret: callers pass key ids, route and model names only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ApiError:
    status: int
    code: str
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        ).encode()


def invalid_api_key(message: str = "Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>'.") -> ApiError:
    return ApiError(401, "invalid_api_key", message)


def permission_denied(message: str) -> ApiError:
    return ApiError(403, "permission_denied", message)


def model_not_found(name: str) -> ApiError:
    return ApiError(404, "model_not_found", f"The model or route '{name}' does not exist.", param="model")


def not_found(path: str) -> ApiError:
    return ApiError(404, "not_found", f"Unknown endpoint {path!r}.")


def invalid_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param=param)


def request_too_large(limit: int | None = None) -> ApiError:
    size = f" of {limit} bytes" if limit else ""
    return ApiError(413, "request_too_large", f"The request body is larger than the gateway's limit{size}.")


def insufficient_quota(message: str) -> ApiError:
    return ApiError(429, "insufficient_quota", message, type="insufficient_quota")


def rate_limited(message: str, retry_after_s: int, headers: dict[str, str] | None = None) -> ApiError:
    h = {"retry-after": str(max(1, retry_after_s))}
    h.update(headers or {})
    return ApiError(429, "rate_limit_exceeded", message, type="requests", headers=h)


def upstream_unavailable(status: int, message: str) -> ApiError:
    return ApiError(status, "upstream_unavailable", message, type="server_error")


def quota_unavailable() -> ApiError:
    return ApiError(
        503,
        "quota_unavailable",
        "The gateway cannot reach its quota store; the request was not sent to any provider.",
        type="server_error",
    )
