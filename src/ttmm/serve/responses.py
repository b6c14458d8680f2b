"""OpenAI response bodies, whole or as server-sent event chunks, with the routing used.

Every body carries a top-level ``ttmm`` field: the plan that ran (rule, fallback, and each
expert's id, label, weight and similarity), and the request's timing when it asked for it.
A stream sends it in its first chunk and in each choice's last. Log-probabilities follow
OpenAI's two shapes: ``{tokens, token_logprobs, top_logprobs, text_offset}`` for
completions, ``{content: [{token, logprob, bytes, top_logprobs}]}`` for chat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from ttmm.generation import TokenLogprobs
from ttmm.model import Generation
from ttmm.routing import RoutingPlan
from ttmm.serve.batching import Served
from ttmm.serve.errors import server_error, timeout_error
from ttmm.serve.metrics import ServerMetrics
from ttmm.serve.streaming import PromptLogprobs, RowStream, StopScanner, TokenLogprob

logger = logging.getLogger(__name__)

SSE_EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}
"""One server-sent event as clients parse it: its ``data`` line holds a JSON chunk (and the
last one ``[DONE]``)."""
STREAMED = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events of chunks.",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    }
}
"""The OpenAPI answer of an endpoint that streams when asked."""


@dataclass(frozen=True)
class Choice:
    """One finished choice of a whole (non-streamed) response."""

    text: str
    finish: str
    logprobs: dict | None = None
    ttmm: dict | None = None
    """The choice's own plan, when a request's prompts were routed apart."""


@dataclass
class Reply:
    """Builds OpenAI response bodies (whole or chunked) for one request."""

    model_id: str
    plan: dict
    """The plan that ran, as :meth:`ttmm.bank.Bank.describe_plan` writes it."""
    chat: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        """The ``id`` every body of this reply carries (OpenAI's prefixes)."""
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id

    def _head(self, obj: str) -> dict:
        return {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model_id,
        }

    def full(
        self,
        choices: Sequence[Choice],
        prompt_tokens: int,
        completion_tokens: int,
        extra: dict | None = None,
    ) -> dict:
        """The whole response; ``extra`` joins the top-level ``ttmm`` field (timing)."""
        bodies = []
        for index, c in enumerate(choices):
            if self.chat:
                message = {"role": "assistant", "content": c.text}
                body = {"index": index, "message": message, "logprobs": c.logprobs}
            else:
                body = {"index": index, "text": c.text, "logprobs": c.logprobs}
            body["finish_reason"] = c.finish
            bodies.append(body | ({"ttmm": c.ttmm} if c.ttmm is not None else {}))
        return {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": bodies,
            "usage": _usage(prompt_tokens, completion_tokens),
            "ttmm": self.plan | (extra or {}),
        }

    def chunk(
        self,
        text: str | None,
        finish: str | None = None,
        first: bool = False,
        index: int = 0,
        extra: dict | None = None,
        plan: dict | None = None,
        logprobs: dict | None = None,
    ) -> dict:
        """A chunk of choice ``index``; the first and last carry ``plan`` (or the reply's)
        and ``extra`` in their ``ttmm`` field; ``logprobs``: its tokens' (streamed)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {
                "index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish,
            }  # fmt: skip
        body = {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [choice],
        }
        if first or finish is not None:
            body["ttmm"] = (plan or self.plan) | (extra or {})
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [],
            "usage": _usage(prompt_tokens, completion_tokens),
        }


def _scored_tokens(tokenizer, generation: Generation, text_len: int):
    """(token text, log-probability, [(top token text, log-probability)]) of each token
    whose text starts within the first ``text_len`` characters (the rest were cut by a
    stop string), and the offset of each token in the text."""
    lp = generation.logprobs
    offset, rows = 0, []
    for step, token in enumerate(generation.token_ids):
        if offset >= text_len and step > 0:
            break
        piece = tokenizer.decode([token], skip_special_tokens=True)
        top = zip(lp.top_ids[0, step].tolist(), lp.top_logprobs[0, step].tolist())
        top = [(tokenizer.decode([t]), v) for t, v in top]
        rows.append((piece, float(lp.chosen[0, step]), top, offset))
        offset += len(piece)
    return rows if text_len else []


def completion_logprobs(tokenizer, generation: Generation, text_len: int, start: int) -> dict:
    """Completions' shape; ``start`` is where the completion begins in the returned text."""
    return completion_shape(_scored_tokens(tokenizer, generation, text_len), start)


def prompt_rows(tokenizer, prompt_ids: Sequence[int], scores: TokenLogprobs) -> list:
    """(piece, logprob, top, offset) of each prompt token, as an echoed completion lists
    them: the first token has no context, so no log-probability and no alternatives (null,
    as OpenAI and vLLM write it); ``scores`` holds the rest's (``prompt_logprobs``)."""
    rows, offset = [], 0
    for step, token in enumerate(prompt_ids):
        piece = tokenizer.decode([token], skip_special_tokens=True)
        if step == 0:
            rows.append((piece, None, None, offset))
        else:
            at = step - 1  # scores start at the second token
            top = zip(scores.top_ids[0, at].tolist(), scores.top_logprobs[0, at].tolist())
            value = float(scores.chosen[0, at])
            rows.append((piece, value, [(tokenizer.decode([t]), v) for t, v in top], offset))
        offset += len(piece)
    return rows


def echoed_logprobs(tokenizer, prompt: str, generation: Generation, text_len: int) -> dict:
    """Completions' logprobs of an echoed choice: the prompt's tokens, then the completion's
    (offsets into ``prompt`` + completion text)."""
    head = prompt_rows(tokenizer, generation.prompt_ids, generation.prompt_logprobs)
    tail = _scored_tokens(tokenizer, generation, text_len)
    return completion_shape(head + _shifted(tail, len(prompt)))


def _shifted(rows: list, by: int) -> list:
    return [(piece, value, top, offset + by) for piece, value, top, offset in rows]


def completion_shape(rows, start: int = 0) -> dict:
    """Completions' logprobs of ``rows`` (piece, logprob, top, offset)."""
    return {
        "tokens": [piece for piece, *_ in rows],
        "token_logprobs": [value for _, value, *_ in rows],
        "top_logprobs": [None if top is None else dict(top) for _, _, top, _ in rows],
        "text_offset": [start + offset for *_, offset in rows],
    }


def chat_logprobs(tokenizer, generation: Generation, text_len: int, k: int) -> dict:
    """Chat's shape: one entry per token with its ``k`` most likely alternatives."""
    return chat_shape(_scored_tokens(tokenizer, generation, text_len), k)


def chat_shape(rows, k: int) -> dict:
    """Chat's logprobs of ``rows`` (piece, logprob, top, offset)."""

    def entry(piece: str, value: float) -> dict:
        return {"token": piece, "logprob": value, "bytes": list(piece.encode())}

    return {
        "content": [
            entry(piece, value) | {"top_logprobs": [entry(t, v) for t, v in top[:k]]}
            for piece, value, top, _ in rows
        ],
        "refusal": None,
    }


async def stream_events(
    sources: Sequence[AsyncIterator[RoutingPlan | str | Served]],
    rows: Sequence[RowStream],
    describe: Callable[[RoutingPlan], dict],
    metrics: ServerMetrics,
    timeout_s: float,
    stops: list[str],
    reply: Reply,
    include_usage: bool,
    release: Callable[[], None],
    timing: bool = False,
    prompt_counted: Sequence[bool] = (True,),
    echoes: Sequence[str] | None = None,
    logprobs: int | None = None,
    echo_logprobs: Callable[[int, TokenLogprobs], dict] | None = None,
) -> AsyncIterator[str]:
    """Server-sent events of streamed choices (choice ``i`` from ``sources[i]``, which
    yields its plan, text pieces, then its :class:`Served`), ending with ``data: [DONE]``.
    ``describe`` writes a plan for the ``ttmm`` field.
    ``prompt_counted[i]``: whether choice i's prompt tokens count in the usage (once per
    prompt, not per sample); ``echoes[i]``: text sent before choice i's (its prompt).
    ``logprobs`` (k): each chunk carries the log-probabilities of the tokens whose text
    starts in what has been sent, as the non-streamed answer would list them; with
    ``echoes`` too, the echo waits for the row's :class:`PromptLogprobs` and carries
    ``echo_logprobs(i, scores)`` (its prompt tokens'), and offsets count the echo."""
    timed_out = threading.Event()
    merged: asyncio.Queue = asyncio.Queue()
    scanners = [StopScanner(stops) for _ in sources]
    plans: dict[int, dict] = {}
    tokens = [_StreamedTokens() for _ in sources]

    def shaped(index: int, text: str) -> dict | None:
        rows = tokens[index].take(text)  # the tokens whose text starts in what is sent now
        if logprobs is None:
            return None
        if reply.chat:
            return chat_shape(rows, logprobs)
        return completion_shape(rows, len(echoes[index]) if echoes else 0)

    scored_echo = echoes is not None and logprobs is not None and echo_logprobs is not None
    echoed: set[int] = set()

    def echo(index: int, scores: TokenLogprobs | None = None) -> str:
        echoed.add(index)
        shape = echo_logprobs(index, scores) if scores is not None else None
        return _sse(reply.chunk(echoes[index], index=index, logprobs=shape))

    def expire() -> None:
        timed_out.set()
        for row in rows:
            row.cancel.set()

    async def pump(index: int, source: AsyncIterator) -> None:
        try:
            async for item in source:
                await merged.put((index, item))
        except Exception as err:
            await merged.put((index, err))

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    pumps = [asyncio.ensure_future(pump(i, source)) for i, source in enumerate(sources)]
    try:
        prompt_tokens = completion_tokens = 0
        for _ in sources:
            while not isinstance((item := await merged.get())[1], Served | Exception):
                index, piece = item
                if isinstance(piece, RoutingPlan):
                    if index not in plans:  # not again when a failed batch is re-run
                        plans[index] = describe(piece)
                        yield _sse(reply.chunk(None, first=True, index=index, plan=plans[index]))
                        if echoes and not scored_echo:
                            yield echo(index)
                    continue
                if isinstance(piece, PromptLogprobs):
                    if scored_echo and index not in echoed:
                        yield echo(index, piece.scores)
                    continue
                if isinstance(piece, TokenLogprob):
                    tokens[index].add(piece)
                    continue
                if text := scanners[index].feed(piece):
                    yield _sse(reply.chunk(text, index=index, logprobs=shaped(index, text)))
                if scanners[index].stopped:
                    rows[index].cancel.set()  # the rest would be dropped: stop the row
            index, served = item
            if isinstance(served, Exception):
                raise served
            if scored_echo and index not in echoed:  # no prompt scores came: echo without
                yield echo(index)
            if timed_out.is_set() and not scanners[index].stopped:
                yield _sse({"error": timeout_error(timeout_s).body()})
                break
            result = served.generation
            metrics.observe_timing(served.timing)
            if rest := scanners[index].flush():
                yield _sse(reply.chunk(rest, index=index, logprobs=shaped(index, rest)))
            finish = "stop" if scanners[index].stopped else result.finish_reason
            extra = {"timing": served.timing.to_dict()} if timing else None
            last = reply.chunk(None, finish=finish, index=index, extra=extra, plan=plans.get(index))
            yield _sse(last)
            prompt_tokens += result.prompt_tokens if prompt_counted[index] else 0
            completion_tokens += result.completion_tokens
        else:
            metrics.observe_tokens(prompt_tokens, completion_tokens)
            if include_usage:
                yield _sse(reply.usage_chunk(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    except Exception:
        logger.exception("stream failed")
        yield _sse({"error": server_error("generation failed; see the server log").body()})
        yield "data: [DONE]\n\n"
    finally:
        timer.cancel()
        for row in rows:
            row.cancel.set()
        for task in pumps:
            task.cancel()
        release()


@dataclass
class _StreamedTokens:
    """A streamed choice's tokens with their log-probabilities, and how much of its text was
    sent: a chunk lists the tokens whose text starts before its end."""

    rows: list = field(default_factory=list)  # (piece, logprob, top, offset)
    length: int = 0  # characters of all tokens' pieces
    sent: int = 0
    taken: int = 0

    def add(self, token: TokenLogprob) -> None:
        self.rows.append((token.piece, token.logprob, token.top, self.length))
        self.length += len(token.piece)

    def take(self, text: str) -> list:
        """The tokens not yet taken whose text starts before the end of ``text``, sent now."""
        self.sent += len(text)
        ready = [r for r in self.rows[self.taken :] if r[3] < self.sent]
        self.taken += len(ready)
        return ready


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
