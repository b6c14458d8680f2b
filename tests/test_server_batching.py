"""Streamed requests batched with the others, per-row cancellation and per-request timing.

Greedy decoding throughout, so a streamed text can be compared with the whole one and with
the engine called directly.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import torch
from test_server import GREEDY, NEW, PROMPT, engine_text, sse_events

from ttmm.routing import RoutingPlan
from ttmm.serve.app import ServerSettings, create_app
from ttmm.serve.batching import Batcher, GenerationOptions, MergeRequest, Served
from ttmm.serve.streaming import BatchStreamer, RowStream

OTHER = "def fibonacci(n): return n if n < 2 else"
EXPERTS = {"ttmm": {"experts": {"2": 1.0}}}


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120
    )


def streamed_text(response: httpx.Response) -> tuple[str, list[dict]]:
    chunks = sse_events(response.text.splitlines())
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks


def test_a_streamed_completion_equals_the_whole_one_alone_and_batched(tiny_engine):
    app = create_app(tiny_engine, ServerSettings(batch_window_ms=300))
    request = {"prompt": PROMPT, **GREEDY, **EXPERTS}
    stream = {**request, "stream": True}

    async def scenario():
        async with asgi_client(app) as c:
            alone = await c.post("/v1/completions", json=stream)
            batched = await asyncio.gather(
                c.post("/v1/completions", json=stream),
                c.post("/v1/completions", json=request),
                c.post("/v1/completions", json={"prompt": OTHER, **GREEDY}),
                c.post("/v1/completions", json={**stream, "prompt": OTHER, "ttmm": None}),
            )
            return alone, batched

    alone, (streamed, whole, other, other_streamed) = asyncio.run(scenario())
    expected = engine_text(tiny_engine, PROMPT, RoutingPlan.explicit({2: 1.0}))
    assert streamed_text(alone)[0] == expected
    assert streamed_text(streamed)[0] == whole.json()["choices"][0]["text"] == expected
    assert streamed_text(other_streamed)[0] == other.json()["choices"][0]["text"]
    rows = {s.name: s.value for s in app.state.metrics.batch_rows.collect()[0].samples}
    # the lone stream, then all four requests in one batch
    assert (rows["ttmm_batch_rows_count"], rows["ttmm_batch_rows_sum"]) == (2, 5)


def test_a_row_whose_client_leaves_stops_alone(tiny_engine, monkeypatch):
    streamers = []
    generate = tiny_engine.generate

    def watched(*args, **kwargs):
        streamers.append(kwargs["streamer"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(tiny_engine, "generate", watched)
    batcher = Batcher(tiny_engine, max_batch_size=8, window_s=0.3)
    long = GenerationOptions(max_new_tokens=40)
    plan = RoutingPlan.explicit({1: 1.0})

    async def scenario() -> tuple[Served, int]:
        loop = asyncio.get_running_loop()
        whole = asyncio.ensure_future(batcher.submit(OTHER, MergeRequest(plan=plan), long))
        pieces = batcher.stream(PROMPT, MergeRequest(plan=plan), long, RowStream(loop))
        assert (await anext(pieces)).key() == plan.key()  # a stream hears its plan first
        first = await anext(pieces)
        await pieces.aclose()  # the client leaves after its first piece
        served = await whole
        lone = batcher.stream(PROMPT, MergeRequest(plan=plan), long, RowStream(loop))
        await anext(lone), await anext(lone)  # its plan, then its first piece
        await lone.aclose()
        await asyncio.sleep(0.5)  # let the lone batch wind down
        await batcher.stop()
        return served, len(first)

    served, first = asyncio.run(scenario())
    assert first > 0
    [expected] = generate([OTHER], max_new_tokens=40, plans=[plan])
    assert served.generation.text == expected.text  # the other row ran to its end
    together, lone = streamers
    assert len(together.tokens[0]) == served.generation.completion_tokens == 40
    assert len(together.tokens[1]) < 40  # the stream's row stopped when its client left
    assert len(lone.tokens[0]) < 40  # a batch of only cancelled rows stops early


def test_timing_is_reported_on_request_and_counted_in_the_metrics(tiny_engine):
    app = create_app(tiny_engine)
    timed = {"prompt": PROMPT, **GREEDY, "ttmm": {"timing": True}}

    async def scenario():
        async with asgi_client(app) as c:
            start = time.perf_counter()
            whole = await c.post("/v1/completions", json=timed)
            elapsed = time.perf_counter() - start
            plain = await c.post("/v1/completions", json={"prompt": PROMPT, **GREEDY})
            streamed = await c.post("/v1/completions", json={**timed, "stream": True})
            metrics = await c.get("/metrics")
            return whole.json(), elapsed, plain.json(), streamed, metrics.text

    whole, elapsed, plain, streamed, metrics = asyncio.run(scenario())
    timing = whole["ttmm"]["timing"]
    assert set(timing) == {"route_s", "merge_s", "prefill_s", "decode_s"}
    assert all(v >= 0 for v in timing.values()) and timing["route_s"] > 0
    assert sum(timing.values()) <= elapsed
    assert "timing" not in plain["ttmm"]
    last = [c for c in streamed_text(streamed)[1] if c["choices"]][-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert set(last["ttmm"]["timing"]) == set(timing)
    count = 'ttmm_request_stage_seconds_count{stage="decode"}'
    assert f"{count} 3.0" in metrics  # every request is timed, asked or not


def test_a_stop_string_ends_a_streamed_row_with_usage(tiny_engine):
    app = create_app(tiny_engine)
    request = {"prompt": PROMPT, **GREEDY, "max_tokens": 16, **EXPERTS}

    async def scenario():
        async with asgi_client(app) as c:
            full = (await c.post("/v1/completions", json=request)).json()["choices"][0]["text"]
            stop = full[len(full) // 2 : len(full) // 2 + 3]
            options = {"stream": True, "stop": stop, "stream_options": {"include_usage": True}}
            return full, stop, await c.post("/v1/completions", json={**request, **options})

    full, stop, response = asyncio.run(scenario())
    text, chunks = streamed_text(response)
    assert text == full[: full.index(stop)]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert 0 < chunks[-1]["usage"]["completion_tokens"] <= 16
    assert NEW < 16


def test_the_batch_streamer_sends_each_row_its_text_whole_characters_only(smol_tokenizer):
    texts = ["héllo\nwörld 日本語\n\nend 🙂 ok", "def f(x):\n    return x  # ünïcode"]
    rows = [smol_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    length = max(map(len, rows))
    eos = smol_tokenizer.eos_token_id
    padded = [row + [eos] * (length - len(row)) for row in rows]  # row 1 ends early

    async def scenario() -> tuple[list[str], BatchStreamer]:
        loop = asyncio.get_running_loop()
        streams = [RowStream(loop), None]
        streamer = BatchStreamer(smol_tokenizer, streams)
        streamer.put(torch.zeros(2, 3, dtype=torch.long))  # the prompts
        for step in range(length):
            streamer.put(torch.tensor([padded[0][step], padded[1][step]]))
        streamer.end()
        await asyncio.sleep(0)
        pieces = []
        while not streams[0].queue.empty():
            pieces.append(streams[0].queue.get_nowait())
        return pieces, streamer

    pieces, streamer = asyncio.run(scenario())
    assert "".join(pieces) == texts[0]
    assert len(pieces) > 5 and not any("\ufffd" in p for p in pieces)
    assert streamer.tokens[1] == rows[1]  # nothing after its end of sequence
    assert streamer.ended_at[1] < streamer.ended_at[0]


def test_queued_rows_experts_are_read_while_the_batch_window_is_open(tiny_engine):
    from ttmm.model import TTMM

    engine = TTMM(
        tiny_engine.model, tiny_engine.tokenizer, tiny_engine.encoder, tiny_engine.bank,
        adapter_cache_mb=1.0,
    )  # fmt: skip
    cache = engine.merger.experts
    assert len(cache) == 0
    read_before_merge = []
    generate = engine.generate

    def watched(prompts, **kwargs):
        read_before_merge.append({k for k in range(engine.bank.num_experts) if k in cache})
        return generate(prompts, **kwargs)

    engine.generate = watched
    batcher = Batcher(engine, max_batch_size=8, window_s=0.5)
    fixed = RoutingPlan.explicit({1: 0.5, 3: 0.5})
    [routed] = engine.route([OTHER])
    options = GenerationOptions(max_new_tokens=2)

    async def scenario() -> list[Served]:
        rows = [
            batcher.submit(PROMPT, MergeRequest(plan=fixed), options),
            batcher.submit(OTHER, MergeRequest(query=OTHER, routing=engine.routing), options),
        ]
        served = await asyncio.gather(*rows)
        await batcher.stop()
        return served

    served = asyncio.run(scenario())
    assert served[1].generation.plan.key() == routed.key()
    wanted = {1, 3, *routed.expert_ids}
    assert read_before_merge == [wanted]  # read in the window, before the batch's merge
    assert cache.stats.misses == 0 and cache.stats.hits >= len(wanted)
