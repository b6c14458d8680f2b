"""The OpenAI-compatible server through its HTTP layer, over the tiny engine.

Greedy decoding (temperature 0) everywhere, so every generated text can be compared with
the engine called directly, and concurrent answers with sequential ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from test_merge import assert_bitwise_unchanged, snapshot

from ttmm.factors import GroupFactors
from ttmm.routing import RoutingPlan
from ttmm.serve.app import ServerSettings, create_app
from ttmm.serve.batching import MergeCache

PROMPT = "The history of the Roman empire spans many centuries"
NEW = 8
GREEDY = {"max_tokens": NEW, "temperature": 0}


def engine_text(engine, prompt: str, plan: RoutingPlan, new: int = NEW) -> str:
    [result] = engine.generate([prompt], max_new_tokens=new, plans=[plan])
    return result.text


def plan_of(body: dict) -> RoutingPlan:
    """The plan a response reports, rebuilt for comparison."""
    experts = body["ttmm"]["experts"]
    return RoutingPlan.explicit({e["id"]: e["weight"] for e in experts})


def metric(client: TestClient, name: str) -> float:
    """The sum of a metric's samples over all label sets, from /metrics."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sse_events(lines) -> list:
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.fixture
def client(tiny_engine):
    with TestClient(create_app(tiny_engine, ServerSettings(max_prompt_tokens=64))) as c:
        yield c


def test_health_models_and_metrics(client, tiny_engine):
    assert client.get("/health").json() == {"status": "ok", "model": "ttmm", "experts": 4}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["ttmm"]
    assert [e["label"] for e in models["data"][0]["ttmm"]["experts"]] == [
        f"topic {k}" for k in range(4)
    ]
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "ttmm_requests_total",
        "ttmm_request_latency_seconds_bucket",
        "ttmm_active_experts_bucket",
        "ttmm_merge_cache_hits_total",
        "ttmm_merge_cache_misses_total",
    ):
        assert name in response.text
    assert metric(client, "ttmm_requests_total") >= 2  # /health and /v1/models were counted


def test_completion_routes_the_prompt_and_matches_the_engine(client, tiny_engine):
    body = client.post("/v1/completions", json={"prompt": PROMPT, **GREEDY}).json()
    [expected] = tiny_engine.route([PROMPT])
    assert body["object"] == "text_completion" and body["model"] == "ttmm"
    assert body["ttmm"]["rule"] == "sparse_softmax"
    assert [e["id"] for e in body["ttmm"]["experts"]] == list(expected.expert_ids)
    assert [e["label"] for e in body["ttmm"]["experts"]] == [
        f"topic {k}" for k in expected.expert_ids
    ]
    [choice] = body["choices"]
    assert choice["text"] == engine_text(tiny_engine, PROMPT, expected)
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == NEW
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + NEW
    assert metric(client, "ttmm_active_experts_count") == 1


@pytest.mark.parametrize("temperature", [1e-290, 5e-324, 1e-5])
def test_a_vanishing_temperature_decodes_greedily(client, temperature):
    # logits / 1e-290 overflow to inf and sampling failed on NaN probabilities (a fuzzer's find)
    greedy = client.post("/v1/completions", json={"prompt": "0", **GREEDY}).json()
    body = {"prompt": "0", "max_tokens": NEW, "temperature": temperature}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_chat_uses_the_template_and_routes_on_the_last_user_message(client, tiny_engine):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Say something about music."},
        {"role": "assistant", "content": "Music is sound in time."},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
    ]
    body = client.post("/v1/chat/completions", json={"messages": messages, **GREEDY}).json()
    [expected] = tiny_engine.route([PROMPT])
    assert plan_of(body).key() == expected.key()
    templated = tiny_engine.tokenizer.apply_chat_template(
        [
            {"role": m["role"], "content": PROMPT if m is messages[-1] else m["content"]}
            for m in messages
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": engine_text(tiny_engine, templated, expected),
    }
    assert body["usage"]["prompt_tokens"] == len(tiny_engine.tokenizer(templated)["input_ids"])


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streaming_sends_the_same_text_in_chunks(client, chat):
    if chat:
        path, request = "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}
    else:
        path, request = "/v1/completions", {"prompt": PROMPT}
    request = {**request, **GREEDY, "ttmm": {"experts": {"2": 1.0}}}
    whole = client.post(path, json=request).json()
    with client.stream(
        "POST", path, json={**request, "stream": True, "stream_options": {"include_usage": True}}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(response.iter_lines())
    *pieces, last, usage = chunks
    if chat:
        assert pieces[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in pieces)
        expected = whole["choices"][0]["message"]["content"]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    else:
        text = "".join(c["choices"][0]["text"] for c in pieces)
        expected = whole["choices"][0]["text"]
    assert len(pieces) >= 3, "the text came in one piece, not streamed"
    assert text == expected
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["ttmm"] == pieces[0]["ttmm"] == whole["ttmm"]
    assert usage["usage"] == whole["usage"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings_cut_the_text(client, stream):
    request = {"prompt": PROMPT, **GREEDY, "ttmm": {"experts": {"1": 1.0}}}
    full = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: no usable stop string in {full!r}"
    request["stop"] = [stop]
    if stream:
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
            chunks = sse_events(r.iter_lines())
        text = "".join(c["choices"][0]["text"] for c in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        [choice] = client.post("/v1/completions", json=request).json()["choices"]
        text, finish = choice["text"], choice["finish_reason"]
    assert text == full[: full.index(stop)]
    assert finish == "stop"


def test_per_request_overrides_choose_the_merge(client, tiny_engine):
    def complete(control: dict) -> dict:
        return client.post(
            "/v1/completions", json={"prompt": PROMPT, **GREEDY, "ttmm": control}
        ).json()

    top1 = complete({"routing": {"rule": "top_n", "max_active": 1}})
    [expected] = tiny_engine.route(
        [PROMPT], tiny_engine.routing.replace(rule="top_n", max_active=1)
    )
    assert top1["ttmm"]["rule"] == "top_n"
    assert [(e["id"], e["weight"]) for e in top1["ttmm"]["experts"]] == [
        (expected.expert_ids[0], 1.0)
    ]

    explicit = complete({"experts": {"3": 2.5, "0": 0.5}})  # heavy: random experts are weak
    assert explicit["ttmm"]["rule"] == "explicit"
    assert [(e["id"], e["weight"]) for e in explicit["ttmm"]["experts"]] == [(3, 2.5), (0, 0.5)]
    plan = RoutingPlan.explicit({3: 2.5, 0: 0.5})
    assert explicit["choices"][0]["text"] == engine_text(tiny_engine, PROMPT, plan)

    base = complete({"base": True})
    assert base["ttmm"] == {"rule": "base", "fallback": None, "experts": []}
    assert base["choices"][0]["text"] == engine_text(tiny_engine, PROMPT, RoutingPlan.base())
    assert base["choices"][0]["text"] != explicit["choices"][0]["text"], "the merge had no effect"

    route = client.post(
        "/v1/route", json={"input": PROMPT, "ttmm": {"routing": {"rule": "top_n", "max_active": 2}}}
    ).json()
    [expected] = tiny_engine.route(
        [PROMPT], tiny_engine.routing.replace(rule="top_n", max_active=2)
    )
    assert route["object"] == "ttmm.route"
    assert plan_of(route).key() == expected.key()
    assert [e["similarity"] for e in route["ttmm"]["experts"]] == pytest.approx(
        list(expected.similarities)
    )


BAD_REQUESTS = {
    "malformed json": ("/v1/completions", b'{"prompt": "x",', 400, None, "invalid_json"),
    "body not an object": ("/v1/completions", [1, 2], 400, None, "invalid_value"),
    "prompt wrong type": ("/v1/completions", {"prompt": 3}, 400, "prompt", "invalid_value"),
    "max_tokens wrong type": (
        "/v1/completions",
        {"prompt": "x", "max_tokens": "many"},
        400,
        "max_tokens",
        None,
    ),
    "temperature out of range": (
        "/v1/completions",
        {"prompt": "x", "temperature": 7},
        400,
        "temperature",
        None,
    ),
    "missing messages": ("/v1/chat/completions", {"model": "ttmm"}, 400, "messages", None),
    "oversized prompt": (
        "/v1/completions",
        {"prompt": "word " * 100},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    "too many new tokens": (
        "/v1/completions",
        {"prompt": "x", "max_tokens": 10_000},
        400,
        "max_tokens",
        None,
    ),
    "unknown model": (
        "/v1/chat/completions",
        {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
        "model_not_found",
    ),
    "unknown experts": (
        "/v1/completions",
        {"prompt": "x", "ttmm": {"experts": {"7": 1.0}}},
        404,
        "ttmm.experts",
        "expert_not_found",
    ),
    "expert id not a number": (
        "/v1/completions",
        {"prompt": "x", "ttmm": {"experts": {"three": 1.0}}},
        400,
        None,
        None,
    ),
    "two merge choices": (
        "/v1/completions",
        {"prompt": "x", "ttmm": {"base": True, "experts": {"1": 1}}},
        400,
        "ttmm",
        None,
    ),
    "unknown rule": (
        "/v1/route",
        {"input": "x", "ttmm": {"routing": {"rule": "magic"}}},
        400,
        None,
        None,
    ),
    "blank prompt": ("/v1/completions", {"prompt": "   "}, 400, None, None),
    "unknown path": ("/v1/embeddings", {"input": "x"}, 404, None, None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_error_bodies(client, case):
    path, payload, status, param, code = BAD_REQUESTS[case]
    if isinstance(payload, bytes):
        response = client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] in {"invalid_request_error", "not_found_error"}
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)
    if code is not None:
        assert error["code"] == code


def test_api_key_is_required_when_set(tiny_engine):
    app = create_app(tiny_engine, ServerSettings(api_key="sesame"))
    with TestClient(app) as c:
        missing = c.get("/v1/models")
        wrong = c.get("/v1/models", headers={"Authorization": "Bearer guess"})
        right = c.get("/v1/models", headers={"Authorization": "Bearer sesame"})
        health = c.get("/health")
        metrics_without_key = c.get("/metrics")
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert metrics_without_key.status_code == 401
    assert right.status_code == 200 and health.status_code == 200
    assert "sesame" not in repr(ServerSettings(api_key="sesame"))


def test_a_full_server_answers_429_and_a_slow_request_504(tiny_engine):
    async def scenario():
        full = create_app(tiny_engine, ServerSettings(max_concurrent_requests=1))
        slow = create_app(tiny_engine, ServerSettings(request_timeout_s=0.2))
        request = {"prompt": PROMPT, **GREEDY}
        tiny_engine.lock.acquire()  # the engine is busy: generation cannot start
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=full), base_url="http://t"
            ) as c:
                first = asyncio.create_task(c.post("/v1/completions", json=request))
                while full.state.metrics.in_flight._value.get() < 1:
                    await asyncio.sleep(0.01)
                refused = await c.post("/v1/completions", json=request)
                routed = await c.post("/v1/route", json={"input": PROMPT})
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=slow), base_url="http://t"
            ) as c:
                timed_out = await c.post("/v1/completions", json=request)
        finally:
            tiny_engine.lock.release()
        return refused, routed, timed_out, await first

    refused, routed, timed_out, first = asyncio.run(scenario())
    assert refused.status_code == 429 and routed.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert timed_out.status_code == 504
    assert timed_out.json()["error"]["code"] == "timeout"
    assert first.status_code == 200  # the waiting request ran once the engine was free


def test_concurrent_requests_match_sequential_ones_and_leave_weights_unchanged(tiny_engine):
    prompts = [
        PROMPT,
        "def fibonacci(n): return n if n < 2 else",
        "Quantum mechanics describes nature at the scale of atoms",
        "The recipe calls for flour, butter and sugar",
        "In the final match of the tournament the striker",
        "Photosynthesis converts light energy into",
    ]
    controls = [
        None,
        {"routing": {"rule": "top_n", "max_active": 1}},
        {"experts": {"0": 5.0, "3": 10.0}},  # heavy weights: the random experts are weak
        {"base": True},
        {"routing": {"rule": "threshold", "tau": 0.2}},
        {"experts": {"2": 4.0}},
    ]
    requests = [
        {"prompt": p, **GREEDY, **({"ttmm": c} if c else {})} for p, c in zip(prompts, controls)
    ]
    before = snapshot(tiny_engine.model)
    settings = ServerSettings(batch_window_ms=300, max_batch_size=8)
    app = create_app(tiny_engine, settings)

    async def run(concurrent: bool) -> list[dict]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120
        ) as c:
            if concurrent:
                responses = await asyncio.gather(
                    *(c.post("/v1/completions", json=r) for r in requests)
                )
            else:
                responses = [await c.post("/v1/completions", json=r) for r in requests]
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses]

    sequential = asyncio.run(run(concurrent=False))
    rows_before = app.state.metrics.batch_rows.collect()[0]
    concurrent = asyncio.run(run(concurrent=True))
    assert [r["choices"][0]["text"] for r in concurrent] == [
        r["choices"][0]["text"] for r in sequential
    ]
    assert [r["ttmm"] for r in concurrent] == [r["ttmm"] for r in sequential]
    assert len({plan_of(r).key() for r in sequential}) == len(requests), "routings must differ"
    base = tiny_engine.generate(prompts, NEW, plans=[RoutingPlan.base()] * len(prompts))
    merged_rows = [r["choices"][0]["text"] != b.text for r, b in zip(concurrent, base)]
    assert sum(merged_rows) >= 2, "the merges changed no output; the test would prove nothing"
    samples = {s.name: s.value for s in rows_before.samples}
    after = {s.name: s.value for s in app.state.metrics.batch_rows.collect()[0].samples}
    batches = after["ttmm_batch_rows_count"] - samples["ttmm_batch_rows_count"]
    assert batches < len(requests), "concurrent requests were not batched"
    assert_bitwise_unchanged(tiny_engine.model, before)


def test_merge_cache_is_lru_by_bytes_and_counts_hits(client):
    cache = MergeCache(max_bytes=3 * 4 * 4)  # room for three entries of 4 + 0 floats

    def entry():
        return {0: GroupFactors(torch.zeros(1, 1, 4), torch.zeros(1, 1, 0))}

    cache[("a",)], cache[("b",)], cache[("c",)] = entry(), entry(), entry()
    assert cache.get(("a",)) is not None  # "a" is now the most recently used
    cache[("d",)] = entry()
    assert set(cache) == {("a",), ("c",), ("d",)} and cache.nbytes == 48
    assert cache.get(("b",)) is None
    assert (cache.hits, cache.misses) == (1, 1)

    request = {"prompt": PROMPT, **GREEDY, "ttmm": {"experts": {"1": 0.25, "2": 0.75}}}
    hits, misses = (metric(client, f"ttmm_merge_cache_{k}_total") for k in ("hits", "misses"))
    first = client.post("/v1/completions", json=request).json()
    second = client.post("/v1/completions", json=request).json()
    assert second["choices"] == first["choices"]
    assert metric(client, "ttmm_merge_cache_misses_total") == misses + 1
    assert metric(client, "ttmm_merge_cache_hits_total") == hits + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Run ``app`` under a real uvicorn in a thread on a free loopback port; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def live_server(tiny_engine):
    """A real uvicorn server on a free loopback port, needing API key 'sesame'."""
    with running(create_app(tiny_engine, ServerSettings(api_key="sesame"))) as url:
        yield f"{url}/v1"


def test_the_official_openai_client_talks_to_the_server(live_server, tiny_engine):
    import openai

    client = openai.OpenAI(base_url=live_server, api_key="sesame", max_retries=0)
    assert [m.id for m in client.models.list()] == ["ttmm"]

    completion = client.completions.create(
        model="ttmm",
        prompt=PROMPT,
        max_tokens=NEW,
        temperature=0,
        extra_body={"ttmm": {"experts": {"1": 1.0}}},
    )
    plan = RoutingPlan.explicit({1: 1.0})
    assert completion.choices[0].text == engine_text(tiny_engine, PROMPT, plan)
    assert completion.model_extra["ttmm"]["experts"][0]["id"] == 1
    assert completion.usage.completion_tokens == NEW

    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(
        model="ttmm", messages=messages, max_tokens=NEW, temperature=0
    )
    [expected] = tiny_engine.route([PROMPT])
    assert plan_of({"ttmm": chat.model_extra["ttmm"]}).key() == expected.key()
    stream = client.chat.completions.create(
        model="ttmm", messages=messages, max_tokens=NEW, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="unknown expert"):
        client.completions.create(
            model="ttmm", prompt=PROMPT, max_tokens=2, extra_body={"ttmm": {"experts": {"9": 1}}}
        )
    wrong_key = openai.OpenAI(base_url=live_server, api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()


def test_a_failing_row_fails_alone_not_its_whole_batch(tiny_engine, monkeypatch):
    from ttmm.model import InputError

    generate = tiny_engine.generate

    def picky(prompts, *args, **kwargs):
        if any("poison" in p for p in prompts):
            raise InputError("this prompt is poisoned")
        return generate(prompts, *args, **kwargs)

    monkeypatch.setattr(tiny_engine, "generate", picky)
    app = create_app(tiny_engine, ServerSettings(batch_window_ms=300))

    async def burst():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120
        ) as c:
            return await asyncio.gather(
                c.post("/v1/completions", json={"prompt": PROMPT, **GREEDY}),
                c.post("/v1/completions", json={"prompt": "poison " + PROMPT, **GREEDY}),
            )

    healthy, poisoned = asyncio.run(burst())
    assert healthy.status_code == 200
    [expected] = tiny_engine.route([PROMPT])
    assert healthy.json()["choices"][0]["text"] == engine_text(tiny_engine, PROMPT, expected)
    assert poisoned.status_code == 400
    assert poisoned.json()["error"]["message"] == "this prompt is poisoned"
    rows = app.state.metrics.batch_rows.collect()[0].samples
    counts = {s.name: s.value for s in rows}
    # one batch of both rows, then each row alone: 3 batches, 4 rows
    assert (counts["ttmm_batch_rows_count"], counts["ttmm_batch_rows_sum"]) == (3, 4)
