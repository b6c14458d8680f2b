"""``ttmm build`` and ``ttmm info``: thin typed verbs over the build pipeline and the bank.

Settings come from the defaults, then ``--config FILE`` (TOML or YAML, the same keys as the
``build_config.yaml`` a build writes), then the flags given on the command line.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table
from rich.text import Text

from ttmm.cli.options import ProgressOption, console, user_errors
from ttmm.device import DEVICE_HELP, DTYPE_HELP


@user_errors
def build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bank folder to write (new or empty).")],
    corpus: Annotated[
        list[str] | None,
        typer.Option(
            "--corpus",
            "-c",
            help="Corpus spec, repeatable: wiki, stdlib, jsonl:PATH[:FIELD], dir:PATH[:GLOB], "
            "each with optional DOMAIN= prefix and @LIMIT suffix (default: wiki@240 stdlib@24).",
        ),
    ] = None,
    experts: Annotated[int | None, typer.Option("--experts", "-k", help="K experts.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML or YAML build configuration.")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base model: smollm2-135m, a folder, a .gguf or a hub id.")
    ] = None,
    encoder: Annotated[str | None, typer.Option(help="Sentence encoder folder or id.")] = None,
    executor: Annotated[str | None, typer.Option(help="sequential or ray.")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")
    ] = None,
    ray_num_cpus: Annotated[int | None, typer.Option(help="CPUs of a local Ray.")] = None,
    ray_gpus_per_task: Annotated[
        float | None, typer.Option(help="GPUs per Ray task when --device is CUDA (default 1).")
    ] = None,
    with_finetune: Annotated[
        bool | None,
        typer.Option(
            "--with-finetune/--no-finetune",
            help="Also train the fine-tuning baseline on all chunks, same total tokens.",
        ),
    ] = None,
    branch_from: Annotated[
        str | None,
        typer.Option(
            help="finetune: train the fine-tuning adapter first and start every expert from it "
            "(branched experts; implies --with-finetune)."
        ),
    ] = None,
    continue_finetune: Annotated[
        bool | None,
        typer.Option(
            "--continue-finetune/--no-continue-finetune",
            help="Equal-compute control: continue the fine-tuning adapter on all chunks for as "
            "many tokens as the experts took, saved as finetune_continued/.",
        ),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(
            help="Training tokens of all experts together, shared in proportion to cluster "
            "tokens; the fine-tuning baseline gets the same total."
        ),
    ] = None,
    budget_minutes: Annotated[
        float | None,
        typer.Option(
            help="Instead of --budget: minutes of expert training, converted to tokens once "
            "from a throughput measured at the start of the build."
        ),
    ] = None,
    test_fraction: Annotated[
        float | None, typer.Option(help="Share of documents held out.")
    ] = None,
    near_duplicate_threshold: Annotated[
        float | None,
        typer.Option(
            help="Drop held-out documents whose word-shingle Jaccard to a training document "
            "reaches this (default 0.8)."
        ),
    ] = None,
    keep_near_duplicates: Annotated[
        bool, typer.Option(help="Keep held-out near-duplicates of training documents.")
    ] = False,
    validation_fraction: Annotated[
        float | None,
        typer.Option(help="Share of training documents kept for validation losses (0.05)."),
    ] = None,
    window: Annotated[int | None, typer.Option(help="Chunk length in tokens.")] = None,
    max_chunks_per_document: Annotated[
        int | None, typer.Option(help="Chunks kept per document.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of clustering and training.")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank r.")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha.")] = None,
    target_modules: Annotated[
        str | None, typer.Option(help="all-linear, or comma-separated module names.")
    ] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="AdamW rate.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over each expert's chunks.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Token budget per adapter (default: epochs decide).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Chunks per step.")] = None,
    schedule: Annotated[
        str | None, typer.Option(help="Learning-rate schedule: constant, cosine or linear.")
    ] = None,
    warmup_fraction: Annotated[
        float | None, typer.Option(help="Share of steps of linear learning-rate warm-up.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads per training job (Ray: CPUs per task).")
    ] = None,
    device: Annotated[str | None, typer.Option(help=f"Where training runs: {DEVICE_HELP}.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help=f"Base model weights while training: {DTYPE_HELP}.")
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Cluster a corpus and train one LoRA expert per cluster into a bank (resumable)."""
    from ttmm.build.pipeline import BuildConfig, run_build

    base = BuildConfig.from_file(config) if config is not None else BuildConfig()
    if target_modules is not None and target_modules != "all-linear":
        target_modules = tuple(m.strip() for m in target_modules.split(",") if m.strip())
    resolved = base.with_overrides(
        corpora=tuple(corpus) if corpus else None,
        experts=experts,
        base_model=base_model,
        encoder=encoder,
        executor=executor,
        ray_address=ray_address,
        ray_num_cpus=ray_num_cpus,
        ray_gpus_per_task=ray_gpus_per_task,
        device=device,
        dtype=dtype,
        with_finetune=with_finetune,
        branch_from=branch_from,
        continue_finetune=continue_finetune,
        budget_tokens=budget,
        budget_minutes=budget_minutes,
        test_fraction=test_fraction,
        near_duplicate_threshold=near_duplicate_threshold,
        validation_fraction=validation_fraction,
        window=window,
        max_chunks_per_document=max_chunks_per_document,
        seed=seed,
        train_rank=rank,
        train_alpha=alpha,
        train_target_modules=target_modules,
        train_learning_rate=learning_rate,
        train_epochs=epochs,
        train_max_tokens=max_tokens,
        train_batch_size=batch_size,
        train_schedule=schedule,
        train_warmup_fraction=warmup_fraction,
        train_num_threads=threads,
    )
    if keep_near_duplicates:
        resolved = replace(resolved, near_duplicate_threshold=None)
    result = run_build(resolved, out, progress=progress)
    if result.nothing_to_do:
        console.print(f"{out} is already built with this configuration: nothing to do")
        return
    if result.reused:
        console.print(f"resumed: kept {len(result.reused)} finished adapter(s)")
    _print_summary(result.manifest, out)


def _print_summary(manifest, path: Path) -> None:
    if len(manifest.experts) > LISTED_EXPERTS:
        console.print(_bank_summary_table(manifest))
    console.print(_experts_table(manifest, f"bank {path}"))
    console.print(_build_table(manifest.build))


LISTED_EXPERTS = 40
"""Banks with more experts are summarised: totals, spreads, and the experts at both ends."""


def _experts_table(manifest, title: str) -> Table:
    table = Table(title=title)
    columns = ("expert", "label", "chunks", "planned", "tokens", "rank", "MB")
    for column in (*columns, "loss start → end", "val before → after"):
        table.add_column(column, justify="left" if column == "label" else "right")
    experts = manifest.experts
    if len(experts) > LISTED_EXPERTS:  # the five with the most and the fewest tokens
        by_tokens = sorted(experts, key=lambda e: (-e.n_tokens, e.id))
        experts = [*by_tokens[:5], *by_tokens[-5:]]
        title = f"{title}: the 5 with the most tokens, then the 5 with the fewest"
        table.title = title
    rows = [(str(e.id), e) for e in experts]
    if manifest.finetune is not None:
        rows.append(("finetune", manifest.finetune))
    if manifest.finetune_continued is not None:
        rows.append(("finetune continued", manifest.finetune_continued))
    for name, entry in rows:
        curve = entry.loss_curve
        tenth = max(1, len(curve) // 10)  # mean of the first and last tenth: steps are noisy
        loss = (
            f"{sum(curve[:tenth]) / tenth:.3f} → {sum(curve[-tenth:]) / tenth:.3f}" if curve else ""
        )
        before, after = entry.extra.get("val_before"), entry.extra.get("val_after")
        table.add_row(
            name,
            Text(entry.label),  # labels are corpus words: never rich markup
            str(entry.n_chunks),
            str(entry.extra.get("planned_tokens", "")),
            str(entry.n_tokens),
            str(entry.rank),
            f"{entry.size_bytes / 1e6:.2f}",
            loss,
            f"{before:.3f} → {after:.3f}" if before is not None and after is not None else "",
        )
    return table


def _bank_summary_table(manifest) -> Table:
    """A large bank in one screen: how many experts, how big, and the spread of their data
    (min / median / max) and of their validation gains."""
    experts = manifest.experts
    table = Table(title=f"{len(experts)} experts")
    table.add_column("item")
    table.add_column("min / median / max", justify="right")

    def spread(values) -> str:
        values = sorted(values)
        return f"{values[0]:,} / {values[len(values) // 2]:,} / {values[-1]:,}"

    table.add_row("tokens trained", spread([e.n_tokens for e in experts]))
    table.add_row("chunks", spread([e.n_chunks for e in experts]))
    table.add_row("rank", spread([e.rank for e in experts]))
    table.add_row("MB on disk", spread([round(e.size_bytes / 1e6, 2) for e in experts]))
    total = sum(e.size_bytes for e in experts)
    table.add_row("bank on disk", f"{total / 1e9:.2f} GB in all")
    gains = [
        e.extra["val_before"] - e.extra["val_after"]
        for e in experts
        if e.extra.get("val_before") is not None and e.extra.get("val_after") is not None
    ]
    if gains:
        better = sum(g > 0 for g in gains)
        table.add_row(
            "validation loss gain",
            f"{spread([round(g, 3) for g in gains])} ({better} of {len(gains)} improved)",
        )
    return table


def _build_table(build_info: dict) -> Table:
    table = Table(title="build")
    table.add_column("item")
    table.add_column("value", justify="right")
    for stage, seconds in build_info.get("stage_seconds", {}).items():
        table.add_row(f"stage {stage}", f"{seconds:.1f} s")
    if "total_seconds" in build_info:
        table.add_row("total", f"{build_info['total_seconds']:.1f} s")
    training = build_info.get("training", {})
    if training:
        table.add_row("expert training tokens", str(training["expert_tokens"]))
        table.add_row("training tokens/s", f"{training['tokens_per_second']:.1f}")
        if training.get("finetune_tokens"):
            table.add_row("fine-tuning baseline tokens", str(training["finetune_tokens"]))
        if training.get("finetune_continued_tokens"):
            table.add_row(
                "fine-tuning continued tokens", str(training["finetune_continued_tokens"])
            )
    budget = build_info.get("budget")
    if budget:
        how = budget["source"]
        if budget.get("minutes") is not None:
            how = (
                f"{budget['minutes']} min at a measured "
                f"{budget['measured_tokens_per_second']} tokens/s"
            )
        table.add_row("expert token budget", f"{budget['tokens']} ({how})")
    branch = (build_info.get("config") or {}).get("branch_from")
    if branch:
        table.add_row("experts branched from", branch)
    for gold, quality in (build_info.get("cluster_quality") or {}).items():
        if quality:
            table.add_row(
                f"clusters vs {gold}",
                f"purity {quality['purity']:.3f}, AMI {quality['ami']:.3f} "
                f"({quality['n_items']} chunks, {quality['n_classes']} classes)",
            )
    return table


def _verify(bank: Path) -> None:
    """Print every file of the bank with its checksum status; exit 1 if any is not ok."""
    from ttmm.bank import Bank
    from ttmm.bank_files import check_files

    manifest = Bank.load(bank, verify=False).manifest
    checks = check_files(bank, manifest.files)
    table = Table(title=f"{bank}: {len(checks)} files against the manifest's sha256")
    for column in ("file", "status", "sha256"):
        table.add_column(column)
    for check in checks:
        style = "green" if check.status == "ok" else "bold red"
        table.add_row(Text(check.path), Text(check.status, style=style), check.expected[:16])
    console.print(table)
    if not checks:
        console.print("this bank records no checksums (built before ttmm 0.2): rebuild it")
    bad = [c for c in checks if c.status != "ok"]
    if bad or not checks:
        raise typer.Exit(1)
    console.print("all files match")


@user_errors
def info(
    bank: Annotated[Path, typer.Argument(help="Bank folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check every file against its recorded sha256.")
    ] = False,
) -> None:
    """Show a bank: experts, labels, sizes, build configuration and cluster quality."""
    from ttmm.bank import Bank

    if verify:
        _verify(bank)
        return
    loaded = Bank.load(bank)
    manifest = loaded.manifest
    if as_json:
        typer.echo(json.dumps(manifest.to_dict(), indent=2, default=str))
        return
    console.print(
        f"[bold]{bank}[/]: {len(manifest.experts)} experts on {manifest.base_model['name']} "
        f"({manifest.base_model.get('architecture', '?')}), encoder {manifest.encoder['name']} "
        f"({manifest.encoder['dim']}-dim), created {manifest.created}"
    )
    if len(manifest.experts) > LISTED_EXPERTS:
        console.print(_bank_summary_table(manifest))
    console.print(_experts_table(manifest, "experts"))
    if any(e.health or e.disabled for e in manifest.experts):
        from ttmm.cli.bank import health_table

        many = len(manifest.experts) > LISTED_EXPERTS
        console.print(health_table(manifest, only_flagged=many))
    if manifest.build:
        console.print(_build_table(manifest.build))
        config = manifest.build.get("config")
        if config:
            console.print("[bold]build configuration[/]")
            console.print(Text(yaml.safe_dump(config, sort_keys=False).rstrip()))
    if manifest.data.get("documents"):
        table = Table(title="data")
        columns = ("domain", "train documents", "validation documents", "test documents")
        for column in (*columns, "near-duplicates dropped", "chunks"):
            table.add_column(column, justify="right")
        chunks = manifest.data.get("chunks_per_domain", {})
        for domain, counts in manifest.data["documents"].items():
            table.add_row(
                domain,
                str(counts["train"]),
                str(counts.get("validation", 0)),
                str(counts["test"]),
                str(counts.get("near_duplicates_dropped", 0)),
                str(chunks.get(domain, 0)),
            )
        console.print(table)
