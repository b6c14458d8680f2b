"""Load test of ``ttmm serve`` on the real default model (issue 5 benchmark).

Starts the server in-process on a free loopback port, then runs N concurrent clients,
each sending R completion requests one after another (greedy, T new tokens), twice per
round: with routing on (every prompt routed and merged, the server's default) and with
routing off (every request ``"ttmm": {"base": true}``, the base model alone). Rounds
alternate the two so that a busy machine slows both alike; the table reports throughput
(requests/s, generated tokens/s) and latency percentiles of each, and their ratios.
The first ``--streaming`` clients stream their completions (server-sent events), batched
with the others; their time to the first text is reported apart. Every request asks for
its timing (route, merge, prefill, decode seconds), whose means are reported too. Before
the load, the set-up of a mixed batch's low-rank merge (the per-batch union selection and
row gathers) is timed against one decoding step of that batch: the measurement behind
serving mixed batches without a merge cache. With ``--lora-dtype bfloat16`` a third phase runs
routing on over a second server whose engine keeps the experts' factors in bfloat16 (the same
base model, interleaved with the others): its ratio to routing off is reported beside.

    .venv/bin/python benchmarks/serve_load.py [--clients 8] [--requests 4] [--tokens 32] \
        [--streaming 4] [--threads 1] [--lora-dtype bfloat16]

The bank is ``banks/default-k16`` when it has been built, otherwise a random 16-expert bank
(r=8 on every linear layer) for the default model, written to a temporary folder.
Writes ``benchmarks/results/serve_load.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from conftest import write_random_bank  # noqa: E402  (the same random-bank writer the tests use)
from merge_overhead import PROMPTS as MERGE_PROMPTS  # noqa: E402

from ttmm.assets import load_base_model  # noqa: E402
from ttmm.bank import Bank  # noqa: E402
from ttmm.device import describe  # noqa: E402
from ttmm.embed import Encoder  # noqa: E402
from ttmm.model import TTMM  # noqa: E402
from ttmm.routing import RoutingConfig  # noqa: E402
from ttmm.serve.app import ServerSettings, create_app  # noqa: E402

logger = logging.getLogger("serve_load")

DEFAULT_BANK = ROOT / "banks" / "default-k16"
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"

PROMPTS = [  # the merge benchmark's 8 prompts (prose and code), and 4 more
    *MERGE_PROMPTS,
    "The Great Wall of China is a series of fortifications that were built across the northern",
    "SELECT customers.name, SUM(orders.total) FROM customers JOIN orders ON customers.id =",
    "Albert Einstein was a German-born theoretical physicist who is best known for developing",
    "async def fetch(session, url):\n    async with session.get(url) as response:\n",
]


def load_engine(
    bank: Path | None, device: str, dtype: str, lora_dtypes: list[str]
) -> tuple[list[TTMM], str]:
    """One engine per LoRA dtype over one base model, encoder and bank; and the bank in words."""
    model, tokenizer = load_base_model(dtype=dtype, device=device)
    if bank is None and (DEFAULT_BANK / "manifest.json").exists():
        bank = DEFAULT_BANK
    if bank is None:
        bank = Path(tempfile.mkdtemp(prefix="ttmm-serve-load-")) / "bank"
        write_random_bank(
            bank, model, base_model_name="smollm2-135m", num_experts=16, ranks=[8] * 16
        )
        description = "random 16-expert bank, r=8 on every linear layer"
    else:
        description = str(bank.relative_to(ROOT) if bank.is_relative_to(ROOT) else bank)
    loaded = Bank.load(bank)
    # A random bank carries the test helper's routing (3 experts); serve it with the paper's
    # defaults instead (sparse softmax, beta 0.04, tau 0.01, up to 10 experts).
    routing = RoutingConfig() if "random" in description else None
    encoder = Encoder(loaded.manifest.encoder["name"], device=device)
    engines = [
        TTMM(model, tokenizer, encoder, loaded, routing, lora_dtype=lora_dtype)
        for lora_dtype in lora_dtypes
    ]
    return engines, description


class LiveServer:
    """uvicorn serving an app on a free loopback port, in a background thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 60 s")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


async def streamed(http: httpx.AsyncClient, body: dict) -> tuple[dict, dict, float]:
    """POST a streamed completion; its last choice chunk, its usage chunk and the seconds
    to its first text."""
    start, first_text, last, usage = time.perf_counter(), None, None, None
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=request) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                usage = chunk
            elif chunk["choices"][0]["text"] and first_text is None:
                first_text = time.perf_counter() - start
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                last = chunk
    return last, usage, first_text if first_text is not None else time.perf_counter() - start


async def run_phase(
    url: str, routed: bool, clients: int, requests: int, tokens: int, streaming: int = 0
) -> dict:
    """``clients`` concurrent clients, each sending ``requests`` completions in turn; the
    first ``streaming`` of them stream."""
    latencies: list[float] = []
    first_text: list[float] = []
    timings: list[dict] = []
    generated = 0
    experts: list[int] = []

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal generated
        for r in range(requests):
            body = {
                "model": "ttmm",
                "prompt": PROMPTS[(index * requests + r) % len(PROMPTS)],
                "max_tokens": tokens,
                "temperature": 0,
                "ttmm": {"timing": True} if routed else {"base": True, "timing": True},
            }
            start = time.perf_counter()
            if index < streaming:
                data, usage, ttft = await streamed(http, body)
                first_text.append(ttft)
            else:
                response = await http.post("/v1/completions", json=body)
                response.raise_for_status()
                data = usage = response.json()
            latencies.append(time.perf_counter() - start)
            generated += usage["usage"]["completion_tokens"]
            experts.append(len(data["ttmm"]["experts"]))
            timings.append(data["ttmm"]["timing"])

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "latencies": latencies,
        "first_text": first_text,
        "timings": timings,
        "tokens": generated,
        "experts": experts,
    }


def mixed_batch_setup(engine: TTMM, rows: int, repeats: int = 5) -> dict:
    """Seconds to set up a mixed batch's low-rank merge (union selection, row gathers, hooks)
    for ``rows`` routed prompts, against one decoding step of that batch (median of
    ``repeats``): what a cache of mixed-batch set-ups could save at most."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(rows)]
    plans = engine.route(prompts)
    batch = engine.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    batch = batch.to(engine.device)
    setup, step = [], []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            with engine.merger.lowrank(plans):
                setup.append(time.perf_counter() - start)
                out = engine.model(**batch, use_cache=True)
                start = time.perf_counter()
                engine.model(
                    input_ids=batch["input_ids"][:, -1:],
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                step.append(time.perf_counter() - start)
    return {
        "rows": rows,
        "distinct_merges": len({p.key() for p in plans}),
        "setup_s": statistics.median(setup),
        "decode_step_s": statistics.median(step),
    }


def summarise(phases: list[dict]) -> dict:
    latencies = sorted(x for p in phases for x in p["latencies"])
    first_text = [x for p in phases for x in p["first_text"]]
    timings = [t for p in phases for t in p["timings"]]
    wall = sum(p["wall_s"] for p in phases)
    tokens = sum(p["tokens"] for p in phases)
    experts = [n for p in phases for n in p["experts"]]
    counters = {k: sum(p["counters"][k] for p in phases) for k in phases[0]["counters"]}

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))]

    return {
        "requests": len(latencies),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": pct(0.50),
        "latency_p90_s": pct(0.90),
        "latency_p99_s": pct(0.99),
        "mean_active_experts": statistics.mean(experts),
        "rows_per_batch": counters["rows"] / counters["batches"],
        "stream_first_text_p50_s": statistics.median(first_text) if first_text else None,
        "mean_timing_s": {k: statistics.mean(t[k] for t in timings) for k in timings[0]},
        **counters,
    }


def server_counters(app) -> dict:
    """Cache and batching counters read from the app's own metrics registry."""
    registry = app.state.metrics.registry
    value = registry.get_sample_value
    return {
        "merge_cache_hits": value("ttmm_merge_cache_hits_total") or 0.0,
        "merge_cache_misses": value("ttmm_merge_cache_misses_total") or 0.0,
        "batches": value("ttmm_batch_rows_count") or 0.0,
        "rows": value("ttmm_batch_rows_sum") or 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients.")
    parser.add_argument("--requests", type=int, default=4, help="Requests per client per phase.")
    parser.add_argument("--tokens", type=int, default=32, help="New tokens per request.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating on/off rounds.")
    parser.add_argument("--streaming", type=int, default=4, help="Clients that stream.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Where the JSON goes.")
    parser.add_argument("--max-batch-size", type=int, default=ServerSettings.max_batch_size)
    parser.add_argument("--batch-window-ms", type=float, default=ServerSettings.batch_window_ms)
    parser.add_argument("--bank", type=Path, default=None, help="Bank folder (default: see doc).")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). On a machine shared with other jobs, "
        "1 avoids OpenMP threads spinning against each other.",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--lora-dtype",
        default=None,
        help="also serve routing on with the experts' factors in this dtype (e.g. bfloat16)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    half = f"routing on, {args.lora_dtype} factors"
    lora_dtypes = ["auto", args.lora_dtype] if args.lora_dtype else ["auto"]
    engines, bank_description = load_engine(args.bank, args.device, args.dtype, lora_dtypes)
    engine = engines[0]
    settings = ServerSettings(
        max_batch_size=args.max_batch_size,
        batch_window_ms=args.batch_window_ms,
        max_tokens_limit=max(512, args.tokens),
    )
    mixed = mixed_batch_setup(engine, args.max_batch_size)
    logger.info("mixed batch set-up: %s", mixed)
    apps = [create_app(e, settings) for e in engines]
    # phase name -> (server number, routed)
    plan = {"routing off": (0, False), "routing on": (0, True)}
    if args.lora_dtype:
        plan[half] = (1, True)
    phases: dict[str, list[dict]] = {name: [] for name in plan}
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(LiveServer(app)) for app in apps]
        logger.info("servers up at %s; warming up", urls)
        for server, routed in plan.values():
            asyncio.run(run_phase(urls[server], routed, clients=1, requests=1, tokens=4))
        names = list(plan)
        for round_index in range(args.rounds):
            shift = round_index % len(names)  # the order turns: none always follows the same
            for name in names[shift:] + names[:shift]:
                server, routed = plan[name]
                app = apps[server]
                before = server_counters(app)
                result = asyncio.run(
                    run_phase(
                        urls[server],
                        routed,
                        args.clients,
                        args.requests,
                        args.tokens,
                        args.streaming,
                    )
                )
                result["counters"] = {k: v - before[k] for k, v in server_counters(app).items()}
                phases[name].append(result)
                logger.info("round %d, %s: %.1f s", round_index + 1, name, result["wall_s"])

    summary = {name: summarise(runs) for name, runs in phases.items()}
    off = summary["routing off"]
    every_ratio = {
        name: {
            "throughput_requests": s["requests_per_s"] / off["requests_per_s"],
            "throughput_tokens": s["tokens_per_s"] / off["tokens_per_s"],
            "latency_p50": s["latency_p50_s"] / off["latency_p50_s"],
            "latency_p90": s["latency_p90_s"] / off["latency_p90_s"],
            "latency_p99": s["latency_p99_s"] / off["latency_p99_s"],
        }
        for name, s in summary.items()
        if name != "routing off"
    }
    on, ratios = summary["routing on"], every_ratio["routing on"]

    table = Table(
        title=f"ttmm serve: {args.clients} clients × {args.requests} requests × "
        f"{args.tokens} tokens, {args.rounds} rounds"
    )
    columns = ("", "req/s", "tok/s", "p50 s", "p90 s", "p99 s", "stream 1st s")
    for column in (*columns, "experts/req", "rows/batch"):
        table.add_column(column, justify="right")
    for name, s in summary.items():
        first = s["stream_first_text_p50_s"]
        table.add_row(
            name,
            f"{s['requests_per_s']:.3f}",
            f"{s['tokens_per_s']:.1f}",
            f"{s['latency_p50_s']:.2f}",
            f"{s['latency_p90_s']:.2f}",
            f"{s['latency_p99_s']:.2f}",
            "-" if first is None else f"{first:.2f}",
            f"{s['mean_active_experts']:.1f}",
            f"{s['rows_per_batch']:.1f}",
        )
    for name, r in every_ratio.items():
        table.add_row(
            f"{name} / off",
            f"{r['throughput_requests']:.2f}",
            f"{r['throughput_tokens']:.2f}",
            f"{r['latency_p50']:.2f}",
            f"{r['latency_p90']:.2f}",
            f"{r['latency_p99']:.2f}",
            "",
            "",
            "",
        )
    console = Console(width=120)
    console.print(table)
    console.print(
        f"merge cache (routing on): {on['merge_cache_hits']:.0f} hits, "
        f"{on['merge_cache_misses']:.0f} misses"
    )
    for name, s in summary.items():
        stages = ", ".join(f"{k} {v:.3f}" for k, v in s["mean_timing_s"].items())
        console.print(f"mean seconds per request, {name}: {stages}")
    console.print(
        f"mixed batch of {mixed['rows']} rows ({mixed['distinct_merges']} merges): low-rank "
        f"set-up {mixed['setup_s'] * 1000:.1f} ms, one decoding step "
        f"{mixed['decode_step_s'] * 1000:.1f} ms"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python " + " ".join(sys.argv),
        "bank": bank_description,
        "experts": engine.bank.num_experts,
        "routing": engine.routing.to_dict(),
        "settings": {k: v for k, v in vars(settings).items() if k != "api_key"},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "device": describe(engine.device),
            "dtype": str(engine.model.dtype),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "mixed_batch_setup": mixed,
        "summary": summary,
        "ratios_on_over_off": ratios,
    }
    if args.lora_dtype:
        record["ratios_over_off"] = every_ratio
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
