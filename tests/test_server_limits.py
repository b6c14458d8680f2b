"""The server under abuse: fuzzed requests, oversized bodies, too many streams, a rate limit,
and clients that leave mid-stream. None of it may produce a 5xx or change the base weights."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_merge import assert_bitwise_unchanged, snapshot
from test_server import free_port

from ttmm.serve.app import ServerSettings, create_app
from ttmm.serve.errors import APIError
from ttmm.serve.limits import RateLimiter

STATUSES_SENT = {"400", "401", "404", "413", "429", "500", "504"}


def test_openapi_states_every_error_status_with_the_error_schema(tiny_engine):
    schema = create_app(tiny_engine).openapi()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert STATUSES_SENT <= set(responses), path
        assert "422" not in responses  # validation errors are 400s
        ref = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert "HTTPValidationError" not in schema["components"]["schemas"]


# -- fuzzing ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_app(smol_tokenizer, encoder, tmp_path_factory):
    """A server over a tiny random engine of its own (module scope: Hypothesis reuses it)."""
    from conftest import build_tiny_llama, write_random_bank

    from ttmm.bank import Bank
    from ttmm.model import TTMM

    model = build_tiny_llama(len(smol_tokenizer))
    path = write_random_bank(tmp_path_factory.mktemp("fuzz") / "bank", model, encoder.dim)
    engine = TTMM(model, smol_tokenizer, encoder, Bank.load(path))
    limits = ServerSettings(max_prompt_tokens=64, max_tokens_limit=8, default_max_tokens=4)
    return create_app(engine, limits), model


OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/route"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/ttmm/bank"),  # the web page's endpoints (ttmm.serve.ui)
    ("POST", "/v1/ttmm/locate"),
    ("POST", "/v1/ttmm/score"),
    ("POST", "/v1/ttmm/finetune/completions"),
    ("GET", "/v1/ttmm/poc/report.html"),  # a bank no PoC built: 404
    ("POST", "/v1/ttmm/export"),  # ttmm.serve.export
    ("GET", "/v1/ttmm/rollout"),  # ttmm.serve.rollout (a server without one: 404, 403)
    ("POST", "/v1/ttmm/rollout/candidate"),
    ("POST", "/v1/ttmm/rollout/promote"),
    ("POST", "/v1/ttmm/rollout/rollback"),
    ("POST", "/v1/ttmm/rollout/pause"),
    ("POST", "/v1/ttmm/rollout/resume"),
    ("POST", "/v1/ttmm/feedback"),
]


def test_fuzzing_covers_every_operation(fuzz_app):
    app, _ = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    found = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(
    "method, path, mode",
    [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS]
    # invalid bodies too, where there is a body to break
    + [(m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"],
)
def test_fuzzed_requests_get_no_5xx_and_only_documented_answers(fuzz_app, method, path, mode):
    """Schemathesis generates requests from the OpenAPI document (valid and invalid ones);
    every answer must be documented, match its schema, and none may be a 5xx."""
    app, model = fuzz_app
    operation = schemathesis.openapi.from_asgi("/openapi.json", app)[path][method]
    before = snapshot(model)

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    def check(case):
        case.call_and_validate(
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ]
        )

    check()
    assert_bitwise_unchanged(model, before)


# -- limits -----------------------------------------------------------------------------------


def test_a_body_over_the_limit_gets_413_declared_or_not(tiny_engine):
    app = create_app(tiny_engine, ServerSettings(max_body_bytes=2000))
    big = json.dumps({"prompt": "x" * 5000, "max_tokens": 1}).encode()
    with TestClient(app) as client:
        declared = client.post("/v1/completions", content=big)
        chunked = client.post("/v1/completions", content=iter([big[:1500], big[1500:]]))
        small = client.post("/v1/completions", json={"prompt": "hello there", "max_tokens": 1})
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200


def test_streams_beyond_the_limit_get_429(tiny_engine):
    app = create_app(tiny_engine, ServerSettings(max_concurrent_streams=1))
    body = {"prompt": "hello there", "max_tokens": 2, "stream": True, "temperature": 0}
    with TestClient(app) as client:
        with client.stream("POST", "/v1/completions", json=body) as first:
            second = client.post("/v1/completions", json=body)
            assert first.status_code == 200
            list(first.iter_lines())
        assert second.status_code == 429
        assert second.json()["error"]["type"] == "rate_limit_error"
        third = client.post("/v1/completions", json=body)  # the first stream gave its slot back
        assert third.status_code == 200


def test_rate_limit_per_key_refuses_with_retry_after(tiny_engine):
    app = create_app(tiny_engine, ServerSettings(rate_limit_per_minute=2, api_key="k"))
    headers = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        codes = [client.get("/v1/models", headers=headers).status_code for _ in range(3)]
        refused = client.get("/v1/models", headers=headers)
    assert codes == [200, 200, 429]
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1


def test_rate_limiter_refills_over_time():
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one a second, bursts of 60
    for _ in range(60):
        limiter.check("a")
    with pytest.raises(APIError) as refused:
        limiter.check("a")
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    limiter.check("b")  # another key has its own bucket
    now[0] += 1.0
    limiter.check("a")


def test_a_client_leaving_mid_stream_does_not_hurt_the_server(tiny_engine):
    import threading

    import uvicorn

    port = free_port()
    app = create_app(tiny_engine, ServerSettings(max_concurrent_streams=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = snapshot(tiny_engine.model)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"prompt": "hello there", "max_tokens": 200, "stream": True, "temperature": 0}
    try:
        with httpx.stream("POST", url, json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and '"text": ""' not in line:
                    break  # leave after the first piece of text
        # the stream's slot comes back and the model is whole again
        deadline = time.monotonic() + 30
        while True:
            again = httpx.post(url, json={**body, "max_tokens": 2}, timeout=30)
            if again.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert again.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert_bitwise_unchanged(tiny_engine.model, before)


def steps_after_timeout(engine, path: str, body: dict) -> tuple[int, int]:
    """POST ``body`` (with a time limit of 0.5 s) to ``path`` of a server over ``engine``,
    whose forward pass is slowed to 20 ms; returns the forward passes in all and those after
    the client got its timeout (504, or the timeout event of a stream), once the engine's
    lock is free again."""
    import asyncio
    import threading

    model = engine.model
    forward = model.forward
    calls: list[float] = []

    def slow_forward(*args, **kwargs):
        calls.append(time.perf_counter())
        time.sleep(0.02)
        return forward(*args, **kwargs)

    app = create_app(engine, ServerSettings(request_timeout_s=0.5))

    async def scenario() -> float:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60
        ) as client:
            if not body.get("stream"):
                response = await client.post(path, json=body)
                assert response.status_code == 504, response.text
            else:
                async with client.stream("POST", path, json=body) as response:
                    lines = [line async for line in response.aiter_lines()]
                assert any("timeout" in line for line in lines), lines[-3:]
            return time.perf_counter()

    model.forward = slow_forward
    try:
        answered = asyncio.run(scenario())
        free = threading.Event()

        def wait_for_lock() -> None:
            with engine.lock:
                free.set()

        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        waiter.join(timeout=60)
        assert free.is_set()
    finally:
        model.forward = forward
    return len(calls), sum(1 for t in calls if t > answered)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_time_limit_frees_the_engine_within_a_decoding_step(tiny_engine, stream):
    """A 504'd request stops decoding at its next step (its row is cancelled), so the engine's
    lock is free again after at most one more forward pass, not after its 400 tokens."""
    body = {"prompt": "hello there", "max_tokens": 400, "temperature": 0, "stream": stream}
    calls, after = steps_after_timeout(tiny_engine, "/v1/completions", body)
    assert 5 <= calls < 400  # it was decoding, and stopped long before its 400 tokens
    assert after <= 2, f"{after} forward passes after the 504"


def test_schemathesis_with_every_check_finds_nothing(fuzz_app, tmp_path):
    """``st run --checks all -n 20`` (its coverage and fuzzing phases: valid requests accepted,
    invalid ones refused, 405 with Allow for undeclared methods, documented statuses,
    content types and schemas, no 5xx) against a live server over a bank no other test
    uses, with the server's default limits but a small max_tokens (speed) and no prompt
    limit: that one counts tokens, which no JSON schema can state, so a long generated text
    of rare characters would be a valid request the server refuses (a 400 that says so)."""
    import subprocess
    import sys
    from pathlib import Path

    from test_server import running

    app, model = fuzz_app
    settings = ServerSettings(max_tokens_limit=8, default_max_tokens=4, max_prompt_tokens=10**6)
    app = create_app(app.state.engine, settings)
    before = snapshot(model)
    st = Path(sys.executable).parent / "st"
    with running(app) as url:
        result = subprocess.run(
            [str(st), "run", f"{url}/openapi.json", "--checks", "all", "-n", "20", "--seed", "0",
             "--no-color"],  # fmt: skip
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[result.stdout.find("FAILURES") :][:8000]
    assert f"Tested: {len(OPERATIONS)}" in result.stdout  # every operation was exercised
    assert_bitwise_unchanged(model, before)
