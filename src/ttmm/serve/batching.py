"""Batching concurrent requests into one engine call, and the LRU cache of merges.

Requests that arrive within a short window of each other (or while the previous batch
runs) are collected, at most ``max_batch_size`` at a time, and grouped by the generation
options a batch must share. Each group is routed in one encoder call (rows that asked for
routing; others bring a fixed plan) and generated in one ``engine.generate`` call in which
every row carries its own plan: the engine folds a merge that all rows share (one lone
request included) and runs different merges side by side in low-rank mode. Routing inside
the batch, not before queueing, keeps requests that arrive together in one batch.
A sampled request with a seed runs alone, so its draws never depend on its neighbours;
if a batch fails, its rows are retried one by one so that one bad row fails alone. With an
engine whose experts stay on disk (``adapter_cache_mb``), each queued row is routed and its
experts read into the cache while the batch window is open (:func:`_read_ahead`).

:class:`MergeCache` holds each plan's merged factors (A', B' of every adapted layer) by
``plan.key()``, the expert ids and rounded weights, and evicts the least recently used
entries beyond a memory budget; the engine's merger reads it before re-stacking factors.
It serves batches whose rows share one merge (folded, or low-rank with shared factors).
Mixed batches get no cache, on measurement: their low-rank set-up stacks the union of their
experts once per group of layers, which took
8.3 ms for 8 rows with 8 different merges on SmolLM2-135M with 16 experts (r = 8 on
every linear layer), against 196 ms for one decoding step of that batch
(``benchmarks/serve_load.py``, 2026-11-29, one thread, loaded machine): 0.3 % of a
16-token request, while a key (the set of a batch's plans) would rarely repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from transformers import LogitsProcessorList, StoppingCriteriaList

from ttmm.generation import GREEDY, Sampling
from ttmm.merge import PlanFactors
from ttmm.model import TTMM, Generation
from ttmm.routing import RoutingConfig, RoutingPlan
from ttmm.serve.streaming import END, BatchStreamer, RowsCancelled, RowStream, StepLogprobs

logger = logging.getLogger(__name__)


class MergeCache(MutableMapping):
    """Thread-safe LRU map ``plan.key()`` → the plan's merged factors, bounded in bytes."""

    def __init__(
        self,
        max_bytes: int,
        on_hit: Callable[[], None] = lambda: None,
        on_miss: Callable[[], None] = lambda: None,
    ):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[PlanFactors, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_hit, self._on_miss = on_hit, on_miss
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __getitem__(self, key: tuple) -> PlanFactors:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                self._on_miss()
                raise KeyError(key)
            self._entries.move_to_end(key)
            self.hits += 1
            self._on_hit()
            return entry[0]

    def __setitem__(self, key: tuple, factors: PlanFactors) -> None:
        size = sum(merged.nbytes for merged in factors.values())
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return  # larger than the whole budget: never cached
            self._entries[key] = (factors, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def __delitem__(self, key: tuple) -> None:
        with self._lock:
            self._bytes -= self._entries.pop(key)[1]

    def __iter__(self) -> Iterator[tuple]:
        with self._lock:
            return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class GenerationOptions:
    """What one ``engine.generate`` call shares across its rows."""

    max_new_tokens: int
    sampling: Sampling = GREEDY

    @classmethod
    def from_request(
        cls, max_new_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> GenerationOptions:
        return cls(max_new_tokens, Sampling.from_openai(temperature, top_p, seed))

    def generate_kwargs(self) -> dict:
        """Keyword arguments of ``engine.generate`` besides prompts and plans."""
        return {"max_new_tokens": self.max_new_tokens, **dataclasses.asdict(self.sampling)}


class Router(Protocol):
    """What turns routing queries into plans: an engine, or another bank's router."""

    def route(self, texts: Sequence[str], routing: RoutingConfig) -> list[RoutingPlan]: ...


@dataclass(frozen=True)
class MergeRequest:
    """The merge a row asked for: a fixed ``plan``, or routing ``query`` under ``routing``."""

    plan: RoutingPlan | None = None
    query: str | None = None
    routing: RoutingConfig | None = None
    router: Router | None = None
    """What routes ``query``; None: the engine that generates the row."""

    def __post_init__(self) -> None:
        if (self.plan is None) == (self.query is None or self.routing is None):
            raise ValueError("give either a plan, or a query and a routing configuration")


@dataclass(frozen=True)
class Timing:
    """Where one request's seconds went (each stage of its batch, as that row saw it)."""

    route_s: float
    """Embedding the routing query and choosing experts (0 for a fixed plan)."""
    merge_s: float
    """Putting the batch's merges in place (folding, or stacking low-rank factors)."""
    prefill_s: float
    """From the prompt going in to the first new token."""
    decode_s: float
    """From the first new token to the row's last."""

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Served:
    generation: Generation
    timing: Timing
    rows: int = 1
    """Rows of the batch the row ran in (its share of the batch's compute is 1/rows)."""
    shadow_nll: tuple[float, int] | None = None
    """(total NLL, tokens) of the prompt under the row's ``shadow`` merge, if it had one."""
    shadow_s: float = 0.0
    """Seconds the batch spent scoring shadow merges."""


@dataclass
class _Job:
    prompt: str
    merge: MergeRequest
    options: GenerationOptions
    future: asyncio.Future
    stream: RowStream | None = None
    top_logprobs: int | None = None
    engine: TTMM | None = None
    """The engine the row runs on (None: the batcher's): a hot-swapped rollout keeps the
    engine its rows were planned for."""
    score_prefix: int | None = None
    """Score the prompt's tokens after this many (the online quality), from the prefill."""
    prompt_logprobs: int | None = None
    """Also return the prompt's tokens' log-probabilities with this many alternatives (echo)."""
    shadow: MergeRequest | None = None
    """A merge that scores the prompt too without generating (a rollout's shadow arm)."""
    serial: int = field(default_factory=itertools.count().__next__)

    def cancelled(self) -> bool:
        """The client has gone (or timed out): the row's output would be dropped."""
        return self.future.done() or (self.stream is not None and self.stream.cancel.is_set())

    @property
    def group(self) -> tuple:
        """Jobs with equal groups may share a batch; a seeded sample gets a group of its own."""
        engine = id(self.engine) if self.engine is not None else None
        if self.options.sampling.do_sample and self.options.sampling.seed is not None:
            return (engine, self.options, self.serial)
        return (engine, self.options)


async def follow(
    task: asyncio.Future, stream: RowStream
) -> AsyncIterator[RoutingPlan | str | Served]:
    """The pieces ``task`` sends into ``stream`` as they come, then the task's result.
    Leaving early cancels the row and the task."""
    task.add_done_callback(lambda _: stream.queue.put_nowait(END))
    try:
        while (item := await stream.queue.get()) is not END:
            yield item
        yield await task
    finally:
        stream.cancel.set()
        task.cancel()


def timings(streamer: BatchStreamer, start: float, route_s: list[float]) -> list[Timing]:
    """Each row's timing, from when ``generate`` was called (``start``) and what the
    batch's streamer saw."""
    first, prompt_at = streamer.first_token_at, streamer.prompt_at
    return [
        Timing(route, prompt_at - start, first - prompt_at, end - first)
        for route, end in zip(route_s, streamer.ended_at)
    ]


class Batcher:
    """Collects generation jobs for a few milliseconds and runs them in batches."""

    def __init__(
        self,
        engine: TTMM,
        max_batch_size: int,
        window_s: float,
        on_batch: Callable[[list[RoutingPlan]], None] = lambda plans: None,
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self._on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

    async def submit(
        self,
        prompt: str,
        merge: MergeRequest,
        options: GenerationOptions,
        top_logprobs: int | None = None,
        stream: RowStream | None = None,
        **row,
    ) -> Served:
        """Queue one prompt; returns its generation (with the plan used) once its batch ran.
        With ``stream``, its plan (once routed), then its text flow into ``stream.queue``.
        ``row`` sets a rollout row's ``engine``, ``score_prefix`` and ``shadow``, and an
        echoed row's ``prompt_logprobs`` (see :class:`_Job`)."""
        queue = self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        await queue.put(_Job(prompt, merge, options, future, stream, top_logprobs, **row))
        return await future

    async def stream(
        self,
        prompt: str,
        merge: MergeRequest,
        options: GenerationOptions,
        stream: RowStream,
        top_logprobs: int | None = None,
        **row,
    ) -> AsyncIterator[RoutingPlan | str | Served]:
        """Yield the plan of ``prompt`` once its batch routed it, its continuation piece by
        piece, then its :class:`Served`. Leaving early (or setting ``stream.cancel``) stops
        the row, not its batch."""
        task = asyncio.ensure_future(
            self.submit(prompt, merge, options, top_logprobs, stream=stream, **row)
        )
        async for item in follow(task, stream):
            yield item

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _ensure_running(self) -> asyncio.Queue[_Job]:
        """Start the worker on the running event loop (again if the loop has changed)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._work(self._queue), name="ttmm-batcher")
        return self._queue

    async def _work(self, queue: asyncio.Queue[_Job]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            self._prefetch(loop, jobs[0])
            deadline = loop.time() + self.window_s
            while len(jobs) < self.max_batch_size:
                if not queue.empty():
                    jobs.append(queue.get_nowait())
                    self._prefetch(loop, jobs[-1])
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
                self._prefetch(loop, jobs[-1])
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                if not job.future.done():  # its client timed out or went away
                    groups.setdefault(job.group, []).append(job)
            for group in groups.values():
                await self._run(group)

    def _prefetch(self, loop: asyncio.AbstractEventLoop, job: _Job) -> None:
        """Read a queued row's experts from disk while its batch window is open (engines
        whose experts stay on disk, ``adapter_cache_mb``): a thread routes the row (if it
        asks for routing) and reads the experts of its plan into the cache, outside the
        model's lock, so the batch's merge finds them in memory."""
        engine = job.engine or self.engine
        if engine.merger.experts.budget_bytes is not None:
            loop.run_in_executor(None, _read_ahead, engine, job.merge)

    async def _run(self, jobs: list[_Job]) -> None:
        try:
            results = await asyncio.to_thread(self._generate, jobs)
        except Exception as err:
            if len(jobs) > 1:  # find the bad row: every row runs alone
                logger.warning(
                    "batch of %d rows failed (%s); running its rows alone", len(jobs), err
                )
                for job in jobs:
                    await self._run([job])
                return
            if not jobs[0].future.done():
                jobs[0].future.set_exception(err)
            return
        for job, result in zip(jobs, results):
            if not job.future.done():
                job.future.set_result(result)

    def _generate(self, jobs: list[_Job]) -> list[Served]:
        """Route the rows that ask for it, then generate every row with its own plan (and
        score the shadow merges of rows that have one)."""
        engine = jobs[0].engine or self.engine
        plans, route_s = self._plans(engine, [job.merge for job in jobs])
        self._on_batch(plans)
        for job, plan in zip(jobs, plans):
            if job.stream is not None:
                job.stream.send(plan)  # a stream's first chunk names its plan
        logger.debug(
            "batch of %d rows, %d distinct merges", len(jobs), len({p.key() for p in plans})
        )
        asked = [job.top_logprobs for job in jobs if job.top_logprobs is not None]
        streamed = [j.top_logprobs if j.stream is not None else None for j in jobs]
        steps = StepLogprobs() if any(k is not None for k in streamed) else None
        prompt_asked = [job.prompt_logprobs for job in jobs if job.prompt_logprobs is not None]
        streamer = BatchStreamer(
            engine.tokenizer,
            [job.stream for job in jobs],
            logprobs=steps,
            top_k=streamed,
            prompt_k=[job.prompt_logprobs for job in jobs],
        )
        extra = {"logits_processor": LogitsProcessorList([steps])} if steps else {}
        start = time.perf_counter()
        generations = engine.generate(
            [job.prompt for job in jobs],
            plans=plans,
            mode="auto",
            top_logprobs=max(asked) if asked else None,
            score_prefix=_prefixes(jobs),
            prompt_logprobs=max(prompt_asked) if prompt_asked else None,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([RowsCancelled([j.cancelled for j in jobs])]),
            **extra,
            **jobs[0].options.generate_kwargs(),
        )
        times = timings(streamer, start, route_s)
        shadow_nll, shadow_s = self._shadow_scores(engine, jobs)
        return [
            Served(generation, timing, len(jobs), nll, shadow_s)
            for generation, timing, nll in zip(generations, times, shadow_nll)
        ]

    @staticmethod
    def _plans(engine: TTMM, merges: list[MergeRequest]) -> tuple[list[RoutingPlan], list[float]]:
        """Each merge's plan (routing those that ask for it, one encoder call per router and
        routing) and the seconds its routing took."""
        plans = [merge.plan for merge in merges]
        route_s = [0.0] * len(merges)
        to_route: dict[tuple, list[int]] = {}
        for i, merge in enumerate(merges):
            if merge.plan is None:
                to_route.setdefault((merge.router, merge.routing), []).append(i)
        for (router, routing), rows in to_route.items():
            start = time.perf_counter()
            routed = (router or engine).route([merges[i].query for i in rows], routing)
            for i, plan in zip(rows, routed):
                plans[i], route_s[i] = plan, time.perf_counter() - start
        return plans, route_s

    def _shadow_scores(
        self, engine: TTMM, jobs: list[_Job]
    ) -> tuple[list[tuple[float, int] | None], float]:
        """The prompt NLL of each row under its shadow merge (None without one), scored in
        one forward pass over the rows that have one, and the seconds it took."""
        rows = [i for i, job in enumerate(jobs) if job.shadow is not None]
        scores: list[tuple[float, int] | None] = [None] * len(jobs)
        if not rows:
            return scores, 0.0
        start = time.perf_counter()
        try:
            plans, _ = self._plans(engine, [jobs[i].shadow for i in rows])
            prefixes = _prefixes([jobs[i] for i in rows])
            scored = engine.prompt_nll([jobs[i].prompt for i in rows], plans, prefixes)
        except Exception:  # the rows were served: a failed shadow score loses evidence only
            logger.exception("shadow scoring of %d rows failed", len(rows))
            return scores, time.perf_counter() - start
        for i, score in zip(rows, scored):
            scores[i] = score
        return scores, time.perf_counter() - start


def _read_ahead(engine: TTMM, merge: MergeRequest) -> None:
    """Route ``merge`` (if it asks for routing) and prefetch its plan's experts; a failure
    only loses the head start (the batch routes and reads again, and reports errors)."""
    try:
        plan = merge.plan
        if plan is None:
            [plan] = (merge.router or engine).route([merge.query], merge.routing)
        engine.prefetch([plan])
    except Exception:
        logger.debug("prefetch failed", exc_info=True)


def _prefixes(jobs: Sequence[_Job]) -> list[int] | None:
    """Each row's scored prefix, None if no row is scored (a row that is not scored gets a
    prefix past any prompt: it scores no token)."""
    if all(job.score_prefix is None for job in jobs):
        return None
    return [NOT_SCORED if job.score_prefix is None else job.score_prefix for job in jobs]


NOT_SCORED = 1 << 30
