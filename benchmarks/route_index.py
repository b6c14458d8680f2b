"""Where routing's nearest experts are found faster by a faiss index than by the product (issue
21): the crossover behind ``ttmm.centroid_index.INDEX_MIN_EXPERTS``.

``top_n`` routing needs each prompt's n highest scores z = C q among K unit centroids. The
engine takes them from one product and ``torch.topk`` (``CentroidIndex.nearest`` below the
crossover) or from an exact inner-product index (``faiss.IndexFlatIP``) above it. Both are
timed here on random unit centroids of the encoder's dimension (384), for batches of 1, 8 and
32 prompts, one thread each (as the engine routes: ``torch.set_num_threads`` and faiss' OpenMP
threads both set to ``--threads``), the two methods interleaved repeat by repeat so that a
machine whose load drifts slows both alike. Both must return the same experts (checked).

    .venv/bin/python benchmarks/route_index.py [--experts 1000,5000,10000,20000,50000,100000]

Prints a table (median ms per batch, and faiss / product) and writes
``benchmarks/results/route_index.json``: per batch size, the smallest K from which faiss is
faster at every larger K measured, against the engine's ``INDEX_MIN_EXPERTS`` and
``INDEX_MAX_QUERIES``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import faiss
import torch
from rich.console import Console
from rich.table import Table

from ttmm.centroid_index import INDEX_MAX_QUERIES, INDEX_MIN_EXPERTS, CentroidIndex

HERE = Path(__file__).resolve().parent
DIM = 384  # all-MiniLM-L6-v2's embeddings
BATCHES = (1, 2, 4, 8, 32)


def unit_rows(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, DIM, generator=generator), dim=1)


def time_ms(fn, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - start))
    return samples


def measure(K: int, n: int, m: int, repeats: int, generator: torch.Generator) -> dict:
    centroids, queries = unit_rows(K, generator), unit_rows(n, generator)
    product = CentroidIndex(centroids, index_min_experts=K + 1)
    index = CentroidIndex(centroids, index_min_experts=1, index_max_queries=n)
    start = time.perf_counter()
    index.nearest(queries, m)  # builds the faiss index once, as an engine does on first use
    build_ms = 1e3 * (time.perf_counter() - start)
    _, ids_product = product.nearest(queries, m)
    _, ids_index = index.nearest(queries, m)
    same = bool(torch.equal(ids_product.sort(dim=1).values, ids_index.sort(dim=1).values))
    by_method = {"product": [], "faiss": []}
    for _ in range(repeats):  # interleaved
        by_method["product"] += time_ms(lambda: product.nearest(queries, m), 1)
        by_method["faiss"] += time_ms(lambda: index.nearest(queries, m), 1)
    row = {"K": K, "batch": n, "m": m, "same_experts": same, "faiss_build_ms": build_ms}
    for method, samples in by_method.items():
        row[f"{method}_ms"] = statistics.median(samples)
    row["faiss_over_product"] = row["faiss_ms"] / row["product_ms"]
    return row


def crossovers(rows: list[dict]) -> dict[str, int | None]:
    """Per batch size, the smallest K from which faiss is faster at every larger K measured."""
    found = {}
    for n in sorted({r["batch"] for r in rows}):
        by_K = sorted((r for r in rows if r["batch"] == n), key=lambda r: r["K"])
        faster_from = None
        for r in reversed(by_K):
            if r["faiss_over_product"] >= 1:
                break
            faster_from = r["K"]
        found[str(n)] = faster_from
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", default="1000,5000,10000,20000,50000,100000")
    parser.add_argument("--m", type=int, default=10, help="experts kept (top_n's n)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "route_index.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    Ks = [int(k.replace("_", "")) for k in args.experts.split(",")]
    rows = [measure(K, n, args.m, args.repeats, generator) for K in Ks for n in BATCHES]

    table = Table(title=f"top {args.m} of K centroids (dim {DIM}), median ms per batch")
    for column in ("K", "batch", "product", "faiss", "faiss / product", "same experts"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            f"{r['K']:,}", str(r["batch"]), f"{r['product_ms']:.2f}", f"{r['faiss_ms']:.2f}",
            f"{r['faiss_over_product']:.2f}", "yes" if r["same_experts"] else "NO",
        )  # fmt: skip
    console = Console(width=120)
    console.print(table)
    found = crossovers(rows)
    console.print(
        "faiss faster from K = "
        + ", ".join(f"{k if k else 'never'} (batch {n})" for n, k in found.items())
        + f"; the engine searches the index from K = {INDEX_MIN_EXPERTS:,} for batches of at "
        f"most {INDEX_MAX_QUERIES} queries"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "benchmarks/route_index.py " + " ".join(argv or []),
                "machine": {"processor": platform.processor(), "threads": args.threads},
                "index_min_experts": INDEX_MIN_EXPERTS,
                "index_max_queries": INDEX_MAX_QUERIES,
                "faiss_faster_from": found,
                "rows": rows,
            },
            indent=2,
        )
    )
    console.print(f"wrote {args.out}")
    return 0 if all(r["same_experts"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
