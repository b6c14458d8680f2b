"""Streaming rows of a batch token by token, and cutting text at stop strings.

Streamed and non-streamed requests share ``engine.generate`` batches (see
:mod:`ttmm.serve.batching`). One :class:`BatchStreamer` watches a whole batch: transformers
hands it every step's new tokens for all rows; it decodes each streaming row incrementally
and hands the row's new text to that row's asyncio queue (holding back a trailing
incomplete character), and it notes when the prompt went in, the first new token came out
and each row ended, for the per-request timing. :class:`RowsCancelled` stops a row whose
client left or timed out; the batch stops early only once every row is done or cancelled.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ttmm.generation import TokenLogprobs


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopScanner:
    """Feeds streamed text through, holding back a tail that could start a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to send now; after a stop string is seen, nothing more."""
        if self.stopped:
            return ""
        self._pending += text
        kept, self.stopped = cut_at_stop(self._pending, self.stops)
        if self.stopped:
            self._pending = ""
            return kept
        split = max(len(self._pending) - self._hold, 0)
        ready, self._pending = self._pending[:split], self._pending[split:]
        return ready

    def flush(self) -> str:
        rest, self._pending = ("" if self.stopped else self._pending), ""
        return rest


END = object()
"""The last item of a row's queue."""


@dataclass
class RowStream:
    """Where one streamed row's text goes: an asyncio queue on the server's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set when the client left or timed out: the row stops after the current token."""
    sent: int = 0
    """Characters handed over so far (a batch that is re-run sends only what is new)."""

    def send(self, item: object) -> None:
        """Hand an item to the event loop (from any thread), unless the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # event loop closed: nobody is listening any more
            pass

    def offer(self, text: str, final: bool) -> None:
        """Send the part of the row's ``text`` so far that is new; hold back a trailing
        replacement character (half of a multi-byte character) unless ``final``."""
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > self.sent:
            self.send(text[self.sent :])
            self.sent = len(text)


@dataclass(frozen=True)
class TokenLogprob:
    """A streamed token's text, log-probability and most likely alternatives (text, value)."""

    piece: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class PromptLogprobs:
    """A streamed row's prompt-token log-probabilities (sent before its first new token)."""

    scores: TokenLogprobs
    """(1, prompt tokens − 1[, k]): see :func:`ttmm.generation.prompt_logprobs`."""


class StepLogprobs(LogitsProcessor):
    """Keeps each decoding step's log-probabilities, from the raw logits (it runs before
    temperature and top-p, as ``output_logits`` sees them), for the streamer to read once the
    step's tokens are chosen."""

    def __init__(self) -> None:
        self.latest: torch.Tensor | None = None  # (batch, vocab)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.latest = torch.log_softmax(scores.float(), dim=-1)
        return scores


class BatchStreamer(BaseStreamer):
    """Receives a batch's tokens step by step: streams rows' text (and, for rows that ask,
    each token's log-probabilities as a :class:`TokenLogprob` before its text), times every
    row."""

    def __init__(
        self,
        tokenizer,
        streams: Sequence[RowStream | None],
        clock: Callable[[], float] = time.perf_counter,
        logprobs: StepLogprobs | None = None,
        top_k: Sequence[int | None] = (),
        prompt_k: Sequence[int | None] = (),
    ):
        self.tokenizer, self.streams, self.clock = tokenizer, list(streams), clock
        self.logprobs, self.top_k = logprobs, list(top_k) or [None] * len(self.streams)
        self.prompt_k = list(prompt_k) or [None] * len(self.streams)
        rows = len(self.streams)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self._settled: list[tuple[int, str]] = [(0, "")] * rows
        """Per row: tokens whose text is settled (up to a line end) and that text, so each
        step decodes only the tokens of the current line."""
        self.done = [False] * rows
        self.prompt_at: float | None = None
        """When the prompt went in (the merge is in place by then)."""
        self.first_token_at: float | None = None
        self.ended_at: list[float | None] = [None] * rows

    def put(self, value: torch.Tensor) -> None:
        now = self.clock()
        if self.prompt_at is None:  # the first call carries the prompts
            self.prompt_at = now
            return
        if self.first_token_at is None:
            self.first_token_at = now
        eos = self.tokenizer.eos_token_id
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            if token == eos:
                self.done[i], self.ended_at[i] = True, now
                continue
            self.tokens[i].append(token)
            if self.streams[i] is not None:
                if self.logprobs is not None and self.top_k[i] is not None:
                    self.streams[i].send(self._token_logprob(i, token))
                self.streams[i].offer(self._text(i), final=False)

    def prompt_scored(self, rows: Sequence[TokenLogprobs]) -> None:
        """The prefill's prompt log-probabilities, one per row: sent to the rows that asked
        (an echoed stream lists them with its prompt), cut to each row's k alternatives."""
        for stream, k, scores in zip(self.streams, self.prompt_k, rows):
            if stream is not None and k is not None:
                top_ids, top_values = scores.top_ids[..., :k], scores.top_logprobs[..., :k]
                stream.send(PromptLogprobs(TokenLogprobs(scores.chosen, top_ids, top_values)))

    def end(self) -> None:
        now = self.clock()
        self.first_token_at = self.first_token_at or now
        for i, stream in enumerate(self.streams):
            self.ended_at[i] = self.ended_at[i] or now
            if stream is not None:
                stream.offer(self._text(i), final=True)

    def _token_logprob(self, i: int, token: int) -> TokenLogprob:
        row = self.logprobs.latest[i]  # (vocab,) of the step that chose ``token``
        top = row.topk(self.top_k[i])
        decode = self.tokenizer.decode
        return TokenLogprob(
            decode([token], skip_special_tokens=True),
            float(row[token]),
            [(decode([t]), float(v)) for t, v in zip(top.indices.tolist(), top.values.tolist())],
        )

    def _text(self, i: int) -> str:
        """Row i's text so far (as one decode of all its tokens would give it)."""
        cut, settled = self._settled[i]
        line = self.tokenizer.decode(self.tokens[i][cut:], skip_special_tokens=True)
        if line.endswith("\n"):
            self._settled[i] = (len(self.tokens[i]), settled + line)
        return settled + line


class RowsCancelled(StoppingCriteria):
    """Stops each row whose ``cancelled()`` turned true; the others go on."""

    def __init__(self, cancelled: Sequence[Callable[[], bool]]):
        self.cancelled = list(cancelled)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        flags = [check() for check in self.cancelled]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)
