"""Completion requests: limits, the merge of each row (routed, steered, or a rollout arm's),
then a batched or streamed generation; the service behind ``/v1/completions`` and
``/v1/chat/completions``.

With a rollout (:mod:`ttmm.serve.rollout`), a request that does not steer its own merge is
given an arm, runs on that arm's engine and merge, says which arm served it (``ttmm.arm``),
and is measured when it ends: latency, errors and the NLL of its prompt after the routing
prefix, computed from the prefill.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from ttmm.merge import MergeError
from ttmm.model import TTMM
from ttmm.routing import RoutingError, RoutingPlan
from ttmm.serve.batching import Batcher, GenerationOptions, MergeRequest, Served
from ttmm.serve.errors import APIError, timeout_error
from ttmm.serve.limits import Slots, request_slots
from ttmm.serve.metrics import ServerMetrics
from ttmm.serve.responses import (
    Choice,
    Reply,
    chat_logprobs,
    completion_logprobs,
    completion_shape,
    echoed_logprobs,
    prompt_rows,
    stream_events,
)
from ttmm.serve.rollout.service import Assigned, RolloutService
from ttmm.serve.schemas import GenerationRequest, TTMMControl
from ttmm.serve.settings import ServerSettings
from ttmm.serve.streaming import RowStream, cut_at_stop

logger = logging.getLogger(__name__)

"""Most choices (prompts × n) one request may ask for."""


@dataclass(frozen=True)
class Row:
    """One prompt × sample of a request, as the batcher runs it."""

    prompt: str
    merge: MergeRequest
    options: GenerationOptions
    extra: dict = field(default_factory=dict)
    """The row's batcher options: a rollout row's engine, scored prefix and shadow merge;
    an echoed row's prompt log-probabilities."""


@dataclass
class Plan:
    """A request's rows, how its plans are described, and its place in a rollout."""

    rows: list[Row]
    describe: Callable[[RoutingPlan], dict]
    assigned: Assigned | None = None
    start: float = field(default_factory=time.perf_counter)


class Completions:
    """Serves completion requests: limits, routing, then a batched or streamed generation."""

    def __init__(
        self,
        engine: TTMM,
        settings: ServerSettings,
        metrics: ServerMetrics,
        rollout: RolloutService | None = None,
    ):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.rollout = rollout
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
        key: str | None = None,
    ):
        """Check limits, route each of ``queries``, then generate ``n`` choices from each of
        ``prompts`` (batched, streamed or not). ``key`` is the request's sticky key for a
        rollout's assignment."""
        settings = self.settings
        check_model(body.model, settings)
        echo = getattr(body, "echo", False)
        scored = body.logprob_count
        max_new = max_new_tokens(max_tokens, settings)
        for prompt in prompts:
            self._check_prompt_length(prompt, param)
        n, seed = body.n, body.seed
        options = [  # sample j of a seeded request draws with seed + j: n different samples
            GenerationOptions.from_request(
                max_new, body.temperature, body.top_p, None if seed is None else (seed + j) % 2**64
            )
            for j in range(n)
        ]
        plan = await self._plan(body.ttmm, prompts, queries, options, param, key)
        if echo and scored is not None:  # the prompt's tokens are listed too, from the prefill
            for row in plan.rows:
                row.extra["prompt_logprobs"] = scored
        timing = body.ttmm is not None and body.ttmm.timing
        release = self.slots.take()
        try:
            if body.stream:
                release = _both(release, self.streams.take())
                response = self._stream(body, plan, chat, release, echo, timing)
                release = None  # the stream releases its slots when it ends
                return response
            submitted = (
                self.batcher.submit(r.prompt, r.merge, r.options, scored, **r.extra)
                for r in plan.rows
            )
            try:
                served = await asyncio.wait_for(
                    asyncio.gather(*submitted), settings.request_timeout_s
                )
            except TimeoutError:
                await self._finish(plan, [], error=True)
                raise timeout_error(settings.request_timeout_s) from None
            except Exception:
                await self._finish(plan, [], error=True)
                raise
        finally:
            if release is not None:
                release()
        response = self._whole(body, plan, served, chat, echo, timing)
        await self._finish(plan, served, body.n, response_id=response["id"])
        return response

    async def _plan(self, control, prompts, queries, options, param, key) -> Plan:
        """The rows of a request: a rollout arm's merges, unless the request steers its own
        merge (``ttmm.base``, ``ttmm.experts`` or ``ttmm.routing``: served on the
        candidate's bank and kept out of the rollout's evidence)."""
        steered = control is not None and (
            control.base or control.experts is not None or control.routing is not None
        )
        if self.rollout is None or steered:
            engine = self.rollout.arms.engine if self.rollout is not None else self.engine
            merges = [merge_for(engine, control, query, param) for query in queries]
            rows = [
                Row(p, m, o, {"engine": engine}) for p, m in zip(prompts, merges) for o in options
            ]
            return Plan(rows, engine.bank.describe_plan)
        for query in queries:
            if not query.strip():
                raise APIError(400, f"{param} is blank: routing needs some text", param=param)
        assigned = await self.rollout.assign(key)
        offsets = [self._routed_offset(p, q) for p, q in zip(prompts, queries)]
        extras = self.rollout.rows(assigned, queries, offsets)
        rows = [
            Row(p, extra.pop("merge"), o, extra)
            for p, extra in zip(prompts, extras)
            for o in options
        ]
        return Plan(rows, lambda plan: assigned.arms.describe(assigned.arm, plan), assigned)

    def _routed_offset(self, prompt: str, query: str) -> int:
        """Tokens of ``prompt`` (as generate tokenises it) before the text it was routed on:
        a chat template's turns before the last user message, a tokenizer's BOS. The online
        quality scores what follows that text's routing prefix, never the prefix itself."""
        at = max(prompt.rfind(query), 0) if query else 0
        return len(self.engine.tokenizer(prompt[:at])["input_ids"])

    async def _finish(
        self,
        plan: Plan,
        served: list[Served],
        n: int = 1,
        error: bool = False,
        response_id: str | None = None,
    ) -> None:
        """Count a finished rollout request (nothing without one), off the event loop (the
        state is written to disk, or sent to the Ray actor). A failure to record loses the
        record, never the answer."""
        if plan.assigned is None:
            return
        latency = time.perf_counter() - plan.start
        try:
            await asyncio.to_thread(
                self.rollout.finish, plan.assigned, served, latency, n, error, response_id
            )
        except Exception:
            logger.exception("could not record a rollout request")

    def _whole(self, body, plan: Plan, served, chat, echo, timing) -> dict:
        """The response to a non-streamed request, from its rows' results."""
        rows = plan.rows
        tokenizer, several = self.engine.tokenizer, len(rows) > body.n
        plans = [plan.describe(s.generation.plan) for s in served]
        choices = []
        for row, s, described in zip(rows, served, plans):
            result = s.generation
            self.metrics.observe_timing(s.timing)
            text, stopped = cut_at_stop(result.text, body.stop_strings)
            logprobs = None
            if body.logprob_count is not None and chat:
                logprobs = chat_logprobs(tokenizer, result, len(text), body.logprob_count)
            elif body.logprob_count is not None and echo:
                logprobs = echoed_logprobs(tokenizer, row.prompt, result, len(text))
            elif body.logprob_count is not None:
                logprobs = completion_logprobs(tokenizer, result, len(text), 0)
            own = described | {"timing": s.timing.to_dict()} if timing else described
            choices.append(
                Choice(
                    row.prompt + text if echo else text,
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

    def _prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens as generation tokenises it (padding aside)."""
        return self.engine.tokenizer(prompt)["input_ids"]

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

    def _stream(self, body, plan: Plan, chat, release, echo, timing) -> StreamingResponse:
        """Stream every row through the batcher, alongside other requests' rows (each
        row's first chunk names its plan once its batch routed it)."""
        loop = asyncio.get_running_loop()
        rows = plan.rows
        streams = [RowStream(loop) for _ in rows]
        sources = [
            self.batcher.stream(
                row.prompt,
                row.merge,
                row.options,
                stream,
                top_logprobs=body.logprob_count,
                **row.extra,
            )  # fmt: skip
            for row, stream in zip(rows, streams)
        ]
        reply = Reply(self.settings.model_id, {}, chat)
        if plan.assigned is not None:
            sources, release = self._measured(plan, sources, release, reply, body.n)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = stream_events(
            sources,
            streams,
            plan.describe,
            self.metrics,
            self.settings.request_timeout_s,
            body.stop_strings,
            reply,
            include_usage,
            release,
            timing=timing,
            prompt_counted=[i % body.n == 0 for i in range(len(rows))],
            echoes=[row.prompt for row in rows] if echo else None,
            logprobs=body.logprob_count,
            echo_logprobs=lambda i, scores: completion_shape(
                prompt_rows(self.engine.tokenizer, self._prompt_ids(rows[i].prompt), scores)
            ),
        )
        return StreamingResponse(events, media_type="text/event-stream")

    def _measured(self, plan: Plan, sources, release, reply: Reply, n: int):
        """``sources`` that keep each row's :class:`Served` (and note a failure), and a
        ``release`` that also counts the request in the rollout when the stream ends: an
        error if a row failed or outlived the time limit, nothing if the client left."""
        served: dict[int, Served] = {}
        failed = []

        async def keep(index: int, source: AsyncIterator) -> AsyncIterator:
            try:
                async for item in source:
                    if isinstance(item, Served):
                        served[index] = item
                    yield item
            except Exception:
                failed.append(index)
                raise

        def finish() -> None:
            release()
            late = time.perf_counter() - plan.start >= self.settings.request_timeout_s
            if not failed and not late and len(served) < len(plan.rows):
                return  # the client went away: no outcome to judge the arm by
            rows = [served[i] for i in sorted(served)]
            error = bool(failed) or late
            asyncio.ensure_future(self._finish(plan, rows, n, error, reply.response_id))

        return [keep(i, source) for i, source in enumerate(sources)], finish


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def release() -> None:
        first()
        second()

    return release


def max_new_tokens(requested: int | None, settings: ServerSettings) -> int:
    """New tokens to generate for a request's ``max_tokens`` (400 past the server's limit)."""
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


def check_model(model: str | None, settings: ServerSettings) -> None:
    if model is not None and model != settings.model_id:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {settings.model_id!r}",
            param="model",
            code="model_not_found",
        )


def merge_for(engine: TTMM, control: TTMMControl | None, query: str, param: str) -> MergeRequest:
    """The merge a request asked for: explicit experts, the base model, or routing ``query``."""
    if control is not None and control.base:
        return MergeRequest(plan=RoutingPlan.base())
    if control is not None and control.experts is not None:
        return MergeRequest(plan=explicit_plan(engine, control.experts, "ttmm.experts"))
    routing = engine.routing
    if control is not None and control.routing is not None:
        try:
            routing = engine.routing_for(**control.routing.model_dump())
        except RoutingError as err:
            raise APIError(400, str(err), param="ttmm.routing") from None
    if not query.strip():
        raise APIError(400, f"{param} is blank: routing needs some text to embed", param=param)
    return MergeRequest(query=query, routing=routing)


async def resolve_merge(engine: TTMM, merge: MergeRequest) -> RoutingPlan:
    """The plan of a merge request, routing its query now (outside any batch)."""
    if merge.plan is not None:
        return merge.plan
    [plan] = await asyncio.to_thread(engine.route, [merge.query], merge.routing)
    return plan


def explicit_plan(engine: TTMM, experts: dict[int, float], param: str) -> RoutingPlan:
    """The plan merging ``experts`` (id: weight) of the engine's bank: 404 for an id the bank
    does not have (a rollout's control adapters sit beyond its K ids), 400 for bad weights."""
    K = engine.bank.num_experts
    unknown = sorted(k for k in experts if not 0 <= k < K)
    if unknown:
        raise APIError(
            404,
            f"unknown expert id(s) {unknown}; the bank has experts 0..{K - 1}",
            type="not_found_error",
            param=param,
            code="expert_not_found",
        )
    try:
        plan = RoutingPlan.explicit(experts)
        engine.merger.check_plan(plan)
    except (RoutingError, MergeError) as err:
        raise APIError(400, str(err), param=param, code="invalid_experts") from None
    return plan
