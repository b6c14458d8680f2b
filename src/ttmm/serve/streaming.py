"""Streaming one generation token by token, and cutting text at stop strings.

transformers' streamers take a batch of one row, so a streamed request runs alone: the
engine applies its merge (folded, under the engine lock) in a worker thread while the
decoded text flows back to the event loop through an asyncio queue. Setting the cancel
event (client gone, timeout) stops generation after the current token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from ttmm.generation import cut_at_eos, decode
from ttmm.model import TTMM
from ttmm.routing import RoutingPlan
from ttmm.serve.batching import GenerationOptions


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


@dataclass
class StreamResult:
    """Counts known once a stream has ended."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"


class _QueueStreamer(TextStreamer):
    """Pushes each finalised piece of text into an asyncio queue from the generating thread."""

    def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop, self.queue = loop, queue
        self.token_ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.token_ids.extend(value.flatten().tolist())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.send(text)

    def send(self, item: object) -> None:
        """Hand an item to the event loop, unless the loop is gone (the client left)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # event loop closed: nobody is listening any more
            pass


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


_END = object()


async def stream_generation(
    engine: TTMM,
    prompt: str,
    plan: RoutingPlan,
    options: GenerationOptions,
    result: StreamResult,
    cancel: threading.Event,
) -> AsyncIterator[str]:
    """Yield the continuation of ``prompt`` piece by piece; ``result`` is filled at the end."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tokenizer = engine.tokenizer
    batch = tokenizer([prompt], return_tensors="pt").to(engine.device)
    result.prompt_tokens = int(batch["input_ids"].shape[1])
    streamer = _QueueStreamer(tokenizer, loop, queue)

    def generate() -> None:
        outcome: object = _END
        try:
            with torch.no_grad(), engine.merged([plan], mode="auto"):
                decode(
                    engine.model,
                    tokenizer,
                    batch,
                    options.max_new_tokens,
                    options.sampling,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                )
        except Exception as err:  # handed to the event loop, raised there
            outcome = err
        finally:
            streamer.send(outcome)

    worker = threading.Thread(target=generate, name="ttmm-stream", daemon=True)
    worker.start()
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancel.set()
    tokens, result.finish_reason = cut_at_eos(streamer.token_ids, tokenizer.eos_token_id)
    result.completion_tokens = len(tokens)
