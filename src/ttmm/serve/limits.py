"""What keeps a public deployment up: request body size, request and stream slots, and a
per-key rate limit. Each refusal is an OpenAI-style error (413 or 429), never a 5xx."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ttmm.serve.errors import APIError, timeout_error
from ttmm.serve.metrics import ServerMetrics

T = TypeVar("T")


class BodySizeLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` gets a 413 before any handler
    reads it, whether its size is declared (Content-Length) or only seen while it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:  # read the body here, so a body that lies about its size is caught too
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, send) -> None:
        error = APIError(
            413,
            f"the request body is larger than this server's limit of {self.max_bytes} bytes",
            code="request_too_large",
        )
        payload = json.dumps({"error": error.body()}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _replay(messages: list[dict], receive):
    """A ``receive`` that returns ``messages`` first, then waits on the real one (for a
    streaming response's disconnect)."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


class Slots:
    """Counts requests being served; one beyond ``limit`` is refused with a 429."""

    def __init__(self, limit: int, what: str, on_change: Callable[[int], None] = lambda d: None):
        self.limit, self.used, self.what, self._on_change = limit, 0, what, on_change

    def take(self) -> Callable[[], None]:
        """Take a slot; returns an idempotent release."""
        if self.used >= self.limit:
            raise APIError(
                429,
                f"the server is serving its maximum of {self.limit} {self.what}; retry shortly",
                type="rate_limit_error",
                code="too_many_requests",
                headers={"Retry-After": "1"},
            )
        self.used += 1
        self._on_change(+1)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.used -= 1
                self._on_change(-1)

        return release

    async def run(
        self, work: Callable[[], T], timeout_s: float, cancel: threading.Event | None = None
    ) -> T:
        """``work()`` in a worker thread, in one of these slots (429 when none is free) and
        within ``timeout_s`` seconds (504 after). A thread cannot be stopped from outside:
        work that loops (decoding) takes ``cancel``, set here at the time limit, and checks it
        between steps, so that it lets go of the engine instead of running to its end."""
        release = self.take()
        try:
            return await asyncio.wait_for(asyncio.to_thread(work), timeout_s)
        except TimeoutError:
            if cancel is not None:
                cancel.set()
            raise timeout_error(timeout_s) from None
        finally:
            release()


def request_slots(limit: int, metrics: ServerMetrics) -> Slots:
    def track(delta: int) -> None:
        (metrics.in_flight.inc if delta > 0 else metrics.in_flight.dec)()

    return Slots(limit, "requests", track)


class RateLimiter:
    """A token bucket per client key: ``per_minute`` requests a minute, bursts up to as many.

    The key is the API key a request carries (or the client's address when the server has
    none), so one client cannot starve the others.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1:
                wait = math.ceil((1 - tokens) / self.rate)
                self._buckets[key] = (tokens, now)
                raise APIError(
                    429,
                    f"rate limit of {int(self.capacity)} requests a minute reached; retry in "
                    f"{wait} s",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(wait)},
                )
            self._buckets[key] = (tokens - 1, now)
