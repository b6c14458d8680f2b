"""The web page: see a bank and try TTMM in a browser (issue 14).

``install_ui(app, dependencies)`` adds to the server:

- ``GET /`` and ``GET /static/…``: the page, its script and its style (public: they hold
  no bank data; the page fetches everything below with the user's API key);
- ``GET /v1/ttmm/bank``: every expert (label, size, training tokens, loss curve), the build
  configuration and the 2-D map of the training chunks and centroids (:mod:`bankmap`);
- ``POST /v1/ttmm/locate``: where a text's routing query lands on the map, and its
  similarity z_k to every centroid;
- ``POST /v1/ttmm/score``: perplexity of a text after its routed prefix, base model versus
  TTMM (and the fine-tuning baseline when the bank has it), as in the evaluation protocol
  (design notes §3);
- ``POST /v1/ttmm/finetune/completions``: a completion (streamed or whole) from the base
  model with the bank's fine-tuning adapter, the page's third column;
- ``GET /v1/ttmm/poc/report.html``: the ``ttmm poc`` report of the bank being served, when
  the PoC built it (``/v1/ttmm/bank`` then names it in ``poc_report`` and the page links it).

The ``/v1/ttmm`` endpoints take the same ``dependencies`` (the API key check) as the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from transformers import StoppingCriteriaList

from ttmm.merge import ExpertMerger
from ttmm.model import TTMM
from ttmm.routing import RULES, RoutingConfig, RoutingError, RoutingPlan
from ttmm.serve.bankmap import BankMap, build_map
from ttmm.serve.batching import GenerationOptions, Served, follow, timings
from ttmm.serve.errors import APIError, error_responses
from ttmm.serve.limits import Slots
from ttmm.serve.responses import STREAMED, Choice, Reply, stream_events
from ttmm.serve.schemas import NO_BOOL, CompletionRequest, Int, NonBlank, RoutingOverride
from ttmm.serve.streaming import BatchStreamer, RowsCancelled, RowStream, cut_at_stop

STATIC_DIR = Path(__file__).with_name("static")
READ_ERRORS = error_responses(401, 413, 429, 504)
POC_REPORT_PATH = "/v1/ttmm/poc/report.html"
"""Where the page finds the ``ttmm poc`` report of the bank being served."""
POC_REPORT_RESPONSES = {
    200: {
        "description": "the report, one self-contained HTML page",
        "content": {"text/html": {"schema": {"type": "string"}}},
    },
    **error_responses(401, 404, 413, 429, 504),
}
INPUT_ERRORS = error_responses(400, 401, 413, 429, 504)
GENERATION_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 504)
FINETUNE = RoutingPlan.explicit({0: 1.0})
"""The fine-tuning merger holds one adapter, applied at full weight."""


class LocateRequest(BaseModel):
    """POST /v1/ttmm/locate."""

    model_config = ConfigDict(extra="forbid")

    input: NonBlank
    """The text; like routing, it is placed by its first P tokens (the routing's prefix_tokens)."""


class FinetuneCompletionRequest(CompletionRequest):
    """POST /v1/ttmm/finetune/completions: one prompt, one choice, no log-probabilities."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=None)

    prompt: NonBlank
    n: Literal[1] = 1
    echo: Literal[False] = False
    logprobs: None = None


class ScoreRequest(BaseModel):
    """POST /v1/ttmm/score."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)
    prefix_tokens: Int = Field(default=50, ge=1)
    """Tokens routed on and never scored (design notes §3)."""
    max_tokens: Annotated[int, Field(ge=2), NO_BOOL] | None = None
    """Truncate the text to this many tokens; default: the server's max_prompt_tokens."""
    routing: RoutingOverride | None = None


class _UIState:
    """What the UI endpoints compute once per server: the map and the fine-tuning merger."""

    def __init__(self, app: FastAPI, slots: Slots):
        self.app, self.slots = app, slots
        self._lock = threading.Lock()
        self._map: BankMap | None = None
        self._finetune: ExpertMerger | None = None

    @property
    def engine(self) -> TTMM:
        return self.app.state.engine

    @property
    def settings(self):
        return self.app.state.settings

    def bank_map(self) -> BankMap:
        with self._lock:
            if self._map is None:
                self._map = build_map(self.engine.bank)
            return self._map

    def finetune(self) -> ExpertMerger:
        with self._lock:
            if self._finetune is None:
                adapter = self.engine.bank.finetune_adapter()
                if adapter is None:
                    raise APIError(
                        404,
                        "this bank has no fine-tuning adapter; rebuild it with --with-finetune",
                        type="not_found_error",
                        code="no_finetune",
                    )
                self._finetune = ExpertMerger(
                    self.engine.model, [adapter], lora_dtype=self.engine.merger.lora_dtype
                )
            return self._finetune

    def routing(self, override: RoutingOverride | None) -> RoutingConfig:
        try:
            return self.engine.routing_for(**(override.model_dump() if override else {}))
        except RoutingError as err:
            raise APIError(400, str(err), param="routing") from None

    async def run(self, work, cancel: threading.Event | None = None):
        """``work()`` in a worker thread, in one of the server's request slots (429 when
        none is free) and within its request time limit (504; ``cancel`` set then)."""
        return await self.slots.run(work, self.settings.request_timeout_s, cancel)


@contextlib.contextmanager
def applied(engine: TTMM, merger: ExpertMerger) -> Iterator[None]:
    """Hold the engine's lock with the fine-tuning adapter applied (folded unless tied)."""
    with engine.lock:
        with merger.lowrank([FINETUNE]) if merger.tied_layers else merger.fold(FINETUNE):
            yield


def bank_json(engine: TTMM, bank_map: BankMap) -> dict:
    """The bank as the page shows it."""
    manifest = engine.bank.manifest

    def expert(info) -> dict:  # the manifest entry, training time and domains lifted out
        entry = {k: v for k, v in asdict(info).items() if k not in ("path", "extra")}
        return entry | {"seconds": info.extra.get("seconds"), "domains": info.extra.get("domains")}

    return {
        "object": "ttmm.bank",
        "path": str(engine.bank.path),
        "base_model": manifest.base_model,
        "encoder": manifest.encoder,
        "created": manifest.created,
        "ttmm_version": manifest.ttmm_version,
        "routing": engine.routing.to_dict(),
        "rules": list(RULES),
        "experts": [expert(info) for info in manifest.experts],
        "finetune": expert(manifest.finetune) if manifest.finetune else None,
        "build": manifest.build,
        "data": manifest.data,
        "map": bank_map.to_json(),
    }


def poc_report(bank_path: str | Path) -> Path | None:
    """The ``report.html`` of the ``ttmm poc`` run that built this bank (its folder's parent
    holds ``poc.json`` naming this bank), or None."""
    bank = Path(bank_path).resolve()
    summary = bank.parent / "poc.json"
    try:
        named = json.loads(summary.read_text(encoding="utf-8"))["files"]["bank"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    report = bank.parent / "report.html"
    same = Path(named).expanduser().resolve() == bank
    return report if same and report.is_file() else None


def install_ui(app: FastAPI, dependencies: Sequence, slots: Slots, streams: Slots) -> None:
    """Serve the page at ``/`` and its JSON endpoints under ``/v1/ttmm`` (see module doc),
    guarded by ``dependencies`` and counted in the server's request and stream ``slots``."""
    state = _UIState(app, slots)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    router = APIRouter(prefix="/v1/ttmm", dependencies=list(dependencies))

    @router.get("/bank", responses=READ_ERRORS)
    async def bank() -> dict:
        bank_map = await state.run(state.bank_map)
        rollout = getattr(app.state, "rollout", None) is not None  # the page's Rollout section
        report = POC_REPORT_PATH if poc_report(state.engine.bank.path) else None
        return bank_json(state.engine, bank_map) | {"rollout": rollout, "poc_report": report}

    @router.get("/poc/report.html", responses=POC_REPORT_RESPONSES)
    async def poc_report_page() -> HTMLResponse:
        """The ``ttmm poc`` report of the bank being served (404 when it has none)."""
        path = poc_report(state.engine.bank.path)
        if path is None:
            raise APIError(
                404,
                "the bank being served was not built by `ttmm poc` (no poc.json beside it); "
                "run `ttmm poc --out DIR` and serve DIR/bank",
                code="not_found",
            )
        return HTMLResponse(path.read_text(encoding="utf-8"))

    @router.post("/locate", responses=INPUT_ERRORS)
    async def locate(body: LocateRequest) -> dict:
        engine = state.engine

        def work() -> dict:
            [query] = engine.query_texts([body.input])
            if not query.strip():
                raise APIError(400, "input is blank: routing needs some text", param="input")
            q = engine.encoder.encode([query])  # (1, dim), unit rows
            [z] = engine.similarities([body.input]).tolist()  # (K,)
            [[x, y]] = state.bank_map().project(q).tolist()
            return {"object": "ttmm.locate", "query": query, "x": x, "y": y, "similarities": z}

        return await state.run(work)

    @router.post("/score", responses=INPUT_ERRORS)
    async def score(body: ScoreRequest) -> dict:
        engine, settings = state.engine, state.settings
        limit = body.max_tokens or settings.max_prompt_tokens
        within(limit, settings.max_prompt_tokens, f"max_tokens={limit}", "max_tokens")
        routing = engine.routing_for(state.routing(body.routing), prefix_tokens=body.prefix_tokens)
        has_finetune = engine.bank.manifest.finetune is not None

        def work() -> dict:
            text, P = body.text, body.prefix_tokens
            n_tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            if min(n_tokens, limit) <= P:  # a valid request with nothing to score: say so
                [prefix] = engine.query_texts([text], routing)
                return {
                    "object": "ttmm.score",
                    "prefix": prefix,
                    "prefix_tokens": P,
                    "scored_tokens": 0,
                    "truncated": n_tokens > limit,
                    "methods": [],
                    "message": f"the text has {min(n_tokens, limit)} token(s), none after the "
                    f"first {P} that are routed on: give a longer text or a smaller prefix_tokens",
                }
            finetune = state.finetune() if has_finetune else None
            [routed] = engine.score([text], P, limit, routing=routing)
            [base] = engine.score([text], P, limit, plans=[RoutingPlan.base()])
            methods = [
                method("base", base),
                method("ttmm", routed, engine.bank.describe_plan(routed.plan)),
            ]
            if finetune is not None:
                with applied(engine, finetune):
                    [tuned] = engine.score([text], P, limit, plans=[RoutingPlan.base()])
                methods.append(method("finetune", tuned))
            [prefix] = engine.query_texts([text], routing)
            return {
                "object": "ttmm.score",
                "prefix": prefix,
                "prefix_tokens": P,
                "scored_tokens": routed.n_tokens,
                "truncated": n_tokens > limit,
                "methods": methods,
            }

        return await state.run(work)

    @router.post("/finetune/completions", responses=STREAMED | GENERATION_ERRORS)
    async def finetune_completions(body: FinetuneCompletionRequest):
        engine, settings = state.engine, state.settings
        merger = await asyncio.to_thread(state.finetune)  # read from disk once
        requested = body.max_tokens or settings.default_max_tokens
        within(requested, settings.max_tokens_limit, f"max_tokens={requested}", "max_tokens")
        if not isinstance(body.prompt, str):
            raise APIError(400, "give one prompt (a string), not a list", param="prompt")
        for name, default in (("n", 1), ("logprobs", None), ("echo", False)):
            if getattr(body, name) != default:
                message = f"the fine-tuning completion does not support {name}; leave it out"
                raise APIError(400, message, param=name)
        prompt_tokens = len(engine.tokenizer(body.prompt)["input_ids"])
        what = f"the prompt ({prompt_tokens} tokens)"
        within(prompt_tokens, settings.max_prompt_tokens, what, "prompt", "context_length_exceeded")
        options = GenerationOptions.from_request(requested, body.temperature, body.top_p, body.seed)
        reply = Reply(
            settings.model_id, {"rule": "finetune", "fallback": None, "experts": []}, False
        )

        cancel = threading.Event()  # set by a stream's row, or at the time limit

        def generate(row: RowStream | None) -> Served:
            """The fine-tuned model's continuation, alone (streamed into ``row`` if given);
            it stops at the first decoding step after ``cancel`` (or the row's) is set."""
            streamer = BatchStreamer(engine.tokenizer, [row])
            cancelled = RowsCancelled([row.cancel.is_set if row else cancel.is_set])
            if row is not None:
                row.send(RoutingPlan.base())  # the stream's first chunk: "finetune"
            start = time.perf_counter()
            with applied(engine, merger):
                [result] = engine.generate(
                    [body.prompt],
                    plans=[RoutingPlan.base()],
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([cancelled]),
                    **options.generate_kwargs(),
                )
            return Served(result, timings(streamer, start, [0.0])[0])

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            release_request = slots.take()
            try:
                release_stream = streams.take()
            except APIError:
                release_request()
                raise
            row = RowStream(asyncio.get_running_loop())
            source = follow(asyncio.ensure_future(asyncio.to_thread(generate, row)), row)
            events = stream_events(
                [source],
                [row],
                lambda plan: reply.plan,
                app.state.metrics,
                settings.request_timeout_s,
                body.stop_strings,
                reply,
                include_usage,
                lambda: (release_stream(), release_request()),
            )
            return StreamingResponse(events, media_type="text/event-stream")

        result = (await state.run(lambda: generate(None), cancel)).generation
        text, stopped = cut_at_stop(result.text, body.stop_strings)
        finish = "stop" if stopped else result.finish_reason
        return reply.full([Choice(text, finish)], result.prompt_tokens, result.completion_tokens)

    app.include_router(router)


def within(value: int, limit: int, what: str, param: str, code: str | None = None) -> None:
    """Refuse a request whose ``value`` exceeds the server's ``limit``."""
    if value > limit:
        message = f"{what} is more than this server's limit of {limit}; ask for less"
        raise APIError(400, message, param=param, code=code)


def method(name: str, score, routing: dict | None = None) -> dict:
    """One row of a score response."""
    row = {
        "method": name,
        "perplexity": score.perplexity,
        "nll": score.nll,
        "tokens": score.n_tokens,
    }
    return row | ({"ttmm": routing} if routing is not None else {})
