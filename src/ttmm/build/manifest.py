"""The bank's manifest from a finished build: per-adapter records, data counts, timings.

Every adapter entry carries its planned and trained tokens, its validation loss before and
after training (mean NLL per token on its validation chunks) and what it started from; the
data section counts, per domain, the training, validation and held-out documents and the
held-out near-duplicates dropped.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from ttmm.adapter import load_adapter
from ttmm.assets import base_model_name
from ttmm.bank import (
    FINETUNE_CONTINUED_DIR,
    FINETUNE_DIR,
    BankManifest,
    ExpertInfo,
    base_model_record,
    expert_dir,
)
from ttmm.build.config import BuildConfig
from ttmm.build.corpus import Chunk, domain_counts
from ttmm.build.executors import CONTINUED_JOB, FINETUNE_JOB, TrainJob
from ttmm.device import describe, model_device
from ttmm.routing import RoutingConfig

MAX_LOSS_POINTS = 200


def adapter_dir(job_id: int) -> str:
    if job_id == FINETUNE_JOB:
        return FINETUNE_DIR
    if job_id == CONTINUED_JOB:
        return FINETUNE_CONTINUED_DIR
    return expert_dir(job_id)


def downsample(losses: list[float], points: int = MAX_LOSS_POINTS) -> list[float]:
    """Mean loss over equal bins, so long runs keep a readable curve in the manifest."""
    if len(losses) <= points:
        return [round(x, 5) for x in losses]
    bins = np.array_split(np.asarray(losses), points)
    return [round(float(b.mean()), 5) for b in bins]


def adapter_info(
    out: Path, job: TrainJob, record: dict, label: str, members: list[Chunk]
) -> ExpertInfo:
    """The manifest entry of the adapter ``job`` trained into ``out`` (``record``: its
    training record), ``members`` the chunks of its cluster (all chunks for fine-tuning)."""
    path = adapter_dir(job.id)
    return ExpertInfo.describe(
        max(job.id, 0),
        path,
        load_adapter(out / path),
        out,
        label=label,
        n_chunks=record["n_chunks"],
        n_tokens=record["n_tokens"],
        loss_curve=downsample(record["losses"]),
        extra={
            "seed": record["seed"],
            "seconds": record["seconds"],
            "tokens_per_second": round(
                record["n_tokens"] / max(record.get("train_seconds") or record["seconds"], 1e-9),
                2,
            ),
            "planned_tokens": record.get("planned_tokens", record["n_tokens"]),
            "val_before": record.get("val_before"),
            "val_after": record.get("val_after"),
            "n_validation_chunks": record.get("n_validation_chunks", 0),
            "initialised_from": "finetune" if job.init is not None else None,
            "domains": domain_counts(members),
            "n_documents": len({c.doc_id for c in members}),
        },
    )


def build_manifest(
    out: Path,
    config: BuildConfig,
    prepared,  # ttmm.build.pipeline._Prepared: the data stages' output
    model,
    encoder,
    jobs: list[TrainJob],
    records: dict[int, dict],
    data: dict,
) -> BankManifest:
    chunks, assignments = prepared.chunks, prepared.assignments

    def info(job: TrainJob, label: str) -> ExpertInfo:
        if job.id < 0:
            members = chunks
        else:
            members = [chunks[i] for i in np.flatnonzero(assignments == job.id)]
        return adapter_info(out, job, records[job.id], label, members)

    experts = [info(job, prepared.labels[job.id]) for job in jobs if job.id >= 0]
    by_id = {job.id: job for job in jobs}
    finetune = info(by_id[FINETUNE_JOB], "all training chunks") if FINETUNE_JOB in by_id else None
    continued = (
        info(by_id[CONTINUED_JOB], "fine-tuning continued, equal compute")
        if CONTINUED_JOB in by_id
        else None
    )
    validation_docs = domain_counts(prepared.validation_documents)
    dropped = Counter(doc_id.split("/", 1)[0] for doc_id in prepared.near_duplicates)
    expert_tokens = sum(e.n_tokens for e in experts)
    expert_seconds = sum(e.extra["seconds"] for e in experts)
    data.update(
        {
            "corpora": list(config.corpora),
            "documents": {
                d: {
                    "train": len(v["train"]) - validation_docs.get(d, 0),
                    "validation": validation_docs.get(d, 0),
                    "test": len(v["test"]),
                    "near_duplicates_dropped": dropped.get(d, 0),
                }
                for d, v in prepared.split.ids_by_domain().items()
            },
            "near_duplicate_threshold": config.near_duplicate_threshold,
            "near_duplicates": prepared.near_duplicates,
            "chunks_per_domain": domain_counts(chunks),
            "validation_chunks_per_domain": domain_counts(prepared.validation),
            "window": config.window,
            "tokenizer": "base_model",
        }
    )
    return BankManifest(
        base_model=base_model_record(base_model_name(config.base_model), model),
        encoder={"name": encoder.name, "dim": encoder.dim},
        routing=RoutingConfig().to_dict(),
        experts=experts,
        finetune=finetune,
        finetune_continued=continued,
        branch_from=config.branch_from,
        data=data,
        build={
            "config": config.to_dict(),
            "executor": config.executor,
            "device": describe(model_device(model)),
            "training": {
                "expert_tokens": expert_tokens,
                "expert_seconds": round(expert_seconds, 3),
                "tokens_per_second": round(expert_tokens / max(expert_seconds, 1e-9), 2),
                "finetune_tokens": finetune.n_tokens if finetune else 0,
                "finetune_seconds": finetune.extra["seconds"] if finetune else 0.0,
                "expert_planned_tokens": sum(e.extra["planned_tokens"] for e in experts),
                "finetune_continued_tokens": continued.n_tokens if continued else 0,
            },
            "cluster_quality": prepared.quality,
            "corpus_reports": prepared.reports,
            "cpu_count": os.cpu_count(),
        },
    )
