"""``ttmm eval`` and ``ttmm demo``: the evaluation harness and the guided first run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ttmm.cli.options import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DeviceOption,
    DtypeOption,
    console,
    user_errors,
)
from ttmm.eval.harness import METHODS, EvalConfig, EvalError

logger = logging.getLogger(__name__)

# Sized for a cold run under 10 minutes on 2 cores: about 15k training tokens for the experts
# and as many for the fine-tuning baseline, at about 100 tokens per second.
DEMO_CORPORA = ("wiki@120", "stdlib@10")
DEMO_EXPERTS = 8
DEMO_METHODS = ("base", "finetune", "top1", "ttmm", "ttt")
DEMO_NEIGHBOURS = 10


def _engines(banks: list[Path], device: str = DEFAULT_DEVICE, dtype: str = DEFAULT_DTYPE) -> dict:
    """One engine per bank, all on one base model and encoder (loaded once)."""
    from ttmm.model import TTMM

    with console.status("loading base model, encoder and banks"):
        engines = TTMM.from_banks(banks, device=device, dtype=dtype)
    named = {}
    for path, engine in zip(banks, engines):
        named[path.name if path.name not in named else str(path)] = engine
    return named


def _results_table(report: dict, title: str) -> Table:
    table = Table(title=title)
    columns = sorted({(r["bank"], r["domain"]) for r in report["results"]})
    table.add_column("method")
    for bank, domain in columns:
        table.add_column(
            f"{bank} {domain}" if len(report["banks"]) > 1 else domain, justify="right"
        )
    cost = {(t["bank"], t["method"]): t["ratio_to_base"] for t in report["timing"]}
    if cost:
        table.add_column("cost × base", justify="right")
    rows = {(r["bank"], r["domain"], r["method"]): r for r in report["results"]}
    for method, info in report["methods"].items():
        cells = []
        for bank, domain in columns:
            row = rows.get((bank, domain, method))
            cells.append(
                "–"
                if row is None
                else f"{row['ppl']:.3f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
            )
        if cost:
            ratios = [cost.get((b, method)) for b in report["banks"]]
            cells.append(" / ".join(f"{r:.2f}" for r in ratios if r is not None) or "–")
        table.add_row(info["label"], *cells)
    return table


@user_errors
def eval_command(
    bank: Annotated[
        list[Path], typer.Option("--bank", "-b", help="Expert bank folder; repeat for several.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for results.json, table.md and plots.")] = Path(
        "eval-results"
    ),
    methods: Annotated[
        str, typer.Option(help=f"Comma-separated methods from: {', '.join(METHODS)}.")
    ] = ",".join(METHODS),
    docs: Annotated[int, typer.Option(help="Held-out documents per domain (0 = all).")] = 60,
    ttt_docs: Annotated[
        int, typer.Option(help="Of those, scored by TTT and the hybrids (0 = all).")
    ] = 30,
    ttt_full_docs: Annotated[
        int, typer.Option(help="Of those, scored by all-weights TTT, ttt_full (0 = all).")
    ] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the document order and the bootstrap.")] = 0,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples behind each 95% interval.")
    ] = 2000,
    timing_prompts: Annotated[
        int, typer.Option(help="Prompts per domain timed for test-time cost (0 = no timing).")
    ] = 3,
    tokens: Annotated[int, typer.Option(help="Tokens generated per timed prompt.")] = 100,
    prefix_tokens: Annotated[int, typer.Option(help="Tokens routed on (never scored).")] = 50,
    max_tokens: Annotated[int, typer.Option(help="Tokens read per document.")] = 512,
    neighbours: Annotated[
        int, typer.Option(help="TTT: training chunks retrieved, one gradient step each.")
    ] = 20,
    tune_ttt: Annotated[
        int,
        typer.Option(
            help="Tune TTT's learning rate, neighbours and optimiser first, on this many "
            "validation documents per domain (held out, never test documents; 0 = no sweep)."
        ),
    ] = 0,
    ttt_sweep: Annotated[
        Path | None,
        typer.Option(help="Use the TTT settings chosen by an earlier sweep (its ttt_sweep.json)."),
    ] = None,
    device: DeviceOption = DEFAULT_DEVICE,
    dtype: DtypeOption = DEFAULT_DTYPE,
) -> None:
    """Evaluate base, fine-tuning, TTMM merging and ensembling, TTT and TTMM->TTT on held-out
    documents, with 95% paired bootstrap intervals (resumable: rerun to continue)."""
    from ttmm.eval.harness import evaluate
    from ttmm.eval.ttt import TTTConfig
    from ttmm.eval.ttt_sweep import read_summary, tune, with_summary

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    config = EvalConfig(
        methods=chosen,
        docs=docs or None,
        ttt_docs=ttt_docs or None,
        ttt_full_docs=ttt_full_docs or None,
        seed=seed,
        bootstrap=bootstrap,
        prefix_tokens=prefix_tokens,
        max_tokens=max_tokens,
        timing_prompts=timing_prompts,
        new_tokens=tokens,
        ttt=TTTConfig(neighbours=neighbours),
    )
    if tune_ttt and ttt_sweep:
        raise EvalError("give --tune-ttt (run a sweep) or --ttt-sweep (reuse one), not both")
    engines = _engines(bank, device, dtype)
    extra = {}
    if tune_ttt:  # on the first bank: TTT reads only its training chunks
        config, extra["ttt_sweep"] = tune(next(iter(engines.values())), config, out, tune_ttt)
    elif ttt_sweep:  # read once: the settings and the record of how they were chosen
        extra["ttt_sweep"] = read_summary(ttt_sweep)
        config = with_summary(config, extra["ttt_sweep"])
    report = evaluate(engines, out, config, extra=extra)
    console.print(_results_table(report, "Perplexity on held-out documents"))
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'} and plots in {out}")


@user_errors
def demo(
    corpus: Annotated[
        list[str] | None, typer.Option(help="Corpus spec (repeatable); default wiki + stdlib.")
    ] = None,
    experts: Annotated[int, typer.Option(help="Experts K of the demo bank.")] = DEMO_EXPERTS,
    rebuild: Annotated[bool, typer.Option(help="Ignore the cached demo bank.")] = False,
    prompts: Annotated[int, typer.Option(help="Held-out prompts whose routing is shown.")] = 3,
    docs: Annotated[int, typer.Option(help="Held-out documents per domain scored.")] = 2,
    tokens: Annotated[int, typer.Option(help="Tokens of the side-by-side continuation.")] = 40,
    device: DeviceOption = DEFAULT_DEVICE,
    dtype: DtypeOption = DEFAULT_DTYPE,
) -> None:
    """Build a small bank on the default corpora (cached), then show TTMM at work."""
    from ttmm.build.chunks import read_test_documents
    from ttmm.eval.documents import select_documents
    from ttmm.eval.harness import evaluate
    from ttmm.eval.ttt import TTTConfig

    console.rule("1. the expert bank")
    engines, home = _demo_engines(corpus, experts, rebuild, device, dtype)
    (engine,) = engines.values()
    console.print(f"{engine.bank.num_experts} experts, routing {engine.routing.to_dict()}")

    console.rule("2. routing held-out prompts")
    config = EvalConfig(
        methods=DEMO_METHODS,
        docs=docs,
        timing_prompts=0,
        ttt=TTTConfig(neighbours=DEMO_NEIGHBOURS),
    )
    held_out = select_documents(read_test_documents(engine.bank.path), engine.tokenizer, config)
    if not held_out:
        raise EvalError("the demo bank holds no held-out document long enough to score")
    shown = _spread(held_out, prompts)
    _show_routing(engine, shown)

    console.rule("3. perplexity on held-out documents")
    console.print(
        "(routed, or for TTT retrieved, on the first 50 tokens and scored on the rest; TTT "
        f"trains on its {DEMO_NEIGHBOURS} nearest training chunks; results cached)"
    )
    report = evaluate(engines, home / "eval", config)
    console.print(_results_table(report, "Perplexity (lower is better)"))

    console.rule("4. a continuation, base model and TTMM")
    _show_continuation(engine, shown[0], tokens)


def _demo_engines(corpus, experts: int, rebuild: bool, device: str, dtype: str):
    """Build (or reuse) the demo bank, cached per configuration; its engine and cache folder."""
    import shutil

    from ttmm.assets import ttmm_home
    from ttmm.build.pipeline import BuildConfig, run_build

    build = BuildConfig(
        corpora=tuple(corpus or DEMO_CORPORA),
        experts=experts,
        test_fraction=0.1,
        max_chunks_per_document=2,
        with_finetune=True,
        device=device,
        dtype=dtype,
    ).resolved()
    home = ttmm_home() / "demo" / build.content_hash()  # one cache per demo configuration
    bank_dir = home / "bank"
    if rebuild:
        shutil.rmtree(home, ignore_errors=True)
    console.print(
        f"{', '.join(build.corpora)} (Wikipedia text: CC BY-SA 4.0), K = {experts} "
        f"LoRA experts and a fine-tuning baseline, cached in {bank_dir}"
    )
    run_build(build, bank_dir, progress=True)
    return _engines([bank_dir], build.device, build.dtype), home


def _show_routing(engine, docs: list) -> None:
    """Each document's routing query and the experts it is merged from, then the rule."""
    for doc in docs:
        (query,) = engine.query_texts([doc.text])
        (plan,) = engine.route([doc.text])
        table = Table(title=escape(f"{doc.id}: “{query[:90]}…”"), title_justify="left")
        for column in ("expert", "label", "similarity z", "weight w"):
            table.add_column(column)
        for k, w, z in zip(plan.expert_ids, plan.weights, plan.similarities):
            table.add_row(str(k), Text(engine.bank.label(k)), f"{z:.3f}", f"{w:.3f}")
        if plan.is_base:
            table.add_row("–", "no expert passed the threshold: base model", "", "")
        console.print(table)
    routing = engine.routing
    console.print(
        f"rule {routing.rule}: p = softmax(z / β), β = {routing.beta}; experts with "
        f"p > τ = {routing.tau} kept (at most {routing.max_active}), weights "
        "renormalised; the merge is ΔW = Σ w_k s_k B_k A_k."
    )


def _show_continuation(engine, doc, tokens: int) -> None:
    """The document's routing prefix continued by the base model and by TTMM, side by side."""
    from ttmm.routing import RoutingPlan

    (prompt,) = engine.query_texts([doc.text])
    (plan,) = engine.route([prompt])
    base, merged = (
        engine.generate([prompt], max_new_tokens=tokens, plans=[p])[0]
        for p in (RoutingPlan.base(), plan)
    )
    console.print(Panel(Text(prompt), title="prompt (held out)"))  # user text: no markup
    side = Table(show_lines=True, expand=True)
    side.add_column("base model", ratio=1)
    side.add_column(f"TTMM ({len(plan.expert_ids)} experts merged)", ratio=1)
    side.add_row(Text(base.text), Text(merged.text))
    console.print(side)


def _spread(docs: list, n: int) -> list:
    """Up to ``n`` documents, taking domains in turn."""
    by_domain: dict[str, list] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    chosen, queues = [], list(by_domain.values())
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen
