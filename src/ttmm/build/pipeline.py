"""The train-time pipeline (design §2, train time): a raw corpus in, an expert bank out.

Stages, each timed: read → split → chunk → embed → cluster → write index → train experts (and
the fine-tuning baseline) → manifest. The output folder holds a small build-state file
(``.ttmm-build.json``, with the hash of the resolved configuration) from the moment the build
writes anything, so a killed build resumes and keeps its finished adapters; ``manifest.json``
is written last, so a half-built folder is never mistaken for a bank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from ttmm.adapter import AdapterError, load_adapter, save_adapter
from ttmm.assets import base_model_name, load_base_model, ttmm_home
from ttmm.bank import (
    FINETUNE_DIR,
    MANIFEST_NAME,
    Bank,
    BankManifest,
    ExpertInfo,
    base_model_record,
    expert_dir,
    write_centroids,
    write_manifest,
)
from ttmm.build.chunks import write_chunk_index, write_split
from ttmm.build.cluster import centroids, cluster_embeddings, cluster_quality, label_clusters
from ttmm.build.config import BuildConfig, BuildError
from ttmm.build.corpus import (
    Chunk,
    CorpusError,
    Split,
    chunk_documents,
    domain_counts,
    read_corpora,
    split_documents,
)
from ttmm.build.executors import FINETUNE_JOB, TrainJob, make_executor
from ttmm.build.train import TrainResult, planned_tokens
from ttmm.device import describe, model_device
from ttmm.embed import Encoder
from ttmm.routing import RoutingConfig

logger = logging.getLogger(__name__)

STATE_NAME = ".ttmm-build.json"
CONFIG_NAME = "build_config.yaml"
TRAINING_RECORD = "training.json"
MAX_LOSS_POINTS = 200


@dataclass
class BuildResult:
    """What ``run_build`` did."""

    path: Path
    manifest: BankManifest
    trained: list[int]  # adapter ids trained in this run (-1 = fine-tuning baseline)
    reused: list[int]  # adapter ids kept from an interrupted run
    nothing_to_do: bool = False


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        logger.info("stage %s ...", name)
        yield
        self.seconds[name] = round(time.perf_counter() - started, 3)
        logger.info("stage %s: %.1f s", name, self.seconds[name])


def _read_state(out: Path) -> dict | None:
    path = out / STATE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BuildError(f"{path} is corrupt ({err}); delete {out} to rebuild") from err


def _write_state(out: Path, payload: dict) -> None:
    path = out / STATE_NAME
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(payload, indent=1))
    os.replace(staging, path)


def check_output(out: Path, config_hash: str) -> str:
    """``fresh``, ``resume`` or ``done`` for building into ``out``; BuildError for anything else.

    Nothing is written here. A folder that is neither empty nor our own build is refused:
    a build never overwrites files it did not make.
    """
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file; choose a new or empty folder")
    if not out.exists():
        return "fresh"
    state = _read_state(out)
    if state is None:
        entries = sorted(p.name for p in out.iterdir())
        if not entries:
            return "fresh"
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise BuildError(
            f"--out {out} is not empty and holds no ttmm build ({shown}); choose a new or empty "
            "folder (ttmm never overwrites files it did not write)"
        )
    if state.get("config_hash") != config_hash:
        raise BuildError(
            f"--out {out} holds a build with a different configuration (hash "
            f"{state.get('config_hash')}, now {config_hash}); rerun with that build's "
            f"{CONFIG_NAME}, choose another --out, or delete the folder"
        )
    if state.get("status") == "done" and (out / MANIFEST_NAME).is_file():
        return "done"
    return "resume"


def _job_digest(job: TrainJob) -> str:
    identity = [job.id, job.seed, job.config.to_dict()]
    if job.dtype != "float32":  # float32 adapters keep the digest they had before dtypes
        identity.append(job.dtype)
    digest = hashlib.sha256(json.dumps(identity).encode())
    for ids in job.token_ids:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def _adapter_dir(job_id: int) -> str:
    return FINETUNE_DIR if job_id == FINETUNE_JOB else expert_dir(job_id)


def _finished_record(out: Path, job: TrainJob) -> dict | None:
    """The training record of a complete adapter folder for exactly this job, else None."""
    folder = out / _adapter_dir(job.id)
    try:
        record = json.loads((folder / TRAINING_RECORD).read_text())
        load_adapter(folder)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AdapterError):
        return None
    return record if record.get("digest") == _job_digest(job) else None


def _downsample(losses: list[float], points: int = MAX_LOSS_POINTS) -> list[float]:
    """Mean loss over equal bins, so long runs keep a readable curve in the manifest."""
    if len(losses) <= points:
        return [round(x, 5) for x in losses]
    bins = np.array_split(np.asarray(losses), points)
    return [round(float(b.mean()), 5) for b in bins]


def _make_jobs(
    config: BuildConfig, chunks: list[Chunk], assignments: np.ndarray, pad_token_id: int
) -> list[TrainJob]:
    jobs = []
    for k in range(config.experts):
        ids = tuple(chunks[i].token_ids for i in np.flatnonzero(assignments == k))
        jobs.append(
            TrainJob(
                k,
                ids,
                config.seed + k,
                config.train,
                config.base_model,
                pad_token_id,
                config.device,
                config.dtype,
            )
        )
    if config.with_finetune:
        # Same total budget as all experts together: cap at the tokens they will train on.
        budget = sum(planned_tokens(job.token_ids, job.config, job.seed) for job in jobs)
        finetune = replace(config.train, max_tokens=budget)
        all_ids = tuple(chunk.token_ids for chunk in chunks)
        jobs.append(
            TrainJob(
                FINETUNE_JOB,
                all_ids,
                config.seed + config.experts,
                finetune,
                config.base_model,
                pad_token_id,
                config.device,
                config.dtype,
            )
        )
    return jobs


@dataclass
class _Prepared:
    """What the data stages produce: the split, the training chunks and their clusters."""

    split: Split
    reports: dict[str, dict]
    chunks: list[Chunk]
    embeddings: np.ndarray  # (n, dim) unit rows
    assignments: np.ndarray  # (n,) expert id of each chunk
    centroids: np.ndarray  # (K, dim) unit rows
    labels: list[str]
    quality: dict


def _prepare(config: BuildConfig, tokenizer, encoder, timer: _Timer, progress: bool) -> _Prepared:
    """Read → split → chunk → embed → cluster: everything before the first file is written."""
    with timer.stage("read"):
        documents, reports = read_corpora(config.corpora)
    with timer.stage("split"):
        split = split_documents(documents, config.test_fraction, config.split_seed)
    with timer.stage("chunk"):
        chunks = chunk_documents(
            split.train,
            tokenizer,
            window=config.window,
            stride=config.stride,
            min_tokens=config.min_tokens,
            max_chunks_per_document=config.max_chunks_per_document,
        )
        if not chunks:
            raise CorpusError(
                f"the {len(split.train)} training documents give no chunk of at least "
                f"{config.min_tokens} tokens; add longer documents or lower min_tokens"
            )
    with timer.stage("embed"):
        embeddings = encoder.encode(
            [c.text for c in chunks], batch_size=config.embed_batch_size, show_progress=progress
        )
    with timer.stage("cluster"):
        assignments = cluster_embeddings(embeddings, config.experts, seed=config.seed)
        labels = label_clusters(
            [c.text for c in chunks], assignments, config.experts, config.label_terms
        )
        quality = {
            "topic": cluster_quality(assignments, [c.label for c in chunks]),
            "domain": cluster_quality(assignments, [c.domain for c in chunks]),
        }
    return _Prepared(
        split=split,
        reports=reports,
        chunks=chunks,
        embeddings=embeddings,
        assignments=assignments,
        centroids=centroids(embeddings, assignments, config.experts),
        labels=labels,
        quality=quality,
    )


def run_build(
    config: BuildConfig,
    out: str | os.PathLike,
    progress: bool = True,
    on_saved: Callable[[int], None] | None = None,
) -> BuildResult:
    """Build a bank from ``config`` into ``out``, resuming an interrupted build of the same config.

    ``on_saved(job_id)`` runs after each adapter folder is complete (a test hook).
    """

    config = config.resolved()
    out = Path(out).expanduser()
    config_hash = config.content_hash()
    if check_output(out, config_hash) == "done":
        logger.info("%s is a finished bank of this configuration: nothing to do", out)
        return BuildResult(out, Bank.load(out).manifest, [], [], nothing_to_do=True)

    timer = _Timer()
    started = time.perf_counter()
    with timer.stage("load_model"):
        model, tokenizer = load_base_model(
            config.base_model, dtype=config.dtype, device=config.device
        )
        encoder = Encoder(config.encoder, device=config.device, cache_dir=_embedding_cache())
    prepared = _prepare(config, tokenizer, encoder, timer, progress)

    # Only now, with the input known to be usable, does the build write anything.
    out.mkdir(parents=True, exist_ok=True)
    _write_state(out, {"config_hash": config_hash, "status": "in_progress"})
    (out / CONFIG_NAME).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    with timer.stage("write_index"):
        data = write_split(out, prepared.split, config.split_seed, config.test_fraction)
        data.update(
            write_chunk_index(out, prepared.chunks, prepared.embeddings, prepared.assignments)
        )
        write_centroids(out, prepared.centroids)

    jobs = _make_jobs(config, prepared.chunks, prepared.assignments, tokenizer.pad_token_id)
    records: dict[int, dict] = {}
    for job in jobs:
        record = _finished_record(out, job)
        if record is not None:
            records[job.id] = record
    reused = sorted(records)
    if reused:
        logger.info("resuming: keeping %d finished adapter(s) %s", len(reused), reused)
    todo = [job for job in jobs if job.id not in records]

    def save(job: TrainJob, result: TrainResult) -> None:
        folder = out / _adapter_dir(job.id)
        save_adapter(result.adapter, folder)
        record = {
            "digest": _job_digest(job),
            "seed": job.seed,
            "n_chunks": len(job.token_ids),
            "n_tokens": result.n_tokens,
            "seconds": round(result.seconds, 3),
            "losses": result.losses,
        }
        (folder / TRAINING_RECORD).write_text(json.dumps(record))
        records[job.id] = record
        logger.info(
            "%s: %d chunks, %d tokens, %.0f s, loss %.3f -> %.3f",
            job.name,
            len(job.token_ids),
            result.n_tokens,
            result.seconds,
            result.losses[0],
            result.losses[-1],
        )
        bar.update(1)
        if on_saved is not None:
            on_saved(job.id)

    executor = make_executor(
        config.executor,
        model=model,
        progress=progress,
        address=config.ray_address,
        num_cpus=config.ray_num_cpus,
        cpus_per_task=config.train.num_threads,
        max_retries=config.ray_max_retries,
        gpus_per_task=config.ray_gpus_per_task,
    )
    bar = tqdm(total=len(jobs), initial=len(reused), desc="adapters", disable=not progress)
    with timer.stage("train"), bar:
        executor.run(todo, save)

    with timer.stage("manifest"):
        manifest = _manifest(out, config, prepared, model, encoder, jobs, records, data)
        manifest.build.update(
            config_hash=config_hash,
            stage_seconds=dict(timer.seconds),
            total_seconds=round(time.perf_counter() - started, 3),
            resumed_adapters=reused,
        )
        write_manifest(out, manifest)
    _write_state(out, {"config_hash": config_hash, "status": "done"})
    return BuildResult(out, manifest, [j.id for j in todo], reused)


def _embedding_cache() -> Path:

    return ttmm_home() / "embeddings"


def _manifest(
    out: Path,
    config: BuildConfig,
    prepared: _Prepared,
    model,
    encoder,
    jobs: list[TrainJob],
    records: dict[int, dict],
    data: dict,
) -> BankManifest:
    chunks, assignments = prepared.chunks, prepared.assignments

    def info(job: TrainJob, label: str) -> ExpertInfo:
        record = records[job.id]
        path = _adapter_dir(job.id)
        if job.id == FINETUNE_JOB:
            members = chunks
        else:
            members = [chunks[i] for i in np.flatnonzero(assignments == job.id)]
        return ExpertInfo.describe(
            max(job.id, 0),
            path,
            load_adapter(out / path),
            out,
            label=label,
            n_chunks=record["n_chunks"],
            n_tokens=record["n_tokens"],
            loss_curve=_downsample(record["losses"]),
            extra={
                "seed": record["seed"],
                "seconds": record["seconds"],
                "tokens_per_second": round(record["n_tokens"] / max(record["seconds"], 1e-9), 2),
                "domains": domain_counts(members),
                "n_documents": len({c.doc_id for c in members}),
            },
        )

    experts = [info(job, prepared.labels[job.id]) for job in jobs if job.id != FINETUNE_JOB]
    finetune = next(
        (info(job, "all training chunks") for job in jobs if job.id == FINETUNE_JOB), None
    )
    expert_tokens = sum(e.n_tokens for e in experts)
    expert_seconds = sum(e.extra["seconds"] for e in experts)
    data.update(
        {
            "corpora": list(config.corpora),
            "documents": {
                d: {"train": len(v["train"]), "test": len(v["test"])}
                for d, v in prepared.split.ids_by_domain().items()
            },
            "chunks_per_domain": domain_counts(chunks),
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
            },
            "cluster_quality": prepared.quality,
            "corpus_reports": prepared.reports,
            "cpu_count": os.cpu_count(),
        },
    )
