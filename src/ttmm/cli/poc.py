"""``ttmm poc``: the adoption report on a user's own corpus, in a time budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.panel import Panel

from ttmm.cli.options import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DeviceOption,
    DtypeOption,
    ProgressOption,
    console,
    user_errors,
)
from ttmm.poc.config import POC_CORPORA


@user_errors
def poc(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the report (resumable).")],
    corpus: Annotated[
        list[str] | None,
        typer.Option(
            "--corpus",
            "-c",
            help="Corpus spec, repeatable, as `ttmm build` takes it "
            f"(default: {' '.join(POC_CORPORA)}).",
        ),
    ] = None,
    bank: Annotated[
        Path | None, typer.Option(help="Evaluate this bank instead of building one.")
    ] = None,
    budget_minutes: Annotated[
        float, typer.Option(help="Wall time of the whole run on this machine.")
    ] = 20.0,
    price_per_hour: Annotated[
        float | None, typer.Option(help="What an hour of this machine costs (any currency).")
    ] = None,
    tokens_per_day: Annotated[
        int, typer.Option(help="Tokens generated a day, for the daily cost.")
    ] = 1_000_000,
    experts: Annotated[
        int | None, typer.Option("--experts", "-k", help="K (default: planned from the budget).")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base model: smollm2-135m, a folder, a .gguf or a hub id.")
    ] = None,
    encoder: Annotated[str | None, typer.Option(help="Sentence encoder folder or id.")] = None,
    max_docs: Annotated[int, typer.Option(help="Most held-out documents a domain.")] = 60,
    seed: Annotated[int, typer.Option(help="Seed of the split, clusters and bootstrap.")] = 0,
    progress: ProgressOption = True,
    device: DeviceOption = DEFAULT_DEVICE,
    dtype: DtypeOption = DEFAULT_DTYPE,
) -> None:
    """Build a bank on your corpus (or take --bank), evaluate it against fine-tuning and the
    base model, price its inference and its engineering, and write poc/report.html, report.md,
    poc.json and rollout.yaml, all within --budget-minutes (rerun to resume)."""
    from ttmm.poc.config import PocConfig
    from ttmm.poc.runner import run_poc

    settings = {"base_model": base_model, "encoder": encoder}
    config = PocConfig(
        corpora=tuple(corpus) if corpus else (() if bank else POC_CORPORA),
        bank=str(bank) if bank else None,
        budget_minutes=budget_minutes,
        price_per_hour=price_per_hour,
        tokens_per_day=tokens_per_day,
        experts=experts,
        max_docs=max_docs,
        seed=seed,
        device=device,
        dtype=dtype,
        **{k: v for k, v in settings.items() if v is not None},
    )
    result = run_poc(config, out, progress=progress)
    answers = result["answers"]
    console.print(
        Panel(
            "\n".join(
                f"[bold]{name}:[/bold] {escape(answers[name])}"
                for name in ("quality", "inference", "engineering")
            ),
            title="the three answers",
        )
    )
    for verdict in result["verdicts"].values():
        console.print(f"'{escape(verdict['domain'])}': {escape(verdict['reason'])}")
    for warning in result["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    run = result["run"]
    console.print(
        f"took {run['wall_seconds'] / 60:.1f} min of a {result['config']['budget_minutes']:g}-"
        f"minute budget; wrote {out / 'report.html'}, {out / 'report.md'}, {out / 'poc.json'} "
        f"and {out / 'rollout.yaml'}"
    )
