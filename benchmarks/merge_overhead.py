"""Test-time overhead of TTMM on the default model, side by side with the reference code.

Table 1: for 1, 3 and 10 active experts of a 16-expert bank (r=8, all linear layers), the
merge + restore of the paper's reference code (``ttmerge`` 0.0.4, ``keep_in_memory=True``,
given the same bank written in its layout) and ours under the ``buffer`` and ``swap`` memory
policies, with the same plan, in the same process, methods interleaved over rounds (medians);
weight memory at rest and the peak a merge + restore adds; route + merge + restore as % of the
base model's time to 100 tokens; the merge against its FLOPs at the machine's GEMM rate for the
same products. Table 2: a batch of 8 prompts with 8 different merges in low-rank mode against
the base model. Every row of ours runs twice: factors in the weights' dtype (the default) and
in bfloat16 (``lora_dtype``), whose products run at the bfloat16 GEMM rate and whose factors
are half the bytes to read. Last, the fold/low-rank cost constants of ``ttmm.cost`` measured
on this machine (default factors).

    pip install --no-deps ttmerge==0.0.4          # the reference, for this benchmark only
    .venv/bin/python benchmarks/merge_overhead.py [--repeats 5] [--threads N]
    .venv/bin/python benchmarks/merge_overhead.py --calibrate   # only re-measure ttmm.cost

Prints the tables and writes ``benchmarks/results/merge_overhead.json`` (``mode_costs.json``
with ``--calibrate``).
"""

from __future__ import annotations

import argparse
import ctypes
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

from ttmm.adapter import save_adapter  # noqa: E402
from ttmm.assets import DEFAULT_BASE_MODEL, load_base_model  # noqa: E402
from ttmm.bank import Bank  # noqa: E402
from ttmm.cost import ModeCosts, crossover_tokens  # noqa: E402
from ttmm.device import describe, dtype_name, resolve_device, synchronize  # noqa: E402
from ttmm.embed import Encoder  # noqa: E402
from ttmm.merge import ExpertMerger  # noqa: E402
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
ACTIVE = (1, 3, 10)
RANK = 8
HALF = "bfloat16"  # the lora_dtype measured beside the weights' own


def export_reference_layout(bank: Bank, dst: Path) -> Path:
    """Write ``bank`` in the reference code's layout: PEFT folders ``0/ … K-1/`` and the
    centroids as ``embeddings.pt`` (the inverse of ``ttmm.build.reference``'s import)."""
    for k, adapter in enumerate(bank.adapters()):
        save_adapter(adapter, dst / str(k))
    torch.save(bank.centroids.clone(), dst / "embeddings.pt")
    return dst


def reference_model(engine: TTMM, bank_dir: Path):
    """The reference code's merging model over the engine's model, reading only local files."""
    try:
        from ttmerge import TestTimeMergingModel
    except ImportError:
        return None
    return TestTimeMergingModel(
        expert_embeddings=torch.load(bank_dir / "embeddings.pt", weights_only=True),
        tokenizer=engine.tokenizer,
        encoder=engine.encoder.model,  # its SentenceTransformer
        base_model=engine.model,
        adapter_location=str(bank_dir),
        device=engine.device,
        keep_in_memory=True,
        keep_on_device=True,
    )


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_added_bytes(fn) -> int | None:
    """Resident memory ``fn`` adds at its peak (Linux: the high-water mark, reset before the
    call, after freed memory is handed back to the OS), or None where that cannot be read."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        fn()
        return 1024 * (_status_kib("VmHWM") - before)
    except (OSError, AttributeError):
        return None


def gemm_seconds(merger: ExpertMerger, rank: int, repeats: int, device) -> float:
    """The bare products (d_out x R) @ (R x d_in) of every adapted layer, each into its own
    preallocated output, as a merge writes them: the machine's GEMM rate for these shapes."""
    shapes = [m.weight.shape for g in merger.groups for m in g.modules]
    like = torch.empty(0, dtype=merger.lora_dtype)
    B = [torch.randn(shape[0], rank, dtype=like.dtype, device=device) for shape in shapes]
    A = [torch.randn(rank, shape[1], dtype=like.dtype, device=device) for shape in shapes]
    out = [torch.zeros(shape, dtype=like.dtype, device=device) for shape in shapes]

    def products():
        for b, a, o in zip(B, A, out):
            torch.mm(b, a, out=o)

    products()
    return timed(products, repeats, device)


def lowrank_forward_costs(engine: TTMM, plan: RoutingPlan, repeats: int) -> dict[str, float]:
    """Seconds one forward adds in low-rank mode, on 1 and on 256 token positions: medians of
    paired differences (each low-rank run right after a plain one)."""
    ids = engine.tokenizer(" ".join(PROMPTS) * 8, return_tensors="pt")["input_ids"][:, :256]
    ids = ids.to(engine.device)
    calls = {1: 8, 256: 1}  # forwards per sample
    extra: dict[int, list[float]] = {1: [], 256: []}
    with torch.no_grad():
        for _ in range(repeats):
            for length, n in calls.items():
                x = ids[:, :length]
                run = lambda x=x, n=n: [engine.model(x) for _ in range(n)]  # noqa: E731
                plain = timed(run, 1, engine.device)
                with engine.merger.lowrank([plan]):
                    extra[length].append((timed(run, 1, engine.device) - plain) / n)
    return {f"extra{length}": statistics.median(v) for length, v in extra.items()}


def fit_mode_costs(engine: TTMM, fold_s: dict[int, float], extra: dict, rank: int) -> ModeCosts:
    """ModeCosts from fold times at R = 8n (a line in R) and low-rank extras at 1 and 256
    positions (a line in positions), clamped at 0 where noise makes a slope negative."""
    shape = engine.merger.adapted_shape
    ranks = [RANK * n for n in fold_s]
    times = list(fold_s.values())
    mean_r, mean_t = statistics.mean(ranks), statistics.mean(times)
    slope = sum((r - mean_r) * (t - mean_t) for r, t in zip(ranks, times)) / sum(
        (r - mean_r) ** 2 for r in ranks
    )
    slope = max(slope, 0.0)
    intercept = max(mean_t - slope * mean_r, 0.0)
    per_position = max((extra["extra256"] - extra["extra1"]) / 255, 0.0)
    flop_s = per_position / (2 * rank * shape.fan_sum)
    call_s = max(extra["extra1"] - per_position, 0.0) / shape.layers
    return ModeCosts(
        fold_seconds_per_weight=intercept / shape.weights,
        fold_seconds_per_flop=slope / (2 * shape.weights),
        lowrank_seconds_per_layer_call=call_s,
        lowrank_seconds_per_flop=flop_s,
    )


def batch_throughput(engine: TTMM, tokens: int, active: int) -> float:
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
        1,
        engine.device,
    )
    return 8 * tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--calibrate", action="store_true", help="only re-measure the ttmm.cost constants"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args()
    name = "mode_costs.json" if args.calibrate else "merge_overhead.json"
    args.out = args.out or Path(__file__).parent / "results" / name
    device = resolve_device(args.device)
    console = Console()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_base_model(dtype=args.dtype, device=device)
    encoder = Encoder(device=device)
    tmp = tempfile.TemporaryDirectory()
    with console.status(f"writing a {args.experts}-expert random bank (r=8, all linear layers)"):
        path = write_random_bank(
            Path(tmp.name) / "bank",
            model,
            encoder.dim,
            args.experts,
            ranks=[RANK] * args.experts,
            base_model_name=DEFAULT_BASE_MODEL,
            magnitude=0.02,
        )
        bank = Bank.load(path)
        ref_dir = export_reference_layout(bank, Path(tmp.name) / "reference")
    engine = TTMM(model, tokenizer, encoder, bank, memory="buffer")
    half = TTMM(model, tokenizer, encoder, bank, memory="buffer", lora_dtype=HALF)
    own = dtype_name(model.dtype)  # the factors' dtype of the default engine
    adapters = bank.adapters()
    ours = {
        "buffer": engine.merger,
        "swap": ExpertMerger(model, adapters, memory="swap"),
        "perlayer": ExpertMerger(model, adapters, memory="buffer", grouped=False),  # no baddbmm
        f"buffer {HALF}": half.merger,
        f"swap {HALF}": ExpertMerger(
            model, adapters, memory="swap", lora_dtype=half.merger.lora_dtype
        ),
    }
    reference = None if args.calibrate else reference_model(engine, ref_dir)
    if reference is None and not args.calibrate:
        console.print("[yellow]ttmerge is not installed: the reference column stays empty")
    plans = {}
    for n in ACTIVE:
        [plans[n]] = engine.route(PROMPTS[:1], RoutingConfig(rule="top_n", max_active=n))
    routing10 = RoutingConfig(rule="top_n", max_active=10)

    def reference_fold(plan: RoutingPlan) -> None:
        names = reference._efficient_merge_adapters(list(plan.expert_ids), list(plan.weights))
        reference._restore_original_weights(names)

    def our_fold(memory: str, plan: RoutingPlan) -> None:
        with ours[memory].fold(plan):
            pass

    if reference is not None:  # the same merge, both ways
        names = reference._efficient_merge_adapters(
            list(plans[3].expert_ids), list(plans[3].weights)
        )
        theirs = {n: engine.model.get_parameter(n).detach().clone() for n in names[:8]}
        reference._restore_original_weights(names)
        with ours["buffer"].fold(plans[3]):
            for n, tensor in theirs.items():
                torch.testing.assert_close(engine.model.get_parameter(n), tensor)
    methods = {f"{m} {n}": (lambda m=m, n=n: our_fold(m, plans[n])) for m in ours for n in ACTIVE}
    if reference is not None:
        methods |= {f"ref {n}": (lambda n=n: reference_fold(plans[n])) for n in ACTIVE}
    for fn in methods.values():  # warm-up: buffers allocated, the reference's adapters cached
        fn()

    # Every method once per round, rounds interleaved, medians at the end: a machine that
    # gets busier or quieter during the run then slows every method alike.
    samples: dict[str, list[float]] = {}
    for round_ in range(args.repeats):
        with console.status(f"round {round_ + 1}/{args.repeats}"):
            if not args.calibrate:
                samples.setdefault("base", []).append(
                    timed(
                        lambda: engine.generate(
                            PROMPTS[:1],
                            max_new_tokens=args.tokens,
                            min_new_tokens=args.tokens,  # every run decodes the same length
                            plans=[RoutingPlan.base()],
                        ),
                        1,
                        device,
                    )
                )
                samples.setdefault("route", []).append(
                    timed(lambda: engine.route(PROMPTS[:1], routing10), 3, device)
                )
            # the methods' order turns by one each round: none always follows the same one
            order = list(methods.items())
            shift = round_ % len(order)
            for key, fn in order[shift:] + order[:shift]:
                samples.setdefault(key, []).append(timed(fn, 3, device))
            for n in ACTIVE:
                for factors in ("", f" {HALF}"):
                    samples.setdefault(f"gemm{factors} {n}", []).append(
                        gemm_seconds(ours[f"buffer{factors}"], RANK * n, 3, device)
                    )
            if not args.calibrate:
                samples.setdefault("batch 0", []).append(
                    batch_throughput(engine, args.batch_tokens, 0)
                )
                for active in (3, 10):
                    for factors, merging in (("", engine), (f" {HALF}", half)):
                        samples.setdefault(f"batch{factors} {active}", []).append(
                            batch_throughput(merging, args.batch_tokens, active)
                        )
    median = {key: statistics.median(values) for key, values in samples.items()}

    def ratio(a: str, b: str) -> float:
        """Median over rounds of a / b, each round's pair measured seconds apart."""
        return statistics.median(x / y for x, y in zip(samples[a], samples[b]))

    # the cost constants of ttmm.cost, for factors in the weights' dtype and in bfloat16
    variants = {own: ("", engine)}
    if own != HALF:  # bfloat16 weights: the two engines are one configuration
        variants[HALF] = (f" {HALF}", half)
    extras, all_costs, all_crossovers = {}, {}, {}
    shape = engine.merger.adapted_shape
    for lora_dtype, (factors, merging) in variants.items():
        with console.status(f"low-rank forward costs, {lora_dtype} factors"):
            extras[lora_dtype] = lowrank_forward_costs(merging, plans[10], 4 * args.repeats + 3)
        fold_s = {n: median[f"buffer{factors} {n}"] for n in ACTIVE}
        all_costs[lora_dtype] = fit_mode_costs(merging, fold_s, extras[lora_dtype], RANK * 10)
        all_crossovers[lora_dtype] = {
            n: crossover_tokens(RANK * n, shape, all_costs[lora_dtype]) for n in ACTIVE
        }
        console.print(
            f"measured fold/low-rank costs, {lora_dtype} factors (paste into "
            f"ttmm.cost.MEASURED_COSTS[{device.type!r}, {own!r}, {lora_dtype!r}]):\n"
            f"{all_costs[lora_dtype]}\ncrossover (new tokens from which auto folds): "
            f"{all_crossovers[lora_dtype]}"
        )
    extra, costs = extras[own], all_costs[own]

    weight_bytes = tensor_bytes({p.data_ptr(): p for p in model.parameters()}.values())
    peaks = {}
    for key, fn in methods.items():
        peaks[key] = peak_added_bytes(fn)
    at_rest = {m: ours[m].buffer_bytes for m in ours if m != "perlayer"}
    adapters_at_rest = {m: ours[m].factor_bytes for m in ours if m != "perlayer"}
    if reference is not None:
        at_rest["ref"] = tensor_bytes(reference.original_weights.values())
        adapters_at_rest["ref"] = sum(
            tensor_bytes(state.values()) for state in reference.adapter_state_dicts.values()
        )
    rows = []
    for n in ACTIVE:
        R = RANK * n
        flops = 2 * R * shape.weights
        for factors in ("", f" {HALF}"):
            row = {
                "active_experts": n,
                "lora_dtype": HALF if factors else own,
                "merged_rank": R,
                "reference_s": median.get(f"ref {n}"),
                "buffer_s": median[f"buffer{factors} {n}"],
                "swap_s": median[f"swap{factors} {n}"],
                "merge_gflop": flops / 1e9,
                "gemm_s": median[f"gemm{factors} {n}"],
                "gemm_gflop_per_s": flops / median[f"gemm{factors} {n}"] / 1e9,
                "buffer_vs_gemm": ratio(f"buffer{factors} {n}", f"gemm{factors} {n}"),
                "peak_added_bytes": {
                    m: peaks.get(f"{m}{factors if m != 'ref' else ''} {n}")
                    for m in ("ref", "buffer", "swap")
                },
            }
            row["crossover_new_tokens"] = all_crossovers[row["lora_dtype"]][n]
            if not factors:
                row["buffer_per_layer_s"] = median[f"perlayer {n}"]
            if reference is not None:
                row["buffer_vs_reference"] = ratio(f"buffer{factors} {n}", f"ref {n}")
                row["swap_vs_reference"] = ratio(f"swap{factors} {n}", f"ref {n}")
            if not args.calibrate:
                row["route_merge_restore_s"] = median["route"] + row["buffer_s"]
                row["route_merge_restore_pct_of_base"] = (
                    100 * row["route_merge_restore_s"] / median["base"]
                )
            rows.append(row)

    mib = 2**20
    table = Table(title=f"merge + restore, {args.experts} experts r={RANK}, medians")
    columns = ["active", "factors", "reference", "ours buffer", "ours swap", "buffer ÷ ref"]
    columns += ["swap ÷ ref", "route+merge+restore ÷ base 100 tok", "merge ÷ GEMM of its FLOPs"]
    for col in columns:
        table.add_column(col)
    for r in rows:
        ref_s = r["reference_s"]
        table.add_row(
            str(r["active_experts"]),
            r["lora_dtype"],
            f"{ref_s:.3f} s" if ref_s else "-",
            f"{r['buffer_s']:.3f} s",
            f"{r['swap_s']:.3f} s",
            f"{r['buffer_vs_reference']:.2f}" if ref_s else "-",
            f"{r['swap_vs_reference']:.2f}" if ref_s else "-",
            f"{r['route_merge_restore_pct_of_base']:.1f} %" if not args.calibrate else "-",
            f"{r['buffer_vs_gemm']:.2f} ({r['gemm_gflop_per_s']:.0f} GFLOP/s)",
        )
    console.print(table)
    memory = Table(title="memory (MiB): weight copies at rest, adapters at rest, peak added")
    for col in ("", "weights at rest", "adapters at rest", *(f"peak, {n}" for n in ACTIVE)):
        memory.add_column(col)
    for m in ("ref", "buffer", "swap", f"buffer {HALF}", f"swap {HALF}"):
        if m in at_rest:
            peak = [peaks.get(f"{m} {n}") for n in ACTIVE]
            memory.add_row(
                m,
                f"{at_rest[m] / mib:.0f}",
                f"{adapters_at_rest[m] / mib:.0f}",
                *(f"{p / mib:.0f}" if p is not None else "-" for p in peak),
            )
    console.print(memory)
    console.print(
        "buffer, one product per layer instead of one baddbmm per shape: "
        + ", ".join(f"{r['buffer_per_layer_s']:.3f} s" for r in rows if "buffer_per_layer_s" in r)
    )
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
        "rank": RANK,
        "base_weight_bytes": weight_bytes,
        "adapted_weights": shape.weights,
        "weights_at_rest_bytes": at_rest,
        "adapters_at_rest_bytes": adapters_at_rest,
        "single_prompt": rows,
        "mode_costs": vars(costs),
        "lowrank_forward_extra_s": extra,
        "mode_costs_by_lora_dtype": {k: vars(v) for k, v in all_costs.items()},
        "lowrank_forward_extra_s_by_lora_dtype": extras,
        "samples": samples,
    }
    if not args.calibrate:
        base_gen, base_tps = median["base"], median["batch 0"]
        console.print(f"base model: {base_gen:.2f} s for {args.tokens} tokens")
        merged = [
            {
                "active_experts": active,
                "lora_dtype": HALF if factors else own,
                "tokens_per_s": median[f"batch{factors} {active}"],
                "throughput_ratio": ratio(f"batch{factors} {active}", "batch 0"),
            }
            for active in (3, 10)
            for factors in ("", f" {HALF}")
        ]
        batch = Table(title=f"batch of 8 prompts, {args.batch_tokens} new tokens each")
        for col in ("", "factors", "tokens/s", "÷ base"):
            batch.add_column(col)
        batch.add_row("base model", "-", f"{base_tps:.1f}", "1.00")
        for m in merged:
            batch.add_row(
                f"8 different merges of {m['active_experts']} experts (low-rank)",
                m["lora_dtype"],
                f"{m['tokens_per_s']:.1f}",
                f"{m['throughput_ratio']:.2f}",
            )
        console.print(batch)
        result |= {
            "tokens": args.tokens,
            "base_generate_s": base_gen,
            "batch": {
                "prompts": 8,
                "new_tokens": args.batch_tokens,
                "base_tokens_per_s": base_tps,
                "merged": merged,
            },
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
