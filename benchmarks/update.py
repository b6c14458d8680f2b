"""Growing a bank (issue 22): a bank built on Wikipedia alone, updated with CPython's standard
library by ``ttmm update``, against a bank built on both corpora from scratch.

    .venv/bin/python benchmarks/update.py [--wiki 400] [--stdlib 300] [--experts 8]
                                          [--budget 30000] [--docs 60] [--work DIR]

Three banks of SmolLM2-135M experts under ``--work`` (each resumable, reused when done):

- ``prose``: K experts on ``wiki@N`` for a budget of B training tokens;
- ``updated``: ``prose`` updated with ``stdlib@M`` (the update's defaults: replay 1.0, novelty
  quantile 0.05), which adds code experts and retrains the prose experts that got code chunks;
- ``scratch``: both corpora from scratch with as many experts as ``updated`` has and the same
  training tokens per data token as ``prose`` (B times the two corpora's chunk tokens over
  Wikipedia's), so the two ways of reaching a prose + code bank get the same training density.

Every bank splits documents by a hash of their id, so the three hold out the same documents
(the prose bank never saw the code at all).
Each is scored with its default routing (TTMM) on up to ``--docs`` held-out documents of each
domain (chosen as the evaluation harness does: seeded order, enough tokens after the 50-token
routing prefix), up to 512 tokens each after the prefix, and the base model
on the same documents; perplexities with 95 % paired bootstrap intervals over documents. *Gap
closed* on code is (ppl_prose − ppl_updated) / (ppl_prose − ppl_scratch). Cost: the update's
and the scratch build's training tokens and wall time, from their manifests.

Prints the table and writes ``benchmarks/results/update.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ttmm.assets import ttmm_home
from ttmm.bank import Bank
from ttmm.build.budget import data_tokens
from ttmm.build.chunks import read_chunks, read_test_documents
from ttmm.build.config import BuildConfig
from ttmm.build.pipeline import run_build
from ttmm.build.train import LoraTrainConfig
from ttmm.build.update import UpdateOptions, run_update
from ttmm.eval.documents import select_documents
from ttmm.eval.harness import EvalConfig
from ttmm.eval.intervals import draw, paired_difference, perplexity_interval
from ttmm.model import TTMM
from ttmm.routing import RoutingPlan

HERE = Path(__file__).resolve().parent
RESAMPLES = 2000
MAX_TOKENS = 512


def build_banks(args, console) -> dict[str, Path]:
    work = args.work or ttmm_home() / "update-benchmark"
    paths = {name: work / name for name in ("prose", "updated", "scratch")}
    train = LoraTrainConfig(num_threads=args.threads)
    prose = BuildConfig(
        corpora=(f"wiki@{args.wiki}",), experts=args.experts, budget_tokens=args.budget,
        train=train, with_finetune=False,
    )  # fmt: skip
    console.print(f"prose: {len(prose.corpora)} corpus, K = {args.experts}, {args.budget} tokens")
    run_build(prose, paths["prose"], progress=not args.no_progress)
    options = UpdateOptions(corpora=(f"stdlib@{args.stdlib}",))
    console.print(f"updated: prose + {options.corpora[0]}")
    run_update(paths["prose"], options, paths["updated"], progress=not args.no_progress)
    updated = Bank.load(paths["updated"])
    wiki_tokens = data_tokens([c.token_ids for c in read_chunks(paths["prose"])[0]], train)
    both_tokens = data_tokens([c.token_ids for c in read_chunks(paths["updated"])[0]], train)
    scratch = BuildConfig(
        corpora=(*prose.corpora, *options.corpora), experts=updated.num_experts,
        budget_tokens=round(args.budget * both_tokens / wiki_tokens), train=train,
    )  # fmt: skip
    console.print(f"scratch: K = {scratch.experts}, {scratch.budget_tokens} tokens")
    run_build(scratch, paths["scratch"], progress=not args.no_progress)
    return paths


def held_out(paths: dict[str, Path], tokenizer, docs: int) -> dict[str, list]:
    """The documents both prose + code banks hold out (the prose bank holds out the same
    Wikipedia documents and never saw the code), chosen as the evaluation harness chooses:
    per domain, in its seeded order, the first ``docs`` with tokens to score after the prefix."""
    by_bank = [{d.id: d for d in read_test_documents(paths[n])} for n in ("updated", "scratch")]
    shared = [doc for doc_id, doc in by_bank[0].items() if doc_id in by_bank[1]]
    chosen = select_documents(shared, tokenizer, EvalConfig(docs=docs))
    out: dict[str, list] = {}
    for doc in chosen:
        out.setdefault(doc.domain, []).append(doc)
    return out


def scores(engine: TTMM, texts: list[str], base: bool) -> tuple[np.ndarray, np.ndarray]:
    plans = [RoutingPlan.base()] * len(texts) if base else None
    found = engine.score(texts, max_tokens=MAX_TOKENS, plans=plans)
    return np.array([s.nll for s in found]), np.array([s.n_tokens for s in found])


def cost(path: Path) -> dict:
    manifest = Bank.load(path, verify=False).manifest
    if manifest.lineage:
        changed = manifest.lineage["added"] + manifest.lineage["retrained"]
        trained = [manifest.experts[k] for k in changed]
        seconds = manifest.lineage["total_seconds"]
        train_seconds = manifest.lineage["stage_seconds"]["train"]
    else:
        trained = manifest.experts
        seconds = manifest.build["total_seconds"]
        train_seconds = manifest.build["stage_seconds"]["train"]
    return {
        "experts": len(manifest.experts),
        "experts_trained": len(trained),
        "training_tokens": sum(e.n_tokens for e in trained),
        "seconds": seconds,
        "train_seconds": train_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wiki", type=int, default=400, help="Wikipedia articles")
    parser.add_argument("--stdlib", type=int, default=300, help="standard-library modules")
    parser.add_argument("--experts", type=int, default=8, help="K of the prose bank")
    parser.add_argument("--budget", type=int, default=30_000, help="prose bank's tokens")
    parser.add_argument("--docs", type=int, default=60, help="held-out documents a domain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "update.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=140)
    paths = build_banks(args, console)

    engines = dict(zip(paths, TTMM.from_banks(list(paths.values()), device="cpu"), strict=True))
    lineage = Bank.load(paths["updated"]).manifest.lineage
    result = {
        "benchmark": "update",
        "command": " ".join(sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "threads": args.threads,
            "torch": torch.__version__,
        },  # fmt: skip
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "lineage": {k: lineage[k] for k in ("added", "retrained", "unchanged", "novelty")},
        "cost": {name: cost(path) for name, path in paths.items()},
        "domains": {},
    }
    table = Table(title="held-out perplexity (TTMM, each bank's default routing) [95% interval]")
    for column in ("domain", "docs", "base", "prose", "updated", "scratch", "updated − scratch",
                   "prose − scratch", "gap closed"):  # fmt: skip
        table.add_column(column, justify="right")
    tokenizer = engines["prose"].tokenizer
    for domain, docs in held_out(paths, tokenizer, args.docs).items():
        texts, ids = [d.text for d in docs], [d.id for d in docs]
        rows = draw(ids, RESAMPLES, seed=0)
        measured = {"base": scores(engines["prose"], texts, base=True)}
        for name, engine in engines.items():
            console.print(f"scoring {domain} with {name} ...")
            measured[name] = scores(engine, texts, base=False)
        ppl = {name: perplexity_interval(*m, rows) for name, m in measured.items()}
        upd = paired_difference(*measured["updated"], *measured["scratch"], rows)
        old = paired_difference(*measured["prose"], *measured["scratch"], rows)
        value = {name: e.value for name, e in ppl.items()}
        gap = (value["prose"] - value["updated"]) / (value["prose"] - value["scratch"])
        result["domains"][domain] = {
            "documents": ids,
            "perplexity": {name: vars(e) for name, e in ppl.items()},
            "updated_minus_scratch": vars(upd),
            "prose_minus_scratch": vars(old),
            "gap_closed": gap,
        }
        table.add_row(
            domain, str(len(docs)),
            *(f"{ppl[n].value:.3f}" for n in ("base", "prose", "updated", "scratch")),
            *(f"{e.value:+.3f} [{e.ci_low:+.3f}, {e.ci_high:+.3f}]" for e in (upd, old)),
            f"{gap:.0%}",
        )  # fmt: skip
    console.print(table)
    costs = Table(title="cost")
    for column in ("bank", "experts", "trained", "training tokens", "train s", "total s"):
        costs.add_column(column, justify="right")
    for name, c in result["cost"].items():
        costs.add_row(name, str(c["experts"]), str(c["experts_trained"]),
                      str(c["training_tokens"]), f"{c['train_seconds']:.0f}",
                      f"{c['seconds']:.0f}")  # fmt: skip
    console.print(costs)
    console.print(
        f"update: added {lineage['added']}, retrained {lineage['retrained']}, "
        f"{lineage['unchanged']} unchanged"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
