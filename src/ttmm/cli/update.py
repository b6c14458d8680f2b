"""``ttmm update`` (grow a bank with new documents) and ``ttmm diff`` (what two versions of a
bank differ in): :mod:`ttmm.build.update` and :mod:`ttmm.bank_diff`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ttmm.cli.options import DEVICE_HELP, JsonOption, ProgressOption, console, user_errors


def _ids(ids: list[int]) -> str:
    if not ids:
        return "none"
    shown = ", ".join(map(str, ids[:20]))
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")


@user_errors
def update(
    parent: Annotated[Path, typer.Argument(help="The bank to grow (only read).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the new version.")],
    corpus: Annotated[
        list[str],
        typer.Option("--corpus", "-c", help="Corpus spec of the new documents, repeatable."),
    ],
    replay: Annotated[
        float, typer.Option(help="Old-chunk tokens replayed per new token in retrained experts.")
    ] = 1.0,
    novelty_quantile: Annotated[
        float,
        typer.Option(
            help="New chunks less similar to every centroid than this quantile of the bank's "
            "own chunks are novel and may form new experts."
        ),
    ] = 0.05,
    min_new_expert_chunks: Annotated[
        int | None,
        typer.Option(help="Novel chunks needed for new experts (default: half a median cluster)."),
    ] = None,
    refresh_finetune: Annotated[
        bool, typer.Option(help="Also continue the fine-tuning adapter on the new chunks.")
    ] = False,
    base_model: Annotated[
        str | None, typer.Option(help="The base model's folder, if it moved since the build.")
    ] = None,
    device: Annotated[str, typer.Option(help=f"Where training runs: {DEVICE_HELP}.")] = "auto",
    progress: ProgressOption = True,
) -> None:
    """Grow a bank with new documents into a new version: retrain only the experts that got
    new text, add experts for text far from every centroid (resumable; the parent is kept)."""
    from ttmm.build.update import UpdateOptions, run_update

    options = UpdateOptions(
        corpora=tuple(corpus),
        replay=replay,
        novelty_quantile=novelty_quantile,
        min_new_expert_chunks=min_new_expert_chunks,
        refresh_finetune=refresh_finetune,
        base_model=base_model,
        device=device,
    )
    result = run_update(parent, options, out, progress=progress)
    if result.nothing_to_do:
        console.print(f"{out} is already this update of {parent}: nothing to do")
        return
    if result.reused:
        console.print(f"resumed: kept {len(result.reused)} finished adapter(s)")
    console.print(lineage_table(result.manifest.lineage, f"{parent} → {out}"))


def lineage_table(lineage: dict, title: str) -> Table:
    """What an update recorded: corpora, experts added / retrained / kept, novelty, time."""
    table = Table(title=title, show_header=False)
    table.add_column("item")
    table.add_column("value")
    novelty = lineage.get("novelty", {})
    rows = [
        (
            "parent",
            f"{lineage['parent']['path']} (manifest {lineage['parent']['manifest_sha256'][:12]})",
        ),  # fmt: skip
        ("corpora added", ", ".join(lineage.get("corpora", []))),
        ("new documents", json.dumps(lineage.get("documents", {}))),
        ("new chunks", str(lineage.get("chunks", ""))),
        ("experts added", _ids(lineage.get("added", []))),
        ("experts retrained", _ids(lineage.get("retrained", []))),
        ("experts unchanged (hard links)", str(lineage.get("unchanged", ""))),
        ("disabled by the gate", _ids(lineage.get("disabled", []))),
        ("fine-tuning adapter", lineage.get("finetune", "")),
        (
            "novel chunks",
            f"{novelty.get('novel_chunks')} below similarity {novelty.get('threshold')} "
            f"(the bank's {novelty.get('quantile')} quantile); new experts need "
            f"{novelty.get('min_new_expert_chunks')}",
        ),
        ("seconds", f"{lineage.get('total_seconds', 0):.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


@user_errors
def diff(
    old: Annotated[Path, typer.Argument(help="Older bank.")],
    new: Annotated[Path, typer.Argument(help="Newer bank.")],
    as_json: JsonOption = False,
) -> None:
    """What two versions of a bank differ in: experts added, retrained, removed, disabled,
    centroids moved, corpora; and the lineage when NEW is an update of OLD."""
    from ttmm.bank_diff import diff_banks

    found = diff_banks(old, new)
    if as_json:
        typer.echo(json.dumps(found.to_dict(), indent=2))
        return
    relation = {
        "update": f"{new} is an update of {old}",
        "parent": f"{old} is an update of {new} (the arguments are new, old)",
        "same": "the same bank (identical manifests)",
        "unrelated": "no lineage links them: compared by their files",
    }[found.relation]
    console.print(Text(relation))
    table = Table(show_header=False)
    table.add_column("item")
    table.add_column("value")
    moved = sorted(found.centroids_moved.items(), key=lambda kv: kv[1])[:5]
    for name, value in [
        ("experts added", _ids(found.added)),
        ("experts retrained", _ids(found.retrained)),
        ("experts removed", _ids(found.removed)),
        ("experts unchanged", str(found.unchanged)),
        ("disabled", "; ".join(f"{k}: {r}" for k, r in found.disabled.items()) or "none"),
        ("enabled", _ids(found.enabled)),
        (
            "centroids moved",
            f"{len(found.centroids_moved)} (least similar: "
            + ", ".join(f"{k} cos {c:.3f}" for k, c in moved)
            + ")"
            if moved
            else "none",
        ),
        ("fine-tuning adapter", found.finetune),
        ("corpora added", ", ".join(found.corpora_added) or "none"),
        ("corpora removed", ", ".join(found.corpora_removed) or "none"),
        ("base model", "same" if found.base_model is None else " → ".join(found.base_model)),
    ]:
        table.add_row(name, Text(value))
    console.print(table)
    if found.lineage:
        console.print(lineage_table(found.lineage, "recorded by the update"))
