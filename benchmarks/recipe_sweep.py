"""A small recorded sweep of the LoRA training recipe (issue 10, design notes §7).

One factor at a time from a base point (lr 1e-3, constant, batch 1, rank 8, 1 epoch): lr 3e-4
and 3e-3, warm-up + cosine, batch 4, rank 16, 2 epochs; for the fine-tuning adapter (a seeded
slice of all training chunks) and for one expert (the cluster, of K, holding the most validation
chunks), each on about ``--data-tokens`` training tokens (twice that at 2 epochs), on the
default model and corpora. The validation chunks come from the build's own validation split
of the training documents (never the held-out evaluation documents); validation loss is the
mean NLL per token, before (the base model) and after training.

    .venv/bin/python benchmarks/recipe_sweep.py --threads 1

Prints a table and writes ``benchmarks/results/recipe_sweep.json`` after every run, so a killed
sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ttmm.assets import DEFAULT_BASE_MODEL, load_base_model
from ttmm.build.config import BuildConfig
from ttmm.build.pipeline import StageTimer, _prepare, embedding_cache
from ttmm.build.train import LoraTrainConfig, mean_nll, train_lora
from ttmm.embed import Encoder
from ttmm.merge import ExpertMerger
from ttmm.routing import RoutingPlan

OUT = Path(__file__).resolve().parent / "results" / "recipe_sweep.json"
BASE = {"learning_rate": 1e-3, "schedule": "constant", "batch_size": 1, "rank": 8, "epochs": 1}
VARIANTS = {
    "base": {},
    "lr 3e-4": {"learning_rate": 3e-4},
    "lr 3e-3": {"learning_rate": 3e-3},
    "warmup+cosine": {"schedule": "cosine", "warmup_fraction": 0.1},
    "batch 4": {"batch_size": 4},
    "rank 16": {"rank": 16, "alpha": 32.0},
    "epochs 2": {"epochs": 2},
}


def _slice(chunks: list, tokens: int, seed: int) -> list:
    """A seeded subset of chunks holding about ``tokens`` tokens."""
    order = list(range(len(chunks)))
    random.Random(seed).shuffle(order)
    kept, total = [], 0
    for i in order:
        if total >= tokens:
            break
        kept.append(chunks[i])
        total += len(chunks[i])
    return kept


def _val_after(model, adapter, validation, pad_id) -> float:
    with ExpertMerger(model, [adapter]).fold(RoutingPlan.explicit({0: 1.0})):
        return mean_nll(model, validation, pad_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-tokens", type=int, default=4000)
    parser.add_argument("--val-chunks", type=int, default=12)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()

    config = BuildConfig(experts=args.experts, validation_fraction=0.15).resolved()
    model, tokenizer = load_base_model(DEFAULT_BASE_MODEL, dtype="float32")
    encoder = Encoder(config.encoder, cache_dir=embedding_cache())
    prepared = _prepare(config, tokenizer, encoder, StageTimer(), progress=False)
    pad_id = tokenizer.pad_token_id
    counts = np.bincount(prepared.val_assignments, minlength=args.experts)
    expert = int(np.argmax(counts))
    train_ids = [c.token_ids for c in prepared.chunks]
    targets = {
        "finetune": (
            _slice(train_ids, args.data_tokens, seed=0),
            _slice([c.token_ids for c in prepared.validation], 10**9, seed=1)[: args.val_chunks],
        ),
        f"expert {expert}": (
            _slice(
                [train_ids[i] for i in np.flatnonzero(prepared.assignments == expert)],
                args.data_tokens,
                seed=0,
            ),
            [
                prepared.validation[i].token_ids
                for i in np.flatnonzero(prepared.val_assignments == expert)
            ][: args.val_chunks],
        ),
    }
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if results.get("setting", {}).get("data_tokens") != args.data_tokens:
        results = {}
    results.setdefault(
        "setting",
        {
            "model": DEFAULT_BASE_MODEL,
            "corpora": list(config.corpora),
            "experts": args.experts,
            "data_tokens": args.data_tokens,
            "threads": args.threads,
            "base": BASE,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        },
    )
    runs = results.setdefault("runs", {})
    for target, (chunks, validation) in targets.items():
        before = mean_nll(model, validation, pad_id)
        for name, change in VARIANTS.items():
            key = f"{target} | {name}"
            if key in runs:
                continue
            recipe = LoraTrainConfig(**{**BASE, **change}, num_threads=args.threads)
            started = time.perf_counter()
            result = train_lora(model, chunks, recipe, seed=0, pad_token_id=pad_id)
            runs[key] = {
                "target": target,
                "variant": name,
                "recipe": {k: v for k, v in recipe.to_dict().items() if k != "num_threads"},
                "train_chunks": len(chunks),
                "val_chunks": len(validation),
                "tokens": result.n_tokens,
                "steps": len(result.losses),
                "train_seconds": round(result.train_seconds, 2),
                "tokens_per_second": round(result.tokens_per_second, 1),
                "val_before": round(before, 4),
                "val_after": round(_val_after(model, result.adapter, validation, pad_id), 4),
                "wall_seconds": round(time.perf_counter() - started, 2),
            }
            console.print(key, runs[key]["val_before"], "->", runs[key]["val_after"])
            staging = args.out.with_suffix(".tmp")
            staging.write_text(json.dumps(results, indent=1))
            os.replace(staging, args.out)
    table = Table(title=f"recipe sweep ({args.data_tokens} data tokens, {args.threads} thread)")
    for column in ("adapter", "variant", "tokens", "tok/s", "val before", "val after", "gain"):
        table.add_column(column, justify="left" if column in ("adapter", "variant") else "right")
    for run in runs.values():
        table.add_row(
            run["target"],
            run["variant"],
            str(run["tokens"]),
            f"{run['tokens_per_second']:.0f}",
            f"{run['val_before']:.4f}",
            f"{run['val_after']:.4f}",
            f"{run['val_before'] - run['val_after']:+.4f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
