"""What a bank of K experts costs when the experts stay on disk behind the adapter cache
(issue 21): K = 16, 1,000 and 10,000 experts with the real shapes of SmolLM2-135M at r = 8.

The experts are random (cost only): LoRA factors on every linear layer of the decoder (q, k,
v, o, gate, up, down of its 30 layers; not lm_head), r = 8, alpha = 16, stored in bfloat16
(4.9 MB an expert on disk; 10,000 take about 49 GB). Eight distinct experts are drawn and
expert k is written as the (k mod 8)-th; centroids are random unit vectors. The banks are
written once under ``--work`` and reused (an interrupted write resumes).

All K are measured in one process that loads the base model and the encoder once, each K by
an engine with ``top_n`` routing (10 experts) and an adapter cache of ``--cache-mb`` MB. The
timings interleave the K (prompt by prompt, repeat by repeat), so that a machine whose load
drifts during the run slows every K alike:

- load: ``Bank.load`` + building the engine (median);
- RSS at rest: what building the engine adds to the RSS of the base model + encoder, one K at
  a time; the target is at most the cache budget + 100 MB. After serving, what each engine
  held (the RSS its release hands back: the cache and the fold's buffers, which the budget
  does not count);
- route: one prompt's ``engine.route`` (tokenise, encode, score, plan), and the score product
  C q alone on an encoded query (``engine.index.scores``), medians over prompts;
- merge cold: fold + restore of 10 random experts with the cache cleared and their files
  dropped from the OS page cache (``posix_fadvise(DONTNEED)``); once on the experts' first read
  (their files' sha256 checked, as a bank does on first use), then re-read (median);
- disk read: reading those 10 experts' files after dropping them from the page cache;
- merge hot: the same fold with the experts cached; the target is cold <= disk read + hot;
- serving: 16 prompts, one at a time, each merging 3 experts drawn from a Zipf law (a = 1.2)
  over the K experts, 8 new tokens each (the engine's ``auto`` mode), from an empty cache:
  tokens/s, against the base model alone on the same prompts, and the hit rate: the share of
  the plans' experts the cache held when their prompt came.

Ratios are against K = 16 in the same run; the target for the hot route + merge is 1.2x.

    .venv/bin/python benchmarks/scale.py [--experts 16,1000,10000] [--cache-mb 512] [--threads 1]
    .venv/bin/python benchmarks/scale.py --quick      # K = 16 and 1,000, fewer prompts

Prints the tables and writes ``benchmarks/results/scale/scale.json`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from ttmm.adapter import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, LoraLayer, save_adapter
from ttmm.assets import DEFAULT_BASE_MODEL, load_base_model, ttmm_home
from ttmm.atomic import remove_staging
from ttmm.bank import (
    MANIFEST_NAME,
    Bank,
    BankManifest,
    ExpertInfo,
    base_model_record,
    expert_dir,
    write_centroids,
    write_manifest,
)
from ttmm.embed import Encoder
from ttmm.expert_cache import MB
from ttmm.model import TTMM
from ttmm.routing import RoutingConfig, RoutingPlan

HERE = Path(__file__).resolve().parent
RANK = 8
ALPHA = 16.0
POOL = 8  # distinct random experts; expert k is written as pool[k % POOL]
ACTIVE = 10  # experts of the cold / hot merge, and top_n's n
SERVE_ACTIVE = 3  # experts of each served prompt's merge
ZIPF_A = 1.2
NEW_TOKENS = 8
HOT_REPEATS = 5
DISK_MARGIN = 5 * 2**30
PROMPTS = [
    "The French Revolution was a period of political and societal change in France that began",
    "import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser(description=",
    "Photosynthesis is a system of biological processes by which photosynthetic organisms",
    "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions. It extends",
    "class Cache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n",
    "Johann Sebastian Bach was a German composer and musician of the late Baroque period",
    "The mitochondrion is an organelle found in the cells of most eukaryotes, such as animals",
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]",
    "The Great Wall of China is a series of fortifications that were built across the northern",
    "SELECT name, COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id",
    "Quantum mechanics is a fundamental theory that describes the behavior of nature at and below",
    "The Amazon rainforest covers much of the Amazon basin of South America, an area of seven",
    "async def fetch(session, url):\n    async with session.get(url) as response:\n        return",
    "Marie Curie was a Polish and naturalised-French physicist and chemist who conducted research",
    "In economics, inflation is a general increase in the prices of goods and services in an",
    "The human heart is an organ that pumps blood through the blood vessels of the circulatory",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n",
    "The Roman Empire was the post-Republican state of ancient Rome. It is generally understood",
    "Volcanoes are ruptures in the crust of a planetary-mass object, such as Earth, that allow",
    "The theory of evolution by natural selection was first formulated in Darwin's book On the",
]


# -- the banks -----------------------------------------------------------------------------


def decoder_shapes(model) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every linear layer of the decoder (lm_head excluded), by path."""
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


def random_pool(model, seed: int) -> list[LoraAdapter]:
    """``POOL`` random rank-8 adapters on every decoder linear layer, factors in bfloat16."""
    shapes = decoder_shapes(model)
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": ALPHA,
        "use_rslora": False,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in shapes}),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    pool = []
    for j in range(POOL):
        generator = torch.Generator().manual_seed(seed * 100 + j)
        layers = {}
        for name, (d_out, d_in) in shapes.items():
            A = torch.randn(RANK, d_in, generator=generator) * 0.01
            B = torch.randn(d_out, RANK, generator=generator) * 0.01
            layers[name] = LoraLayer(A=A.bfloat16(), B=B.bfloat16(), scale=ALPHA / RANK)
        pool.append(LoraAdapter(layers=layers, config=dict(config)))
    return pool


def expert_file_bytes(adapter: LoraAdapter) -> int:
    """Bytes one expert takes on disk (weights, config, a block of slack)."""
    weights = len(safetensors_bytes(adapter.state_dict(), metadata={"format": "pt"}))
    return weights + len(json.dumps(adapter.config, indent=2)) + 8192


def ensure_bank(path: Path, K: int, model, encoder: Encoder, seed: int, console) -> str:
    """Write the K-expert bank at ``path`` unless its manifest exists; resumes a write that
    was interrupted (experts already written are kept). Returns what it did."""
    if (path / MANIFEST_NAME).is_file():
        return "reused"
    path.mkdir(parents=True, exist_ok=True)
    remove_staging(path)  # half-written experts of an interrupted run
    pool = random_pool(model, seed)
    written = [(path / expert_dir(k) / WEIGHTS_NAME).is_file() for k in range(K)]
    need = (K - sum(written)) * expert_file_bytes(pool[0])
    free = shutil.disk_usage(path).free
    if free < need + DISK_MARGIN:
        raise SystemExit(
            f"{path}: the {K}-expert bank needs {need / 2**30:.1f} GB more and 5 GB must stay "
            f"free, but the disk has {free / 2**30:.1f} GB free; free some space or give "
            "another --work folder"
        )
    experts = []
    for k in tqdm(range(K), desc=f"writing k{K}", unit="expert", disable=all(written)):
        adapter = pool[k % POOL]
        if not written[k]:
            save_adapter(adapter, path / expert_dir(k))
        experts.append(
            ExpertInfo.describe(k, expert_dir(k), adapter, path, label=f"random {k % POOL}")
        )
    generator = torch.Generator().manual_seed(seed)
    centroids = torch.nn.functional.normalize(
        torch.randn(K, encoder.dim, generator=generator), dim=1
    )
    write_centroids(path, centroids)
    console.print(f"k{K}: checksumming {K} experts for the manifest ...")
    manifest = BankManifest(
        base_model=base_model_record(DEFAULT_BASE_MODEL, model),
        encoder={"name": encoder.name, "dim": encoder.dim},
        routing=RoutingConfig(rule="top_n", max_active=ACTIVE).to_dict(),
        experts=experts,
        build={"benchmark": "scale", "seed": seed, "pool": POOL, "rank": RANK},
    )
    write_manifest(path, manifest)
    return "written"


# -- measuring -----------------------------------------------------------------------------


def rss() -> int:
    return psutil.Process().memory_info().rss


def settle() -> None:
    """Collect garbage and hand freed heap back to the OS, so that RSS means what is held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def expert_files(bank: Bank, ids) -> list[Path]:
    return [bank.path / expert_dir(k) / name for k in ids for name in (WEIGHTS_NAME, CONFIG_NAME)]


def drop_page_cache(paths: list[Path]) -> None:
    """Drop the files' pages from the OS page cache (written back first: dirty pages stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += len(handle.read())
    return total


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def per_call_seconds(calls: int, fn, *args) -> float:
    """Mean seconds of one call of a fast ``fn`` over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls


def zipf_plans(K: int, n: int, seed: int) -> list[RoutingPlan]:
    """``n`` plans of ``SERVE_ACTIVE`` distinct experts each, drawn from a Zipf law (a = 1.2)
    over 0..K-1 (draws folded into range), equal weights."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < min(SERVE_ACTIVE, K):
            k = int((rng.zipf(ZIPF_A) - 1) % K)
            if k not in ids:
                ids.append(k)
        plans.append(RoutingPlan.explicit(dict.fromkeys(ids, 1.0 / len(ids))))
    return plans


def generate_one(engine: TTMM, prompt: str, plan: RoutingPlan) -> tuple[float, int]:
    """Seconds and new tokens of generating ``prompt`` alone with ``plan``."""
    start = time.perf_counter()
    (out,) = engine.generate(
        [prompt], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, plans=[plan]
    )
    return time.perf_counter() - start, out.completion_tokens


def fold(engine: TTMM, plan: RoutingPlan) -> None:
    with engine.merged([plan], "fold"):
        pass


def build_phase(model, tokenizer, encoder, banks, args, rows) -> dict[int, TTMM]:
    """Load time and RSS at rest, one K at a time: what building the engine adds to the
    process (the engines built before it are held at rest: empty caches, no fold buffers)."""
    routing = RoutingConfig(rule="top_n", max_active=ACTIVE)
    engines: dict[int, TTMM] = {}
    for K, path in banks.items():
        load = []
        for _ in range(args.load_repeats):
            engines.pop(K, None)
            settle()
            before = rss()
            start = time.perf_counter()
            bank = Bank.load(path)
            engines[K] = TTMM(
                model, tokenizer, encoder, bank, routing=routing, adapter_cache_mb=args.cache_mb
            )
            load.append(time.perf_counter() - start)
            del bank
        settle()
        rows[K]["load_s"] = statistics.median(load)
        rows[K]["rss_over_base_mb"] = (rss() - before) / MB
    return engines


def route_phase(engines: dict[int, TTMM], encoder: Encoder, prompts, rows) -> None:
    """Route one prompt, and the product C q alone; the K interleaved prompt by prompt."""
    samples = {K: {"route": [], "product": [], "topk": []} for K in engines}
    for engine in engines.values():
        engine.route(prompts[:1])
    for prompt in prompts:
        for K, engine in engines.items():
            samples[K]["route"].append(seconds(engine.route, [prompt]))
        query = torch.from_numpy(encoder.encode(next(iter(engines.values())).query_texts([prompt])))
        for K, engine in engines.items():
            index = engine.index
            samples[K]["product"].append(per_call_seconds(20, index.scores, query))
            samples[K]["topk"].append(per_call_seconds(20, index.nearest, query, ACTIVE))
    for K, by_what in samples.items():
        for what, values in by_what.items():
            rows[K][f"{what}_ms"] = 1e3 * statistics.median(values)


def merge_phase(engines: dict[int, TTMM], args, rows) -> None:
    """Cold and hot folds of 10 experts, and the disk read of their files; the K interleaved
    repeat by repeat."""
    plans, files = {}, {}
    for K, engine in engines.items():
        fold(engine, RoutingPlan.explicit({0: 1.0}))  # allocates the fold's buffers
        rng = np.random.default_rng(args.seed + K)  # 10 experts never read before
        ids = sorted(int(k) for k in rng.choice(np.arange(1, K), size=ACTIVE, replace=False))
        plans[K] = RoutingPlan.explicit(dict.fromkeys(ids, 1.0 / ACTIVE))
        files[K] = expert_files(engine.bank, ids)
        rows[K]["merge_bytes_on_disk"] = sum(p.stat().st_size for p in files[K])

    def cold_start(K: int) -> None:
        engines[K].merger.experts.clear()
        drop_page_cache(files[K])

    samples = {K: {"cold": [], "disk_read": [], "page_cache_read": [], "hot": []} for K in engines}
    for K, engine in engines.items():  # the experts' first read checks their files' sha256
        cold_start(K)
        rows[K]["cold_first_ms"] = 1e3 * seconds(fold, engine, plans[K])
    read_before = {K: e.merger.experts.stats.read_seconds for K, e in engines.items()}
    for _ in range(args.repeats):
        for K, engine in engines.items():
            cold_start(K)
            samples[K]["cold"].append(seconds(fold, engine, plans[K]))
    for K, engine in engines.items():
        read = engine.merger.experts.stats.read_seconds - read_before[K]
        rows[K]["cold_read_layout_ms"] = 1e3 * read / args.repeats
    for _ in range(args.repeats):
        for K in engines:
            drop_page_cache(files[K])
            samples[K]["disk_read"].append(seconds(read_files, files[K]))
    for _ in range(args.repeats):
        for K in engines:
            samples[K]["page_cache_read"].append(seconds(read_files, files[K]))
    for K, engine in engines.items():
        fold(engine, plans[K])
    for _ in range(HOT_REPEATS):
        for K, engine in engines.items():
            samples[K]["hot"].append(seconds(fold, engine, plans[K]))
    for K, by_what in samples.items():
        row = rows[K]
        for what, values in by_what.items():
            row[f"{what}_ms"] = 1e3 * statistics.median(values)
        row["route_hot_merge_ms"] = row["route_ms"] + row["hot_ms"]
        row["cold_target_ms"] = row["disk_read_ms"] + row["hot_ms"]
        row["cold_meets_target"] = row["cold_ms"] <= row["cold_target_ms"]


def serve_phase(engines: dict[int, TTMM], args, rows) -> float:
    """A stream of prompts, one at a time, each with a merge of 3 experts drawn from a Zipf
    law over the K experts, from an empty cache; the K (and the base model alone, on the
    first engine) interleaved prompt by prompt. Returns the base model's tokens/s."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.serve_prompts)]
    plans = {K: zipf_plans(K, len(prompts), args.seed + 1) for K in engines}
    before = {}
    for K, engine in engines.items():
        cache = engine.merger.experts
        cache.clear()
        used = sorted({k for plan in plans[K] for k in plan.expert_ids})
        drop_page_cache(expert_files(engine.bank, used))
        before[K] = (cache.stats.hits, cache.stats.misses)
        rows[K]["serve_distinct_experts"] = len(used)
    took = dict.fromkeys(engines, 0.0)
    tokens = dict.fromkeys(engines, 0)
    found = dict.fromkeys(engines, 0)  # the plans' experts the cache held when they came
    needed = dict.fromkeys(engines, 0)
    base = [0.0, 0]
    first = next(iter(engines.values()))
    for i, prompt in enumerate(prompts):
        seconds_, n = generate_one(first, prompt, RoutingPlan.explicit(None))
        base[0] += seconds_
        base[1] += n
        for K, engine in engines.items():
            held = engine.merger.experts
            found[K] += sum(k in held for k in plans[K][i].expert_ids)
            needed[K] += len(plans[K][i].expert_ids)
            seconds_, n = generate_one(engine, prompt, plans[K][i])
            took[K] += seconds_
            tokens[K] += n
    for K, engine in engines.items():
        cache = engine.merger.experts
        hits, misses = cache.stats.hits - before[K][0], cache.stats.misses - before[K][1]
        row = rows[K]
        row["serve_tokens_per_s"] = tokens[K] / took[K]
        row["serve_hit_rate"] = found[K] / needed[K]
        # the cache's own count: the engine's ``auto`` mode gets each plan's experts twice
        # (``plan_rank``, then the merge), so a miss is followed by a hit it counts too
        row["serve_cache_stats_hit_rate"] = hits / max(hits + misses, 1)
        row["serve_cache_misses"] = misses
        row["cache_peak_mb"] = cache.stats.peak_bytes / MB
        row["cache_after_serve_mb"] = cache.nbytes / MB
        row["fold_buffers_mb"] = engine.merger.buffer_bytes / MB
        row["expert_mb_laid_out"] = cache.sizes[0] / MB
    base_tps = base[1] / base[0]
    for row in rows.values():
        row["serve_vs_base"] = row["serve_tokens_per_s"] / base_tps
    return base_tps


def release_phase(engines: dict[int, TTMM], args, rows) -> None:
    """What each engine held after serving: the RSS its release hands back (the last built
    first)."""
    for K in reversed(list(engines)):
        settle()
        before = rss()
        del engines[K]
        settle()
        row = rows[K]
        row["rss_after_serve_mb"] = (before - rss()) / MB
        row["rss_target_mb"] = args.cache_mb + 100
        row["rss_meets_target"] = row["rss_over_base_mb"] <= row["rss_target_mb"]


# -- report --------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    first = rows[0]
    for row in rows:
        for key in ("load_s", "route_ms", "product_ms", "hot_ms", "cold_ms", "route_hot_merge_ms"):
            row[f"{key}_ratio"] = row[key] / first[key]
        row["serve_tokens_per_s_ratio"] = row["serve_tokens_per_s"] / first["serve_tokens_per_s"]
        row["route_hot_merge_meets_target"] = row["route_hot_merge_ms_ratio"] <= 1.2
        row["targets_missed"] = [
            what
            for what, ok in (
                ("RSS at rest <= cache + 100 MB", row["rss_meets_target"]),
                ("cold <= disk read + hot", row["cold_meets_target"]),
                ("route + hot <= 1.2x", row["route_hot_merge_meets_target"]),
            )
            if not ok
        ]


def tables(rows: list[dict], base_tps: float, cache_mb: float) -> list[Table]:
    ref = rows[0]["K"]
    times = Table(title=f"route and merge of {ACTIVE} experts (ms; ratios against K = {ref})")
    for column in (
        "K", "load s", "route", "C q", "C q + top-k", "hot merge", "route + hot",
        "× K=" + str(ref), "cold (1st read)", "cold", "disk read", "disk + hot", "cold ok",
    ):  # fmt: skip
        times.add_column(column, justify="right")
    for r in rows:
        times.add_row(
            f"{r['K']:,}",
            f"{r['load_s']:.2f}",
            f"{r['route_ms']:.2f}",
            f"{r['product_ms']:.3f}",
            f"{r['topk_ms']:.3f}",
            f"{r['hot_ms']:.1f}",
            f"{r['route_hot_merge_ms']:.1f}",
            f"{r['route_hot_merge_ms_ratio']:.2f}×",
            f"{r['cold_first_ms']:.1f}",
            f"{r['cold_ms']:.1f}",
            f"{r['disk_read_ms']:.1f}",
            f"{r['cold_target_ms']:.1f}",
            "yes" if r["cold_meets_target"] else "NO",
        )
    memory = Table(
        title=f"memory (MB of RSS an engine adds to the base model + encoder) and serving "
        f"({NEW_TOKENS} tokens a prompt; base model alone {base_tps:.1f} tokens/s)"
    )
    for column in (
        "K", "at rest", f"≤ {cache_mb:g}+100", "after serving", "cache held", "cache peak",
        "fold buffers", "tokens/s", "× base", "hit rate", "experts used",
    ):  # fmt: skip
        memory.add_column(column, justify="right")
    for r in rows:
        memory.add_row(
            f"{r['K']:,}",
            f"{r['rss_over_base_mb']:.0f}",
            "yes" if r["rss_meets_target"] else "NO",
            f"{r['rss_after_serve_mb']:.0f}",
            f"{r['cache_after_serve_mb']:.0f}",
            f"{r['cache_peak_mb']:.0f}",
            f"{r['fold_buffers_mb']:.0f}",
            f"{r['serve_tokens_per_s']:.1f}",
            f"{r['serve_vs_base']:.2f}",
            f"{r['serve_hit_rate']:.0%}",
            str(r["serve_distinct_experts"]),
        )
    return [times, memory]


def plot(rows: list[dict], path: Path, title: str, cache_mb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    K = [r["K"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (
        ("route_ms", "route (1 prompt)", "o-"),
        ("hot_ms", f"merge of {ACTIVE}, cached", "s-"),
        ("cold_ms", f"merge of {ACTIVE}, from disk", "^-"),
        ("disk_read_ms", f"disk read of {ACTIVE} experts", "v--"),
        ("product_ms", "C q alone", "x:"),
    ):
        left.plot(K, [r[key] for r in rows], style, label=label)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("experts in the bank (K)")
    left.set_ylabel("ms")
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    right.plot(K, [r["rss_over_base_mb"] for r in rows], "o-", label="at rest")
    right.plot(
        K,
        [r["rss_after_serve_mb"] for r in rows],
        "s-",
        label="after serving (cache + fold buffers)",
    )
    right.axhline(
        cache_mb + 100, color="grey", linestyle=":", label="target at rest: cache budget + 100 MB"
    )
    right.set_xscale("log")
    right.set_xlabel("experts in the bank (K)")
    right.set_ylabel("RSS over base model + encoder (MB)")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    for axis in (left, right):
        axis.set_xticks(K, [f"{k:,}" for k in K])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--experts",
        default="16,1000,10000",
        help="bank sizes K, comma-separated (first: ratios' reference)",
    )
    parser.add_argument("--quick", action="store_true", help="K = 16,1000 and fewer prompts")
    parser.add_argument(
        "--work", type=Path, default=None, help="banks' folder (default: $TTMM_HOME/scale)"
    )
    parser.add_argument("--cache-mb", type=float, default=512.0, help="adapter cache budget (MB)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=20, help="prompts routed (at most 20)")
    parser.add_argument("--serve-prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="cold merges and disk reads")
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale" / "scale.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.experts = "16,1000"
        args.prompts, args.repeats, args.load_repeats = 8, 3, 2
    Ks = [int(k.replace("_", "")) for k in args.experts.split(",")]
    if any(k < ACTIVE + 1 for k in Ks):
        parser.error(f"every K must be at least {ACTIVE + 1} (a merge of {ACTIVE} fresh experts)")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must lie in [1, {len(PROMPTS)}]")
    work = args.work or ttmm_home() / "scale"
    torch.set_num_threads(args.threads)
    console = Console(width=160)

    model, tokenizer = load_base_model(DEFAULT_BASE_MODEL, device="cpu")
    encoder = Encoder(device="cpu")
    banks = {K: work / f"k{K}" for K in Ks}
    for K, path in banks.items():
        console.print(f"k{K}: {ensure_bank(path, K, model, encoder, args.seed, console)} ({path})")

    # warm up encoding, routing and decoding; then the RSS of the base model and encoder
    # alone, what every K's memory is measured over
    engine = TTMM(
        model, tokenizer, encoder, Bank.load(banks[Ks[0]]), adapter_cache_mb=args.cache_mb
    )
    engine.route(PROMPTS[:2])
    generate_one(engine, PROMPTS[0], RoutingPlan.explicit(None))
    del engine
    settle()
    rss_base = rss()
    by_K = {K: {"K": K, "bank": str(path)} for K, path in banks.items()}
    console.print("building the engines ...")
    engines = build_phase(model, tokenizer, encoder, banks, args, by_K)
    console.print("routing ...")
    route_phase(engines, encoder, PROMPTS[: args.prompts], by_K)
    console.print("merging ...")
    merge_phase(engines, args, by_K)
    console.print("serving ...")
    base_tps = serve_phase(engines, args, by_K)
    release_phase(engines, args, by_K)
    rows = list(by_K.values())
    add_ratios(rows)
    for table in tables(rows, base_tps, args.cache_mb):
        console.print(table)
    misses = [
        f"K = {r['K']:,}: {', '.join(r['targets_missed'])}" for r in rows if r["targets_missed"]
    ]
    console.print("targets missed: " + ("; ".join(misses) if misses else "none"))

    result = {
        "benchmark": "scale",
        "command": " ".join(sys.argv),
        "quick": args.quick,
        "machine": {
            "device": "cpu",
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "memory_gb": psutil.virtual_memory().total / 2**30,
        },
        "base_model": DEFAULT_BASE_MODEL,
        "encoder": encoder.name,
        "rank": RANK,
        "alpha": ALPHA,
        "disk_dtype": "bfloat16",
        "factors_dtype": str(model.dtype),
        "active": ACTIVE,
        "serve": {
            "prompts": args.serve_prompts,
            "new_tokens": NEW_TOKENS,
            "experts_per_plan": SERVE_ACTIVE,
            "zipf_a": ZIPF_A,
            "base_tokens_per_s": base_tps,
        },
        "cache_mb": args.cache_mb,
        "rss_base_mb": rss_base / MB,
        "targets": {
            "rss_over_base_mb": f"<= cache_mb + 100 ({args.cache_mb + 100:g})",
            "cold_ms": "<= disk_read_ms + hot_ms",
            "route_hot_merge_ms_ratio": "<= 1.2 (against the first K)",
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    title = (
        f"SmolLM2-135M, r = {RANK}, {ACTIVE}-expert merges, cache {args.cache_mb:g} MB, "
        f"{torch.get_num_threads()} thread(s)"
    )
    plot(rows, args.out.with_suffix(".png"), title, args.cache_mb)
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
