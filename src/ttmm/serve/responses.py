"""OpenAI response bodies, whole or as server-sent event chunks, with the routing used.

Every body carries a top-level ``ttmm`` field: the plan that ran (rule, fallback, and each
expert's id, label, weight and similarity). A stream sends it in its first and last chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ttmm.model import TTMM
from ttmm.routing import RoutingPlan
from ttmm.serve.batching import GenerationOptions
from ttmm.serve.errors import server_error, timeout_error
from ttmm.serve.metrics import ServerMetrics
from ttmm.serve.streaming import StopScanner, StreamResult, stream_generation

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    """Builds OpenAI response bodies (whole or chunked) for one request."""

    model_id: str
    plan: dict
    """The plan that ran, as :meth:`ttmm.bank.Bank.describe_plan` writes it."""
    chat: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, obj: str) -> dict:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {
            "id": prefix + self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_id,
        }

    def full(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": _usage(prompt_tokens, completion_tokens),
            "ttmm": self.plan,
        }

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [choice],
        }
        if first or finish is not None:
            body["ttmm"] = self.plan
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [],
            "usage": _usage(prompt_tokens, completion_tokens),
        }


async def stream_events(
    engine: TTMM,
    metrics: ServerMetrics,
    timeout_s: float,
    prompt: str,
    plan: RoutingPlan,
    options: GenerationOptions,
    stops: list[str],
    reply: Reply,
    include_usage: bool,
    release: Callable[[], None],
) -> AsyncIterator[str]:
    """Server-sent events of one streamed generation, ending with ``data: [DONE]``."""
    cancel, timed_out = threading.Event(), threading.Event()
    result = StreamResult()
    scanner = StopScanner(stops)
    metrics.observe_rows([plan])

    def expire() -> None:
        timed_out.set()
        cancel.set()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        yield _sse(reply.chunk(None, first=True))
        pieces = stream_generation(engine, prompt, plan, options, result, cancel)
        try:
            async for piece in pieces:
                if text := scanner.feed(piece):
                    yield _sse(reply.chunk(text))
                if scanner.stopped:
                    break
        finally:
            await pieces.aclose()
        if timed_out.is_set() and not scanner.stopped:
            yield _sse({"error": timeout_error(timeout_s).body()})
        else:
            if rest := scanner.flush():
                yield _sse(reply.chunk(rest))
            finish = "stop" if scanner.stopped else result.finish_reason
            yield _sse(reply.chunk(None, finish=finish))
            metrics.observe_tokens(result.prompt_tokens, result.completion_tokens)
            if include_usage:
                yield _sse(reply.usage_chunk(result.prompt_tokens, result.completion_tokens))
        yield "data: [DONE]\n\n"
    except Exception:
        logger.exception("stream failed")
        yield _sse({"error": server_error("generation failed; see the server log").body()})
        yield "data: [DONE]\n\n"
    finally:
        timer.cancel()
        cancel.set()
        release()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
