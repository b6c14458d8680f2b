"""The OpenAI-compatible server: routes and merges experts per request (design notes §1).

``create_app(engine, settings)`` builds a FastAPI app with ``/v1/completions`` and
``/v1/chat/completions`` (both stream by server-sent events), ``/v1/models``, ``/v1/route``
(the routing of a text, without generating), ``/health`` and ``/metrics`` (Prometheus).
Each request may steer its merge in an extra ``ttmm`` field (see :mod:`ttmm.serve.schemas`)
and every response reports the routing used in a top-level ``ttmm`` field (and, asked
with ``"ttmm": {"timing": true}``, the seconds of routing, merging, prefill and decoding;
with several choices each choice carries its own plan and timing). Streamed and whole
requests are batched together (:mod:`ttmm.serve.batching`); every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ttmm.model import TTMM
from ttmm.serve.auth import user_authorizer
from ttmm.serve.batching import MergeCache
from ttmm.serve.completions import (
    Completions,
    check_model,
    max_new_tokens,
    merge_for,
    resolve_merge,
)
from ttmm.serve.errors import (
    APIError,
    document_errors,
    document_limits,
    error_responses,
    install_error_handlers,
)
from ttmm.serve.export import install_export
from ttmm.serve.limits import BodySizeLimit
from ttmm.serve.metrics import ServerMetrics
from ttmm.serve.responses import STREAMED
from ttmm.serve.rollout.endpoints import install_rollout, request_key
from ttmm.serve.rollout.service import RolloutService
from ttmm.serve.schemas import ChatRequest, CompletionRequest, RouteRequest
from ttmm.serve.settings import ServerSettings
from ttmm.serve.ui import install_ui

logger = logging.getLogger(__name__)

PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/route",
    "/health",
    "/metrics",
)

__all__ = ["ServerSettings", "create_app"]


def create_app(
    engine: TTMM | None,
    settings: ServerSettings | None = None,
    rollout: RolloutService | None = None,
) -> FastAPI:
    """A FastAPI app serving ``engine`` under ``settings``; with ``rollout`` (and ``engine``
    None), requests are served by the rollout's arms and ``/v1/ttmm/rollout`` runs it."""
    if (engine is None) == (rollout is None):
        raise ValueError("create_app needs an engine, or a rollout (whose arms hold theirs)")
    settings = settings or ServerSettings()
    metrics = ServerMetrics(PATHS)
    engine = rollout.arms.engine if rollout is not None else engine

    def attach_cache(engine: TTMM) -> None:
        if settings.merge_cache_mb > 0:
            engine.merger.factor_cache = MergeCache(
                int(settings.merge_cache_mb * 2**20),
                on_hit=metrics.cache_hits.inc,
                on_miss=metrics.cache_misses.inc,
            )

    attach_cache(engine)
    service = Completions(engine, settings, metrics, rollout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await service.batcher.stop()

    app = FastAPI(
        title="ttmm", summary="Test-time model merging, OpenAI-compatible", lifespan=lifespan
    )
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.state.rollout = rollout
    if rollout is not None:
        rollout.attach_metrics(metrics.registry)

        def swapped(arms) -> None:  # new requests (and the page) use the new candidate
            attach_cache(arms.engine)
            service.engine = service.batcher.engine = app.state.engine = arms.engine

        rollout.on_swap = swapped
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(_RawMiddleware, wrap=metrics.middleware)
    install_error_handlers(app)
    guard = Depends(user_authorizer(settings))
    _add_routes(app, service, guard)
    install_ui(app, [guard], service.slots, service.streams)  # the page at / and /v1/ttmm/*
    install_export(app, [guard], service.slots)  # POST /v1/ttmm/export
    install_rollout(app, guard, settings, rollout)  # /v1/ttmm/rollout*, /v1/ttmm/feedback
    document_errors(app)
    document_limits(app, settings)
    return app


ROUTE_ERRORS = (400, 401, 404, 413, 429)
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 504)


def _add_routes(app: FastAPI, service: Completions, guard) -> None:
    settings, metrics = service.settings, service.metrics
    guarded = [guard]

    @app.get("/health", responses=error_responses(413))
    async def health() -> dict:
        experts = service.engine.bank.num_experts
        return {"status": "ok", "model": settings.model_id, "experts": experts}

    @app.get(
        "/metrics",
        dependencies=guarded,
        response_class=PlainTextResponse,
        responses=error_responses(401, 413, 429),
    )
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded, responses=error_responses(401, 413, 429))
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(service.engine, settings)]}

    @app.post("/v1/route", dependencies=guarded, responses=error_responses(*ROUTE_ERRORS))
    async def route_endpoint(body: RouteRequest) -> dict:
        check_model(body.model, settings)
        engine = service.engine
        release = service.slots.take()
        try:
            plan = await resolve_merge(engine, merge_for(engine, body.ttmm, body.input, "input"))
        finally:
            release()
        return {
            "object": "ttmm.route",
            "model": settings.model_id,
            "ttmm": engine.bank.describe_plan(plan),
        }

    @app.post(
        "/v1/completions",
        dependencies=guarded,
        responses=STREAMED | error_responses(*GENERATION_ERRORS),
    )
    async def completions(body: CompletionRequest, request: Request):
        prompts, key = body.prompts, request_key(service.rollout, request, body.user)
        return await service.complete(
            body, prompts, prompts, body.max_tokens, chat=False, param="prompt", key=key
        )

    @app.post(
        "/v1/chat/completions",
        dependencies=guarded,
        responses=STREAMED | error_responses(*GENERATION_ERRORS),
    )
    async def chat_completions(body: ChatRequest, request: Request):
        max_new_tokens(body.max_tokens, settings)  # bounded even when superseded
        prompt = _chat_prompt(service.engine, body)
        users = [m.text for m in body.messages if m.role == "user"] or [body.messages[-1].text]
        key = request_key(service.rollout, request, body.user)
        return await service.complete(
            body, [prompt], [users[-1]], body.requested_tokens, chat=True, param="messages",
            key=key,
        )  # fmt: skip


def _chat_prompt(engine: TTMM, body: ChatRequest) -> str:
    """The chat messages through the tokenizer's chat template (developer = system)."""
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        for m in body.messages
    ]
    try:
        return engine.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    except Exception as err:  # a template may reject an order of roles
        message = f"the chat template rejected the messages: {err}"
        raise APIError(400, message, param="messages") from None


class _RawMiddleware:
    """Adapts a plain ``app → app`` ASGI wrapper to Starlette's middleware stack."""

    def __init__(self, app, wrap):
        self.app = wrap(app)

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def _model_card(engine: TTMM, settings: ServerSettings) -> dict:
    return {
        "id": settings.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "ttmm",
        "ttmm": {
            "base_model": engine.bank.manifest.base_model.get("name"),
            "experts": [
                {"id": k, "label": engine.bank.label(k)} for k in range(engine.bank.num_experts)
            ],
            "routing": engine.routing.to_dict(),
        },
    }
