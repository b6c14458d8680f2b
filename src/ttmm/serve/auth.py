"""Who may call what: the bearer token of a request, checked in constant time.

The users' key (``ServerSettings.api_key``) guards every endpoint but ``/health`` and the
page; the rollout's operator endpoints take a distinct admin key
(:mod:`ttmm.serve.rollout.endpoints`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Request

from ttmm.serve.errors import APIError
from ttmm.serve.limits import RateLimiter
from ttmm.serve.settings import ServerSettings


def bearer_token(request: Request) -> str:
    """The token of ``Authorization: Bearer <token>``; empty without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def is_key(token: str, key: str | None) -> bool:
    """Whether ``token`` is ``key`` (never when either is missing), in constant time."""
    return key is not None and bool(token) and hmac.compare_digest(token.encode(), key.encode())


def user_authorizer(settings: ServerSettings) -> Callable[[Request], None]:
    """A dependency that checks the users' key, then the client's rate limit."""
    api_key = settings.api_key
    limiter = (
        RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
    )

    def authorize(request: Request) -> None:
        if api_key is not None:
            token = bearer_token(request)
            if not token:
                raise APIError(
                    401,
                    "missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
            if not is_key(token, api_key):
                raise APIError(401, "incorrect API key", code="invalid_api_key")
        if limiter is not None:
            client = request.client.host if request.client else "unknown"
            limiter.check("key" if api_key is not None else f"client:{client}")

    return authorize
