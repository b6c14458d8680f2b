"""Prometheus metrics of one server app, in a registry of its own.

A registry per app keeps two apps in one process (tests, the load benchmark) from
sharing or clashing over counters. Latency is measured by an ASGI middleware from the
request's arrival until the last byte of the response body, so a streamed answer counts
in full, not just until its headers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ttmm.routing import RoutingPlan

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, float("inf"))


class ServerMetrics:
    def __init__(self, known_paths: Sequence[str]):
        self.registry = CollectorRegistry()
        self.known_paths = frozenset(known_paths)
        r = self.registry
        self.requests = Counter(
            "ttmm_requests",
            "HTTP requests by path and status code.",
            ["path", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ttmm_request_latency_seconds",
            "Time from a request's arrival to the end of its response body.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "ttmm_requests_in_flight", "Generation and routing requests being served.", registry=r
        )
        self.active_experts = Histogram(
            "ttmm_active_experts",
            "Experts merged for one generated row (0 is the base model).",
            buckets=(0, 1, 2, 3, 5, 10, 20, 50, float("inf")),
            registry=r,
        )
        self.expert_uses = Counter(
            "ttmm_expert_uses", "Generated rows that merged each expert.", ["expert"], registry=r
        )
        self.batch_rows = Histogram(
            "ttmm_batch_rows",
            "Rows per engine.generate call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, float("inf")),
            registry=r,
        )
        self.batch_merges = Histogram(
            "ttmm_batch_distinct_merges",
            "Distinct merges (plan keys) per engine.generate call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, float("inf")),
            registry=r,
        )
        self.cache_hits = Counter(
            "ttmm_merge_cache_hits", "Merges whose factors came from the cache.", registry=r
        )
        self.cache_misses = Counter(
            "ttmm_merge_cache_misses", "Merges whose factors were stacked anew.", registry=r
        )
        self.stage_seconds = Histogram(
            "ttmm_request_stage_seconds",
            "Seconds of one generated row in each stage: route, merge, prefill (to the first "
            "new token) and decode.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "ttmm_tokens", "Prompt and completion tokens served.", ["kind"], registry=r
        )

    def observe_rows(self, plans: Sequence[RoutingPlan]) -> None:
        """Record the merges of rows about to be generated (one batch, or one stream)."""
        self.batch_rows.observe(len(plans))
        self.batch_merges.observe(len({plan.key() for plan in plans}))
        for plan in plans:
            self.active_experts.observe(len(plan.expert_ids))
            for k in plan.expert_ids:
                self.expert_uses.labels(expert=str(k)).inc()

    def observe_timing(self, timing) -> None:
        """Record a row's :class:`ttmm.serve.batching.Timing`."""
        for name, seconds in timing.to_dict().items():
            self.stage_seconds.labels(stage=name.removesuffix("_s")).observe(seconds)

    def observe_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels(kind="prompt").inc(prompt_tokens)
        self.tokens.labels(kind="completion").inc(completion_tokens)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware counting requests and timing them to the last body byte."""

        async def measured(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope["path"] if scope["path"] in self.known_paths else "other"
            start = time.perf_counter()
            status = {"code": 500}

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    self.requests.labels(path=path, status=str(status["code"])).inc()
                    self.latency.labels(path=path).observe(time.perf_counter() - start)

            await app(scope, receive, sending)

        return measured
