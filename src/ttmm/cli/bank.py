"""``ttmm bank``: the health of a bank's experts, and enabling or disabling them by hand
(:mod:`ttmm.quality_gate`, issue 22)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ttmm.cli.options import JsonOption, console, user_errors

bank_app = typer.Typer(
    help="A bank's expert health; enable or disable experts by hand (kept in its manifest).",
    no_args_is_help=True,
)

BankArgument = Annotated[Path, typer.Argument(help="Bank folder.")]
ExpertsArgument = Annotated[str, typer.Argument(help="Expert ids, e.g. '3' or '3,7,12'.")]


def _ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expert ids are integers separated by commas, got {text!r}"
        ) from None


def health_table(manifest, only_flagged: bool = False) -> Table:
    """Per expert: its validation chunks, its loss, the base model's and fine-tuning's on them,
    its gate status and, if disabled, by whom and why."""
    from ttmm.quality_gate import ExpertHealth

    table = Table(title="expert health (validation loss on the expert's own cluster)")
    for column in ("expert", "label", "chunks", "expert", "base", "fine-tuning", "status"):
        table.add_column(column, justify="left" if column in ("label", "status") else "right")
    counts: dict[str, int] = {}
    for info in manifest.experts:
        health = ExpertHealth.from_dict(info.health)
        status = "disabled by " + info.disabled["by"] if info.disabled else health.status
        counts[status] = counts.get(status, 0) + 1
        if only_flagged and status == "ok":
            continue
        style = "bold red" if info.disabled else ("yellow" if status != "ok" else "green")
        table.add_row(
            str(info.id),
            Text(info.label),
            str(health.validation_chunks),
            *(
                "" if value is None else f"{value:.3f}"
                for value in (health.expert_loss, health.base_loss, health.finetune_loss)
            ),
            Text(status, style=style),
        )
    table.caption = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return table


@bank_app.command("health")
@user_errors
def health(bank: BankArgument, as_json: JsonOption = False) -> None:
    """Every expert's validation loss against the base model and fine-tuning, and its state."""
    from ttmm.bank import Bank

    manifest = Bank.load(bank, verify=False).manifest
    if as_json:
        rows = [
            {"id": e.id, "label": e.label, "health": e.health, "disabled": e.disabled}
            for e in manifest.experts
        ]
        typer.echo(json.dumps({"experts": rows, "history": manifest.history}, indent=2))
        return
    console.print(health_table(manifest))
    for info in manifest.experts:
        if info.disabled:
            console.print(Text(f"expert {info.id}: {info.disabled['reason']}"))


ReasonOption = Annotated[str, typer.Option(help="Why (kept in the manifest's history).")]


def _switch(bank: Path, experts: str, enabled: bool, reason: str) -> None:
    from ttmm.quality_gate import set_enabled

    changed = set_enabled(bank, _ids(experts), enabled=enabled, reason=reason)
    verb = "enabled" if enabled else "disabled"
    console.print(f"{verb} {changed or f'nothing (already {verb})'} in {bank}")


@bank_app.command("disable")
@user_errors
def disable(bank: BankArgument, experts: ExpertsArgument, reason: ReasonOption = "") -> None:
    """Keep experts out of every merge; routing passes over them and says so in its plans."""
    _switch(bank, experts, enabled=False, reason=reason)


@bank_app.command("enable")
@user_errors
def enable(bank: BankArgument, experts: ExpertsArgument, reason: ReasonOption = "") -> None:
    """Let experts be merged again, overriding the quality gate (recorded in the manifest)."""
    _switch(bank, experts, enabled=True, reason=reason)
