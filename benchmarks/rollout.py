"""A staged rollout on the default corpus, until the policy decides (issue 19 benchmark).

A real bank (the demo bank of ``make demo`` unless ``--bank``) is served by ``ttmm serve``'s
app in-process, under a rollout: control = the bank's fine-tuning adapter (``--control``),
candidate = TTMM over the bank, in shadow mode by default. Documents of the bank's corpora
that it never saw (neither trained on nor held out: the corpora's other documents) are
replayed as traffic, one request each (the first ``--prompt-tokens`` tokens, a few new
tokens), until the rollout completes or rolls back (or ``--max-requests``). After every
request the status endpoint is read: the candidate's share and the quality difference with
its anytime-valid interval are plotted over requests (``rollout.png``).

Then shadow mode's price: the same requests are served under a rollout that never decides
(candidate at 50 %), once in canary mode and once in shadow mode, rounds alternating, with
``--clients`` concurrent clients: throughput (requests/s) of each and their ratio.

    .venv/bin/python benchmarks/rollout.py [--bank BANK] [--control finetune|base] \
        [--mode shadow|canary] [--min-requests 40] [--clients 4]

Writes ``benchmarks/results/rollout.json`` and ``rollout.png`` (``--out``, ``--tag``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import yaml
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_load import LiveServer  # noqa: E402  (uvicorn in a thread on a free port)

from ttmm.assets import ttmm_home  # noqa: E402
from ttmm.build.corpus import read_corpus  # noqa: E402
from ttmm.serve.app import ServerSettings, create_app  # noqa: E402
from ttmm.serve.rollout.config import RolloutConfig  # noqa: E402
from ttmm.serve.rollout.service import start_rollout  # noqa: E402

console = Console()
ADMIN = {"Authorization": "Bearer bench-admin"}


def default_bank() -> Path:
    """The demo bank (``make demo``), the newest if several configurations were built."""
    banks = sorted(
        (ttmm_home() / "demo").glob("*/bank/manifest.json"), key=lambda p: p.stat().st_mtime
    )
    if not banks:
        raise SystemExit("no demo bank: run `make demo` first, or give --bank")
    return banks[-1].parent


def unseen_traffic(bank: Path, tokenizer, prompt_tokens: int, limit: int, seed: int) -> list[dict]:
    """Documents of the bank's corpora that the bank never read, cut to ``prompt_tokens``
    tokens, alternating domains, in a seeded order."""
    import random

    build = yaml.safe_load((bank / "build_config.yaml").read_text())
    per_domain = []
    for spec in build["corpora"]:
        seen = {d.id for d in read_corpus(spec)[0]}
        name = spec.split("@")[0]
        docs = [d for d in read_corpus(name)[0] if d.id not in seen]
        random.Random(seed).shuffle(docs)
        texts = []
        for doc in docs:
            ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            if len(ids) >= prompt_tokens:
                texts.append(
                    {
                        "id": doc.id,
                        "domain": doc.domain,
                        "text": tokenizer.decode(ids[:prompt_tokens]),
                    }
                )
            if len(texts) >= limit:
                break
        per_domain.append(texts)
    mixed = [doc for group in zip(*per_domain) for doc in group]
    if not mixed:
        raise SystemExit(f"no unseen document of {prompt_tokens} tokens in {build['corpora']}")
    return mixed


def rollout_file(folder: Path, bank: Path, args, **changes) -> RolloutConfig:
    data = {
        "candidate": {"bank": str(bank)},
        "control": {"kind": args.control},
        "mode": args.mode,
        "steps": [0, 25, 50, 100] if args.mode == "shadow" else [5, 25, 50, 100],
        "min_requests": args.min_requests,
        "state_dir": str(folder / "state"),
        "guardrails": {"max_latency_ratio": 3.0},
    } | changes
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rollout.yaml"
    path.write_text(yaml.safe_dump(data))
    return RolloutConfig.load(path)


def body(doc: dict, args, user: str) -> dict:
    return {"prompt": doc["text"], "max_tokens": args.max_tokens, "temperature": 0, "user": user}


def run_until_decision(url: str, traffic: list[dict], args) -> list[dict]:
    """One request at a time; after each, the status: the trace of the rollout."""
    trace = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(args.max_requests):
            doc = traffic[i % len(traffic)]
            answer = client.post("/v1/completions", json=body(doc, args, f"user-{i}"))
            answer.raise_for_status()
            status = client.get("/v1/ttmm/rollout", headers=ADMIN).json()
            q = status["evidence"]["quality"]
            trace.append(
                {
                    "request": i + 1,
                    "doc": doc["id"],
                    "domain": doc["domain"],
                    "arm": answer.json()["ttmm"]["arm"],
                    "share": status["share"]["candidate"],
                    "status": status["status"],
                    "estimate": q["estimate"],
                    "lower": q["lower"],
                    "upper": q["upper"],
                }
            )
            if i % 10 == 0:
                share = status["share"]["candidate"]
                console.print(
                    f"  {i + 1:4d} requests: {status['status']} at {share:g} %, Δ "
                    f"{q['estimate']:+.4f} [{_bound(q['lower'])}, {_bound(q['upper'])}]"
                )
            if status["status"] in ("complete", "rolled_back", "held"):
                break
    return trace


def _bound(value: float | None) -> str:
    return "∞" if value is None else f"{value:+.4f}"


async def serve_round(url: str, traffic: list[dict], args, tag: str) -> float:
    """Seconds to serve ``--throughput-requests`` requests from ``--clients`` clients."""
    queue = list(enumerate(traffic[: args.throughput_requests]))

    async def client_loop(http: httpx.AsyncClient) -> None:
        while queue:
            i, doc = queue.pop()
            request = body(doc, args, f"{tag}-{i}") | {"max_tokens": args.throughput_tokens}
            response = await http.post("/v1/completions", json=request)
            response.raise_for_status()

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client_loop(http) for _ in range(args.clients)))
    return time.perf_counter() - start


def plot(trace: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [t["request"] for t in trace]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.step(x, [t["share"] for t in trace], where="post", color="tab:blue")
    top.set_ylabel("candidate's share (%)")
    top.set_ylim(-5, 105)
    top.set_title(title)
    est = [t["estimate"] for t in trace]
    low = [t["lower"] if t["lower"] is not None else float("nan") for t in trace]
    high = [t["upper"] if t["upper"] is not None else float("nan") for t in trace]
    bottom.fill_between(
        x, low, high, color="tab:orange", alpha=0.25, label="95 % confidence sequence"
    )
    bottom.plot(x, est, color="tab:orange", label="estimate")
    bottom.axhline(0, color="black", linewidth=0.8)
    settled = len(x) // 8  # the first requests' bounds are wide: let the rest set the scale
    finite = [v for v in low[settled:] + high[settled:] if v == v]
    if finite:
        span = 1.3 * max(abs(min(finite)), abs(max(finite)), 0.02)
        bottom.set_ylim(-span, span)
    bottom.set_ylabel("NLL/token, candidate − control")
    bottom.set_xlabel("requests")
    bottom.legend(loc="upper right", fontsize=8)
    previous = (trace[0]["share"], trace[0]["status"]) if trace else None
    for t in trace:  # a decision shows as a change of share or status after a request
        if (t["share"], t["status"]) != previous:
            for axis in (top, bottom):
                axis.axvline(t["request"], color="grey", linestyle=":", linewidth=0.8)
            label = t["status"] if t["status"] != "running" else f"{t['share']:g} %"
            top.annotate(label, (t["request"], t["share"]), fontsize=8, xytext=(3, 3),
                         textcoords="offset points")  # fmt: skip
            previous = (t["share"], t["status"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(json_path: Path) -> None:
    """Draw ``rollout<tag>.png`` again from its JSON (no serving)."""
    data = json.loads(json_path.read_text())
    title = (
        f"TTMM vs {data['config']['control']['kind']}, {data['config']['mode']}: "
        f"{data['outcome']} after {data['requests']} requests"
    )
    plot(data["trace"], json_path.with_suffix(".png"), title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bank", type=Path, default=None, help="bank folder (default: the demo bank)"
    )
    parser.add_argument("--control", choices=("finetune", "base"), default="finetune")
    parser.add_argument("--mode", choices=("shadow", "canary"), default="shadow")
    parser.add_argument("--min-requests", type=int, default=40, help="scored requests a step needs")
    parser.add_argument("--max-requests", type=int, default=600, help="give up after this many")
    parser.add_argument("--prompt-tokens", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=4, help="new tokens per request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (throughput)")
    parser.add_argument("--throughput-requests", type=int, default=24)
    parser.add_argument(
        "--throughput-tokens", type=int, default=32, help="new tokens per throughput request"
    )
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="", help="suffix of the files written (rollout<tag>.*)")
    parser.add_argument("--replot", type=Path, help="only draw the plot of a rollout JSON again")
    args = parser.parse_args(argv)
    if args.replot is not None:
        replot(args.replot)
        return 0
    torch.set_num_threads(args.threads)
    bank = (args.bank or default_bank()).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = rollout_file(folder / "decide", bank, args)
        console.print(f"bank {bank}: control {args.control}, candidate TTMM, {args.mode} mode")
        service = start_rollout(config, device="cpu")
        engine = service.arms.engine
        model, tokenizer, encoder = engine.model, engine.tokenizer, engine.encoder
        traffic = unseen_traffic(bank, tokenizer, args.prompt_tokens, args.max_requests, args.seed)
        console.print(
            f"{len(traffic)} unseen documents as traffic ({args.prompt_tokens} tokens each)"
        )
        settings = ServerSettings(
            admin_key=ADMIN["Authorization"].split()[1], max_prompt_tokens=4096
        )
        started = time.perf_counter()
        with LiveServer(create_app(None, settings, service)) as url:
            trace = run_until_decision(url, traffic, args)
            status = httpx.get(f"{url}/v1/ttmm/rollout", headers=ADMIN).json()
        seconds = time.perf_counter() - started
        decisions = status["decisions"]

        # shadow mode's price: the same requests, never deciding, canary vs shadow
        from ttmm.serve.rollout.service import RolloutService

        timings: dict[str, list[float]] = {"canary": [], "shadow": []}
        for round_ in range(args.rounds):
            for mode in ("canary", "shadow") if round_ % 2 == 0 else ("shadow", "canary"):
                cfg = rollout_file(
                    folder / f"{mode}-{round_}", bank, args, mode=mode, steps=[50, 100],
                    min_requests=10**9,
                )  # fmt: skip
                cfg_service = RolloutService.over(cfg, model, tokenizer, encoder)
                with LiveServer(create_app(None, settings, cfg_service)) as url:
                    timings[mode].append(
                        asyncio.run(serve_round(url, traffic, args, f"{mode}{round_}"))
                    )
    n = args.throughput_requests
    throughput = {mode: n / statistics.median(s) for mode, s in timings.items()}
    ratio = throughput["shadow"] / throughput["canary"]
    q = status["evidence"]["quality"]
    title = f"TTMM vs {args.control}, {args.mode}: {status['status']} after {len(trace)} requests"
    json_path, png_path = args.out / f"rollout{args.tag}.json", args.out / f"rollout{args.tag}.png"
    plot(trace, png_path, title)
    table = Table("", "value", title="rollout on unseen documents of the bank's corpora")
    table.add_row("outcome", f"{status['status']} after {len(trace)} requests ({seconds:.0f} s)")
    table.add_row("decisions", ", ".join(f"{d['action']} → {d['to_share']:g} %" for d in decisions))
    table.add_row(
        "quality Δ (NLL/token)", f"{q['estimate']:+.4f} [{q['lower']}, {q['upper']}] over {q['n']}"
    )
    for mode in ("canary", "shadow"):
        table.add_row(
            f"throughput, {mode}", f"{throughput[mode]:.3f} requests/s ({args.clients} clients)"
        )
    table.add_row("shadow ÷ canary", f"{ratio:.3f}")
    console.print(table)
    payload = {
        "benchmark": "rollout",
        "command": " ".join(["benchmarks/rollout.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "bank": str(bank),
        "config": config.to_dict() | {"candidate": {"bank": str(bank)}},
        "traffic": {
            "documents": len(traffic),
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
        },
        "outcome": status["status"],
        "requests": len(trace),
        "seconds": seconds,
        "decisions": decisions,
        "final_evidence": status["evidence"],
        "trace": trace,
        "shadow_cost": {
            "clients": args.clients,
            "requests_per_round": n,
            "new_tokens": args.throughput_tokens,
            "seconds": timings,
            "requests_per_second": throughput,
            "shadow_over_canary": ratio,
        },
    }
    json_path.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
