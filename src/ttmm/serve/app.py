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

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ttmm.merge import MergeError
from ttmm.model import TTMM
from ttmm.routing import RoutingError, RoutingPlan
from ttmm.serve.batching import Batcher, GenerationOptions, MergeCache, MergeRequest
from ttmm.serve.errors import (
    APIError,
    document_errors,
    error_responses,
    install_error_handlers,
    timeout_error,
)
from ttmm.serve.export import install_export
from ttmm.serve.limits import BodySizeLimit, RateLimiter, Slots, request_slots
from ttmm.serve.metrics import ServerMetrics
from ttmm.serve.responses import (
    Choice,
    Reply,
    chat_logprobs,
    completion_logprobs,
    stream_events,
)
from ttmm.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    RouteRequest,
    TTMMControl,
)
from ttmm.serve.streaming import RowStream, cut_at_stop
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


@dataclass(frozen=True)
class ServerSettings:
    """Limits and behaviour of one server; validated on construction."""

    model_id: str = "ttmm"
    """Model name listed by /v1/models; requests naming another model get a 404."""
    max_prompt_tokens: int = 2048
    """Longest prompt accepted, in tokens (after the chat template, for chat requests)."""
    max_tokens_limit: int = 512
    """Largest ``max_tokens`` (new tokens) a request may ask for."""
    default_max_tokens: int = 128
    """Tokens generated when a request does not say."""
    max_concurrent_requests: int = 64
    """Generation and routing requests served at once; one more gets a 429."""
    request_timeout_s: float = 600.0
    """Seconds a request may wait and run before it is answered with a 504."""
    max_batch_size: int = 8
    """Most prompts generated together in one batch."""
    batch_window_ms: float = 50.0
    """How long the first request of a batch waits for others to join it, in milliseconds.
    At 10 ms, 8 closed-loop clients drifted apart into batches of ~5 rows; 50 ms kept them
    at 8 (benchmarks/serve_load.py), a small cost next to seconds of decoding."""
    merge_cache_mb: float = 1024.0
    """Memory budget of the LRU cache of merged factors (per plan), in MiB; 0 disables it."""
    api_key: str | None = field(default=None, repr=False)
    """If set, every endpoint but /health needs ``Authorization: Bearer <api_key>``."""
    max_body_bytes: int = 1 << 20
    """Largest request body, in bytes; a larger one gets a 413 before it is parsed."""
    max_concurrent_streams: int = 16
    """Streamed completions served at once (each holds rows in the batches while it
    decodes, and an open connection); more get a 429."""
    rate_limit_per_minute: int | None = None
    """Requests a minute per API key (or per client address without a key), bursts up to as
    many; None = no limit. More get a 429 with Retry-After."""
    export_dir: str | None = None
    """Folder where /v1/ttmm/export writes adapters and answers their path; None = answer
    the files themselves (base64) and write nothing."""

    def __post_init__(self) -> None:
        positive_ints = ("max_prompt_tokens", "max_tokens_limit", "default_max_tokens")
        counts = ("max_concurrent_requests", "max_batch_size", "max_body_bytes")
        for name in (*positive_ints, *counts, "max_concurrent_streams"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"ServerSettings.{name} must be an integer >= 1, got {value!r}")
        for name in ("request_timeout_s",):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerSettings.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("batch_window_ms", "merge_cache_mb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ServerSettings.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"ServerSettings.default_max_tokens ({self.default_max_tokens}) exceeds "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )
        if not self.model_id:
            raise ValueError("ServerSettings.model_id must not be empty")
        if self.api_key is not None and not self.api_key:
            raise ValueError("ServerSettings.api_key must be None or a non-empty string")
        limit = self.rate_limit_per_minute
        if limit is not None and not (isinstance(limit, int) and limit >= 1):
            raise ValueError(
                f"ServerSettings.rate_limit_per_minute must be None or an integer >= 1, "
                f"got {limit!r}"
            )


def create_app(engine: TTMM, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving ``engine`` under ``settings``."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(PATHS)
    if settings.merge_cache_mb > 0:
        engine.merger.factor_cache = MergeCache(
            int(settings.merge_cache_mb * 2**20),
            on_hit=metrics.cache_hits.inc,
            on_miss=metrics.cache_misses.inc,
        )
    service = Completions(engine, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await service.batcher.stop()

    app = FastAPI(
        title="ttmm", summary="Test-time model merging, OpenAI-compatible", lifespan=lifespan
    )
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(_RawMiddleware, wrap=metrics.middleware)
    install_error_handlers(app)
    guard = Depends(_authorizer(settings))
    _add_routes(app, service, guard)
    install_ui(app, [guard], service.slots, service.streams)  # the page at / and /v1/ttmm/*
    install_export(app, [guard], service.slots)  # POST /v1/ttmm/export
    document_errors(app)
    return app


def _authorizer(settings: ServerSettings) -> Callable[[Request], None]:
    """A dependency that checks ``Authorization: Bearer <api_key>`` (in constant time), then
    the client's rate limit."""
    api_key = settings.api_key
    limiter = (
        RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
    )

    def authorize(request: Request) -> None:
        if api_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise APIError(
                    401,
                    "missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
            if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                raise APIError(401, "incorrect API key", code="invalid_api_key")
        if limiter is not None:
            client = request.client.host if request.client else "unknown"
            limiter.check("key" if api_key is not None else f"client:{client}")

    return authorize


MAX_CHOICES = 16
"""Most choices (prompts × n) one request may ask for."""
ROUTE_ERRORS = (400, 401, 404, 413, 429)
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 504)
STREAMED = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events of chunks.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


def _add_routes(app: FastAPI, service: Completions, guard) -> None:
    engine, settings, metrics = service.engine, service.settings, service.metrics
    guarded = [guard]

    @app.get("/health", responses=error_responses(413))
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_id, "experts": engine.bank.num_experts}

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
        return {"object": "list", "data": [_model_card(engine, settings)]}

    @app.post("/v1/route", dependencies=guarded, responses=error_responses(*ROUTE_ERRORS))
    async def route_endpoint(body: RouteRequest) -> dict:
        _check_model(body.model, settings)
        release = service.slots.take()
        try:
            plan = await _resolve(engine, _merge_for(engine, body.ttmm, body.input, "input"))
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
    async def completions(body: CompletionRequest):
        prompts = body.prompts
        return await service.complete(
            body, prompts, prompts, body.max_tokens, chat=False, param="prompt"
        )

    @app.post(
        "/v1/chat/completions",
        dependencies=guarded,
        responses=STREAMED | error_responses(*GENERATION_ERRORS),
    )
    async def chat_completions(body: ChatRequest):
        prompt = _chat_prompt(engine, body)
        users = [m.text for m in body.messages if m.role == "user"] or [body.messages[-1].text]
        return await service.complete(
            body, [prompt], [users[-1]], body.requested_tokens, chat=True, param="messages"
        )


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


class Completions:
    """Serves completion requests: limits, routing, then a batched or streamed generation."""

    def __init__(self, engine: TTMM, settings: ServerSettings, metrics: ServerMetrics):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.batcher = Batcher(
            engine, settings.max_batch_size, settings.batch_window_ms / 1000, metrics.observe_rows
        )
        self.slots = request_slots(settings.max_concurrent_requests, metrics)
        self.streams = Slots(settings.max_concurrent_streams, "streams")

    async def complete(
        self,
        body: GenerationRequest,
        prompts: list[str],
        queries: list[str],
        max_tokens: int | None,
        chat: bool,
        param: str,
    ):
        """Check limits, route each of ``queries``, then generate ``n`` choices from each of
        ``prompts`` (batched, streamed or not)."""
        engine, settings = self.engine, self.settings
        _check_model(body.model, settings)
        echo = getattr(body, "echo", False)
        scored = body.logprob_count
        if scored is not None and (body.stream or echo):
            what = "stream: true" if body.stream else "echo: true"
            raise APIError(400, f"logprobs cannot be combined with {what}", param="logprobs")
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(
                400,
                f"{len(prompts)} prompts × n={body.n} make more than {MAX_CHOICES} choices; "
                "send fewer prompts or a smaller n",
                param="n",
            )
        max_new = _max_new_tokens(max_tokens, settings)
        for prompt in prompts:
            self._check_prompt_length(prompt, param)
        merges = [_merge_for(engine, body.ttmm, query, param) for query in queries]
        n, seed = body.n, body.seed
        options = [  # sample j of a seeded request draws with seed + j: n different samples
            GenerationOptions.from_request(
                max_new, body.temperature, body.top_p, None if seed is None else seed + j
            )
            for j in range(n)
        ]
        rows = [(p, m, options[j]) for p, m in zip(prompts, merges) for j in range(n)]
        timing = body.ttmm is not None and body.ttmm.timing
        release = self.slots.take()
        try:
            if body.stream:
                release = _both(release, self.streams.take())
                response = self._stream(body, rows, chat, release, echo, timing)
                release = None  # the stream releases its slots when it ends
                return response
            submitted = (self.batcher.submit(p, m, o, scored) for p, m, o in rows)
            try:
                served = await asyncio.wait_for(
                    asyncio.gather(*submitted), settings.request_timeout_s
                )
            except TimeoutError:
                raise timeout_error(settings.request_timeout_s) from None
        finally:
            if release is not None:
                release()
        return self._whole(body, rows, served, chat, echo, timing)

    def _whole(self, body, rows, served, chat, echo, timing) -> dict:
        """The response to a non-streamed request, from its rows' results."""
        tokenizer, several = self.engine.tokenizer, len(rows) > body.n
        plans = [self.engine.bank.describe_plan(s.generation.plan) for s in served]
        choices = []
        for (prompt, _, _), s, plan in zip(rows, served, plans):
            result = s.generation
            self.metrics.observe_timing(s.timing)
            text, stopped = cut_at_stop(result.text, body.stop_strings)
            logprobs = None
            if body.logprob_count is not None and chat:
                logprobs = chat_logprobs(tokenizer, result, len(text), body.logprob_count)
            elif body.logprob_count is not None:
                logprobs = completion_logprobs(tokenizer, result, len(text), 0)
            own = plan | {"timing": s.timing.to_dict()} if timing else plan
            choices.append(
                Choice(
                    prompt + text if echo else text,
                    "stop" if stopped else result.finish_reason,
                    logprobs,
                    own if several or (timing and body.n > 1) else None,
                )
            )
        prompt_tokens = sum(s.generation.prompt_tokens for s in served[:: body.n])
        completion_tokens = sum(s.generation.completion_tokens for s in served)
        self.metrics.observe_tokens(prompt_tokens, completion_tokens)
        extra = {"timing": served[0].timing.to_dict()} if timing and len(rows) == 1 else None
        reply = Reply(self.settings.model_id, plans[0], chat)
        return reply.full(choices, prompt_tokens, completion_tokens, extra)

    def _check_prompt_length(self, prompt: str, param: str) -> None:
        prompt_tokens = len(self.engine.tokenizer(prompt)["input_ids"])
        if prompt_tokens > self.settings.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens, more than this server's limit of "
                f"{self.settings.max_prompt_tokens}; shorten it",
                param=param,
                code="context_length_exceeded",
            )

    def _stream(self, body, rows, chat, release, echo, timing) -> StreamingResponse:
        """Stream every row through the batcher, alongside other requests' rows (each
        row's first chunk names its plan once its batch routed it)."""
        loop = asyncio.get_running_loop()
        streams = [RowStream(loop) for _ in rows]
        sources = [
            self.batcher.stream(prompt, merge, options, stream)
            for (prompt, merge, options), stream in zip(rows, streams)
        ]
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = stream_events(
            sources,
            streams,
            self.engine.bank.describe_plan,
            self.metrics,
            self.settings.request_timeout_s,
            body.stop_strings,
            Reply(self.settings.model_id, {}, chat),
            include_usage,
            release,
            timing=timing,
            prompt_counted=[i % body.n == 0 for i in range(len(rows))],
            echoes=[prompt for prompt, _, _ in rows] if echo else None,
        )
        return StreamingResponse(events, media_type="text/event-stream")


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def release() -> None:
        first()
        second()

    return release


class _RawMiddleware:
    """Adapts a plain ``app → app`` ASGI wrapper to Starlette's middleware stack."""

    def __init__(self, app, wrap):
        self.app = wrap(app)

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def _max_new_tokens(requested: int | None, settings: ServerSettings) -> int:
    if requested is None:
        return settings.default_max_tokens
    if requested > settings.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens={requested} exceeds this server's limit of {settings.max_tokens_limit}",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    return requested


def _check_model(model: str | None, settings: ServerSettings) -> None:
    if model is not None and model != settings.model_id:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {settings.model_id!r}",
            param="model",
            code="model_not_found",
        )


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


def _merge_for(engine: TTMM, control: TTMMControl | None, query: str, param: str) -> MergeRequest:
    """The merge a request asked for: explicit experts, the base model, or routing ``query``."""
    if control is not None and control.base:
        return MergeRequest(plan=RoutingPlan.base())
    if control is not None and control.experts is not None:
        try:
            plan = RoutingPlan.explicit(control.experts)
            engine.merger.check_plan(plan)
        except (RoutingError, MergeError) as err:
            raise APIError(400, str(err), param="ttmm.experts", code="invalid_experts") from None
        return MergeRequest(plan=plan)
    routing = engine.routing
    if control is not None and control.routing is not None:
        try:
            routing = engine.routing_for(**control.routing.model_dump())
        except RoutingError as err:
            raise APIError(400, str(err), param="ttmm.routing") from None
    if not query.strip():
        raise APIError(400, f"{param} is blank: routing needs some text to embed", param=param)
    return MergeRequest(query=query, routing=routing)


async def _resolve(engine: TTMM, merge: MergeRequest) -> RoutingPlan:
    """The plan of a merge request, routing its query now (outside any batch)."""
    if merge.plan is not None:
        return merge.plan
    [plan] = await asyncio.to_thread(engine.route, [merge.query], merge.routing)
    return plan
