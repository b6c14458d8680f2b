"""Test-time overhead of TTMM on the default model (issue 2 benchmark, design notes §6).

Table 1: for 1, 3 and 10 active experts of a 16-expert bank (r=8, all linear layers), the
time of route + merge + restore and of generating 100 tokens, as ratios to the base model
measured in the same run, plus weight memory at rest and the peak during a merge.
Table 2: a batch of 8 prompts with 8 different merges (3 or 10 experts each) in low-rank mode
against the base model on the same batch (throughput ratio).

    .venv/bin/python benchmarks/merge_overhead.py [--tokens 100] [--repeats 3] [--threads N]

Prints both tables and writes ``benchmarks/results/merge_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_random_bank  # noqa: E402  (the same random-bank writer the tests use)

from ttmm.assets import DEFAULT_BASE_MODEL, load_base_model  # noqa: E402
from ttmm.bank import Bank  # noqa: E402
from ttmm.device import describe, resolve_device, synchronize  # noqa: E402
from ttmm.embed import Encoder  # noqa: E402
from ttmm.model import TTMM  # noqa: E402
from ttmm.routing import RoutingConfig, RoutingPlan  # noqa: E402

PROMPTS = [
    "The French Revolution was a period of political and societal change in France that began",
    "import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser(description=",
    "Photosynthesis is a system of biological processes by which photosynthetic organisms",
    "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions. It extends",
    "class Cache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n",
    "Johann Sebastian Bach was a German composer and musician of the late Baroque period",
    "The mitochondrion is an organelle found in the cells of most eukaryotes, such as animals",
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]",
]


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn``; on a GPU, queued work is waited for on both sides."""
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def adaptation_seconds(engine: TTMM, n_active: int, repeats: int) -> tuple[float, int]:
    """Median seconds of route + fold + restore, and the bytes the merge holds while folded.

    Inside the block each adapted weight has a merged twin (the originals are set aside,
    unwritten): that is the peak's only extra allocation beyond transient per-layer factors;
    after the block, nothing.
    """
    routing = RoutingConfig(rule="top_n", max_active=n_active)

    def once():
        [plan] = engine.route(PROMPTS[:1], routing)
        with engine.merger.fold(plan):
            pass

    once()  # warm-up
    seconds = timed(once, repeats, engine.device)
    [plan] = engine.route(PROMPTS[:1], routing)
    layers = engine.merger.layers
    merged_bytes = sum(
        layers[name].module.weight.numel() * layers[name].module.weight.element_size()
        for name in engine.merger.plan_factors(plan)
    )
    return seconds, merged_bytes


def generation_seconds(engine: TTMM, tokens: int, repeats: int, n_active: int | None) -> float:
    """Median seconds to generate ``tokens`` from a prompt, everything included."""
    routing = RoutingConfig(rule="top_n", max_active=n_active) if n_active else None
    plans = None if n_active else [RoutingPlan.base()]

    def once():
        engine.generate(
            PROMPTS[:1],
            max_new_tokens=tokens,
            min_new_tokens=tokens,  # every method decodes the same length
            routing=routing,
            plans=plans,
            mode="fold",
        )

    return timed(once, repeats, engine.device)


def batch_throughput(engine: TTMM, tokens: int, repeats: int, active: int) -> float:
    """Generated tokens per second for the 8-prompt batch; row i merges ``active`` experts
    starting at expert i (8 different merges), or none for the base model."""
    K = engine.bank.num_experts
    plans = [
        RoutingPlan.explicit({(i + j) % K: 1.0 / active for j in range(active)})
        if active
        else RoutingPlan.base()
        for i in range(8)
    ]
    seconds = timed(
        lambda: engine.generate(
            PROMPTS,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            plans=plans,
            mode="lowrank" if active else "auto",
        ),
        repeats,
        engine.device,
    )
    return 8 * tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "merge_overhead.json"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    console = Console()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_base_model(dtype=args.dtype, device=device)
    encoder = Encoder(device=device)
    with tempfile.TemporaryDirectory() as tmp:
        with console.status(
            f"writing a {args.experts}-expert random bank (r=8, all linear layers)"
        ):
            path = write_random_bank(
                Path(tmp) / "bank",
                model,
                encoder.dim,
                args.experts,
                ranks=[8] * args.experts,
                base_model_name=DEFAULT_BASE_MODEL,
                magnitude=0.02,
            )
        engine = TTMM(model, tokenizer, encoder, Bank.load(path))
        base_bytes = weight_bytes(model)
        # Every method once per round, rounds interleaved, medians at the end: a machine
        # that gets busier or quieter during the run then slows every method alike.
        samples: dict[str, list[float]] = {}
        peaks = {}
        for round_ in range(args.repeats):
            with console.status(f"round {round_ + 1}/{args.repeats}: single prompts"):
                samples.setdefault("base", []).append(
                    generation_seconds(engine, args.tokens, 1, None)
                )
                for n in (1, 3, 10):
                    adapt, peaks[n] = adaptation_seconds(engine, n, 3)
                    samples.setdefault(f"adapt{n}", []).append(adapt)
                    samples.setdefault(f"gen{n}", []).append(
                        generation_seconds(engine, args.tokens, 1, n)
                    )
            with console.status(f"round {round_ + 1}/{args.repeats}: batches of 8"):
                for active in (0, 3, 10):
                    samples.setdefault(f"batch{active}", []).append(
                        batch_throughput(engine, args.batch_tokens, 1, active)
                    )
        median = {key: statistics.median(values) for key, values in samples.items()}
        base_gen = median["base"]
        rows = [
            {
                "active_experts": n,
                "merged_rank": 8 * n,
                "route_merge_restore_s": median[f"adapt{n}"],
                "overhead_ratio": median[f"adapt{n}"] / base_gen,
                "generate_s": median[f"gen{n}"],
                "generate_ratio": median[f"gen{n}"] / base_gen,
                "weights_at_rest_ratio": weight_bytes(model) / base_bytes,
                "peak_during_merge_ratio": (base_bytes + peaks[n]) / base_bytes,
            }
            for n in (1, 3, 10)
        ]
        base_tps = median["batch0"]
        merged_tps = {active: median[f"batch{active}"] for active in (3, 10)}
        adapter_bytes = 4 * engine.merger.n_parameters

    table = Table(title=f"TTMM overhead, {args.experts} experts r=8, {args.tokens} new tokens")
    for col in (
        "active",
        "route+merge+restore",
        "÷ base 100-token time",
        "generate ÷ base",
        "weights at rest",
        "peak in merge",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["active_experts"]),
            f"{r['route_merge_restore_s']:.3f} s",
            f"{100 * r['overhead_ratio']:.1f} %",
            f"{r['generate_ratio']:.3f}",
            f"{r['weights_at_rest_ratio']:.2f}×",
            f"{r['peak_during_merge_ratio']:.2f}×",
        )
    console.print(table)
    console.print(
        f"base model: {base_gen:.2f} s for {args.tokens} tokens, "
        f"{weight_bytes(model) / 2**20:.0f} MiB of weights"
    )
    batch = Table(title=f"batch of 8 prompts, {args.batch_tokens} new tokens each")
    for col in ("", "tokens/s", "÷ base"):
        batch.add_column(col)
    batch.add_row("base model", f"{base_tps:.1f}", "1.00")
    for active, tps in merged_tps.items():
        batch.add_row(
            f"8 different merges of {active} experts (low-rank)",
            f"{tps:.1f}",
            f"{tps / base_tps:.2f}",
        )
    console.print(batch)

    result = {
        "benchmark": "merge_overhead",
        "command": " ".join(sys.argv),
        "machine": {
            "device": describe(device),
            "dtype": str(model.dtype),
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "base_model": DEFAULT_BASE_MODEL,
        "experts": args.experts,
        "rank": 8,
        "tokens": args.tokens,
        "base_generate_s": base_gen,
        "base_weight_bytes": base_bytes,
        "adapter_bytes_in_memory": adapter_bytes,
        "samples": samples,
        "single_prompt": rows,
        "batch": {
            "prompts": 8,
            "new_tokens": args.batch_tokens,
            "base_tokens_per_s": base_tps,
            "merged": [
                {"active_experts": a, "tokens_per_s": tps, "throughput_ratio": tps / base_tps}
                for a, tps in merged_tps.items()
            ],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
