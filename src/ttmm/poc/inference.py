"""What every answer costs: memory and batched throughput measured in a fresh process, and the
conversion of seconds into money.

Single-stream cost (seconds per 100 tokens, × base) comes from the evaluation's timing, where
every method is timed side by side in one process (:mod:`ttmm.eval.harness`). This module adds
what a server sees: a fresh process loads the bank's engine (so its memory is the engine's
alone, not the build's), reads its resident memory at rest, then generates a batch of prompts
(their first P tokens, the routing prefix) with each method (the base model; the fine-tuning
adapter folded; TTMM with every row routed and merged on its own, low-rank), twice,
interleaved, while a thread samples the resident memory every 20 ms: the peak is the largest
sample (and, on a GPU, the allocator's peak).

Money: ``cost per million tokens = price_per_hour / 3600 · seconds per token · 10⁶``, and a
day's cost is that times the tokens a day over a million.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

logger = logging.getLogger(__name__)

BATCH = 8
"""Prompts generated together when measuring throughput."""
BATCH_TOKENS = 32
"""Tokens each prompt of the batch generates."""
REPEATS = 2
"""Interleaved repetitions of each method's batch (the median is kept)."""
BATCH_METHODS = ("base", "finetune", "ttmm")


def cost_per_million(seconds_per_token: float, price_per_hour: float | None) -> dict:
    """Machine-hours and (with a price) money per million generated tokens."""
    hours = seconds_per_token * 1e6 / 3600.0
    return {
        "machine_hours_per_million": hours,
        "cost_per_million": None if price_per_hour is None else hours * price_per_hour,
    }


def daily_cost(cost_per_million_tokens: float | None, tokens_per_day: int) -> float | None:
    return (
        None if cost_per_million_tokens is None else cost_per_million_tokens * tokens_per_day / 1e6
    )


class _MemorySampler:
    """The largest resident set size seen while it runs (a thread polling psutil)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> _MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure_serving(
    bank: str, prompts: Sequence[str], device: str, dtype: str, threads: int | None = None
) -> dict:
    """In this process: load the bank's engine, then measure memory and batched throughput
    (run it in a fresh process: :func:`measure_serving_in_subprocess`)."""
    import psutil
    import torch

    from ttmm.device import synchronize
    from ttmm.merge import ExpertMerger
    from ttmm.model import TTMM
    from ttmm.routing import RoutingPlan

    if threads:
        torch.set_num_threads(threads)
    process = psutil.Process()
    before = process.memory_info().rss
    engine = TTMM.from_bank(bank, device=device, dtype=dtype)
    rest = process.memory_info().rss
    finetune = engine.bank.finetune_adapter()
    folder = ExpertMerger(engine.model, [finetune]) if finetune is not None else None
    rows = engine.query_texts(list(prompts[:BATCH]))  # each cut to its routing prefix
    rows = (rows * BATCH)[:BATCH]  # too few prompts: repeat them
    base_plans = [RoutingPlan.base()] * len(rows)
    routed = engine.route(rows)

    def run(method: str) -> float:
        synchronize(engine.device)
        started = time.perf_counter()
        options = {"max_new_tokens": BATCH_TOKENS, "min_new_tokens": BATCH_TOKENS}
        if method == "ttmm":
            engine.generate(rows, plans=routed, mode="lowrank", **options)
        elif method == "finetune":
            with engine.lock, folder.fold(RoutingPlan.explicit({0: 1.0})):
                engine.generate(rows, plans=base_plans, **options)
        else:
            engine.generate(rows, plans=base_plans, **options)
        synchronize(engine.device)
        return time.perf_counter() - started

    methods = [m for m in BATCH_METHODS if m != "finetune" or folder is not None]
    run("base")  # warm-up
    if device_is_cuda := engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    with _MemorySampler() as sampler:
        for _ in range(REPEATS):
            for method in methods:
                seconds[method].append(run(method))
    tokens = BATCH * BATCH_TOKENS
    base = statistics.median(seconds["base"])
    batch = {
        m: {
            "seconds": statistics.median(s),
            "tokens_per_second": tokens / statistics.median(s),
            "ratio_to_base": base / statistics.median(s),
        }
        for m, s in seconds.items()
    }
    return {
        "batch_size": BATCH,
        "new_tokens": BATCH_TOKENS,
        "repeats": REPEATS,
        "distinct_merges": len({p.key() for p in routed}),
        "batch": batch,
        "rss_before_load_bytes": before,
        "rss_at_rest_bytes": rest,
        "rss_peak_bytes": max(sampler.peak, rest),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(engine.device)
        if device_is_cuda
        else None,
        "torch_threads": torch.get_num_threads(),
    }


def measure_serving_in_subprocess(
    bank: str, prompts: Sequence[str], device: str, dtype: str, threads: int | None = None
) -> dict:
    """:func:`measure_serving` in a fresh (spawned) process, so that the memory it reports is
    the engine's and nothing else's."""
    from concurrent.futures.process import BrokenProcessPool

    from ttmm.poc.config import PocError

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(
                measure_serving, bank, list(prompts), device, dtype, threads
            ).result()
        except BrokenProcessPool as err:
            raise PocError(
                "the process measuring memory and throughput died before it finished (out of "
                "memory?); free memory and rerun the same command to resume from this stage"
            ) from err
