"""The train-time pipeline (design §2, train time): a raw corpus in, an expert bank out.

Stages, each timed: read → split → chunk → embed → cluster → write index → train experts (and
the fine-tuning baseline) → manifest. The output folder holds a small build-state file
(``.ttmm-build.json``, with the hash of the resolved configuration) from the moment the build
writes anything, so a killed build resumes and keeps its finished adapters (and removes the
staging files of writes the kill cut short); ``manifest.json`` is written last, so a half-built
folder is never mistaken for a bank. ``tests/test_build_faults.py`` kills builds at every
stage (:mod:`ttmm.build.faults`) and checks the resumed bank equals an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from safetensors import SafetensorError

from ttmm.adapter import load_adapter
from ttmm.assets import load_base_model, ttmm_home
from ttmm.atomic import atomic_write_json, atomic_write_text, remove_staging
from ttmm.bank import (
    FINETUNE_DIR,
    MANIFEST_NAME,
    Bank,
    BankManifest,
    write_centroids,
    write_manifest,
)
from ttmm.build.adapters import AdapterTraining, train_adapters
from ttmm.build.budget import (
    expert_jobs,
    measure_throughput,
)
from ttmm.build.chunks import write_chunk_index, write_split
from ttmm.build.cluster import (
    centroids,
    cluster_embeddings,
    cluster_quality,
    label_clusters,
    nearest_centroid,
)
from ttmm.build.config import BuildConfig, BuildError
from ttmm.build.corpus import (
    Chunk,
    CorpusError,
    Document,
    Split,
    chunk_documents,
    read_corpora,
    split_documents,
    split_validation,
)
from ttmm.build.dedup import drop_near_duplicates
from ttmm.build.executors import make_executor
from ttmm.build.faults import checkpoint
from ttmm.build.health import expert_health
from ttmm.build.manifest import build_manifest
from ttmm.embed import Encoder
from ttmm.quality_gate import apply_gate

logger = logging.getLogger(__name__)

STATE_NAME = ".ttmm-build.json"
CONFIG_NAME = "build_config.yaml"


@dataclass
class BuildResult:
    """What ``run_build`` did."""

    path: Path
    manifest: BankManifest
    trained: list[int]  # adapter ids trained in this run (-1 = fine-tuning baseline)
    reused: list[int]  # adapter ids kept from an interrupted run
    nothing_to_do: bool = False


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        logger.info("stage %s ...", name)
        yield
        self.seconds[name] = round(time.perf_counter() - started, 3)
        logger.info("stage %s: %.1f s", name, self.seconds[name])


def read_state(out: Path) -> dict | None:
    path = out / STATE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BuildError(f"{path} is corrupt ({err}); delete {out} to rebuild") from err


def write_state(out: Path, payload: dict) -> None:
    atomic_write_json(out / STATE_NAME, payload, indent=1)


def check_output(out: Path, config_hash: str, legacy_hash: str | None = None) -> str:
    """``fresh``, ``resume`` or ``done`` for building into ``out``; BuildError for anything else.

    Nothing is written here. A folder that is neither empty nor our own build is refused:
    a build never overwrites files it did not make. ``legacy_hash``: the configuration's hash
    as an older ttmm wrote it (with the thread count), also taken as this build's.
    """
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file; choose a new or empty folder")
    if not out.exists():
        return "fresh"
    state = read_state(out)
    if state is None:
        entries = sorted(p.name for p in out.iterdir())
        if not entries:
            return "fresh"
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise BuildError(
            f"--out {out} is not empty and holds no ttmm build ({shown}); choose a new or empty "
            "folder (ttmm never overwrites files it did not write)"
        )
    if state.get("config_hash") not in (config_hash, legacy_hash):
        raise BuildError(
            f"--out {out} holds a build with a different configuration (hash "
            f"{state.get('config_hash')}, now {config_hash}); rerun with that build's "
            f"{CONFIG_NAME}, choose another --out, or delete the folder"
        )
    if state.get("status") == "done" and (out / MANIFEST_NAME).is_file():
        return "done"
    return "resume"


@dataclass
class _Prepared:
    """What the data stages produce: the split, the training chunks and their clusters."""

    split: Split  # held-out documents after near-duplicate removal
    reports: dict[str, dict]
    chunks: list[Chunk]
    embeddings: np.ndarray  # (n, dim) unit rows
    assignments: np.ndarray  # (n,) expert id of each chunk
    centroids: np.ndarray  # (K, dim) unit rows
    labels: list[str]
    quality: dict
    validation: list[Chunk]  # chunks of the validation documents (train nothing)
    val_assignments: np.ndarray  # (n_val,) expert of the nearest centroid
    validation_documents: list[Document]
    near_duplicates: dict  # held-out id -> training id it duplicates


@dataclass
class Documents:
    """Documents split, deduplicated and chunked with a configuration's settings."""

    split: Split  # held-out documents after near-duplicate removal
    near_duplicates: dict  # held-out id -> training id it duplicates
    validation_documents: list[Document]
    chunks: list[Chunk]  # of the training documents but the validation ones
    validation: list[Chunk]  # of the validation documents


def split_and_chunk(
    config: BuildConfig, documents: list[Document], tokenizer, timer: StageTimer, what: str = ""
) -> Documents:
    """Split → dedup → chunk ``documents`` with ``config``'s seeds, fractions and window.
    ``what`` names the documents in the error when they give no chunk."""
    with timer.stage("split"):
        split = split_documents(documents, config.test_fraction, config.split_seed)
    near_duplicates: dict = {}
    if config.near_duplicate_threshold is not None:
        with timer.stage("dedup"):
            found = drop_near_duplicates(
                split.train, split.test, config.near_duplicate_threshold, config.split_seed
            )
            split = Split(train=split.train, test=found.kept)
            near_duplicates = found.dropped
    train_docs, validation_docs = split_validation(
        split.train, config.validation_fraction, config.split_seed
    )
    with timer.stage("chunk"):
        options = {
            "window": config.window,
            "stride": config.stride,
            "min_tokens": config.min_tokens,
            "max_chunks_per_document": config.max_chunks_per_document,
        }
        chunks = chunk_documents(train_docs, tokenizer, **options)
        validation = chunk_documents(validation_docs, tokenizer, **options)
        if not chunks:
            raise CorpusError(
                f"the {len(train_docs)} {what}training documents give no chunk of at least "
                f"{config.min_tokens} tokens; add longer documents or lower min_tokens"
            )
    return Documents(split, near_duplicates, validation_docs, chunks, validation)


def embed_chunks(
    config: BuildConfig, encoder, docs: Documents, timer: StageTimer, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings of the training chunks (n, dim) and of the validation chunks."""
    with timer.stage("embed"):
        embedded = encoder.encode(
            [c.text for c in docs.chunks + docs.validation],
            batch_size=config.embed_batch_size,
            show_progress=progress,
        )
        checkpoint("embed")
    return embedded[: len(docs.chunks)], embedded[len(docs.chunks) :]


def _prepare(
    config: BuildConfig, tokenizer, encoder, timer: StageTimer, progress: bool
) -> _Prepared:
    """Read → split → dedup → chunk → embed → cluster: everything before the first write."""
    with timer.stage("read"):
        documents, reports = read_corpora(config.corpora)
    docs = split_and_chunk(config, documents, tokenizer, timer)
    chunks, validation = docs.chunks, docs.validation
    embeddings, val_embeddings = embed_chunks(config, encoder, docs, timer, progress)
    with timer.stage("cluster"):
        assignments = cluster_embeddings(embeddings, config.experts, seed=config.seed)
        labels = label_clusters(
            [c.text for c in chunks], assignments, config.experts, config.label_terms
        )
        quality = {
            "topic": cluster_quality(assignments, [c.label for c in chunks]),
            "domain": cluster_quality(assignments, [c.domain for c in chunks]),
        }
        centroid_rows = centroids(embeddings, assignments, config.experts)
    return _Prepared(
        split=docs.split,
        reports=reports,
        chunks=chunks,
        embeddings=embeddings,
        assignments=assignments,
        centroids=centroid_rows,
        labels=labels,
        quality=quality,
        validation=validation,
        val_assignments=nearest_centroid(val_embeddings, centroid_rows),
        validation_documents=docs.validation_documents,
        near_duplicates=docs.near_duplicates,
    )


def run_build(
    config: BuildConfig,
    out: str | os.PathLike,
    progress: bool = True,
    on_saved: Callable[[int], None] | None = None,
) -> BuildResult:
    """Build a bank from ``config`` into ``out``, resuming an interrupted build of the same config.

    ``on_saved(job_id)`` runs after each adapter folder is complete (a test hook). A write into
    ``out`` that fails (full disk, read-only folder) raises :class:`BuildError` saying so; every
    write is atomic and ``manifest.json`` comes last, so the folder is then no bank, and
    rerunning the same build resumes it.
    """
    with writes_into(out):
        return _run_build(config, out, progress, on_saved)


@contextmanager
def writes_into(out: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write into ``out`` (full disk, read-only folder) into one
    :class:`BuildError` saying so; any other error passes through."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        failure = write_failure(Path(out).expanduser(), err)
        if failure is None:
            raise
        raise failure from err


_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def write_failure(out: Path, err: Exception) -> BuildError | None:
    """The error to show for ``err`` if it is a failed write into ``out``, else None.

    safetensors reports I/O errors as ``SafetensorError`` with ``(os error N) at path "P"``.
    """
    text = str(err)
    paths = [getattr(err, "filename", None), getattr(err, "filename2", None)]
    paths += re.findall(r'at path "([^"]+)"', text)
    root = out.resolve()
    inside = [Path(os.fsdecode(p)).resolve().is_relative_to(root) for p in paths if p]
    if not any(inside):
        return None
    code = getattr(err, "errno", None)
    if code is None and (found := re.search(r"os error (\d+)", text)):
        code = int(found.group(1))
    reason = _REASONS.get(code, getattr(err, "strerror", None) or text)
    return BuildError(
        f"cannot write the bank into {out}: {reason}; free some space or make the folder "
        "writable (or choose another --out), then rerun the same command to resume the build"
    )


def _run_build(
    config: BuildConfig,
    out: Path | str | os.PathLike,
    progress: bool,
    on_saved: Callable[[int], None] | None,
) -> BuildResult:
    config = config.resolved()
    out = Path(out).expanduser()
    config_hash = config.content_hash()
    if check_output(out, config_hash, config.content_hash(legacy=True)) == "done":
        logger.info("%s is a finished bank of this configuration: nothing to do", out)
        return BuildResult(out, Bank.load(out).manifest, [], [], nothing_to_do=True)

    timer = StageTimer()
    started = time.perf_counter()
    with timer.stage("load_model"):
        model, tokenizer = load_base_model(
            config.base_model, dtype=config.dtype, device=config.device
        )
        encoder = Encoder(config.encoder, device=config.device, cache_dir=embedding_cache())
    prepared = _prepare(config, tokenizer, encoder, timer, progress)

    budget, budget_info = _budget(config, read_state(out) or {}, model, prepared, tokenizer)

    # Only now, with the input known to be usable, does the build write anything.
    out.mkdir(parents=True, exist_ok=True)
    for path in remove_staging(out):  # what writes cut short by a killed build left behind
        logger.info("removed %s, left by an interrupted write", path)
    write_state(out, {"config_hash": config_hash, "status": "in_progress", "budget": budget_info})
    atomic_write_text(out / CONFIG_NAME, yaml.safe_dump(config.to_dict(), sort_keys=False))
    with timer.stage("write_index"):
        data = write_split(
            out,
            prepared.split,
            config.split_seed,
            config.test_fraction,
            validation=[d.id for d in prepared.validation_documents],
            near_duplicates=prepared.near_duplicates,
        )
        data.update(
            write_chunk_index(out, prepared.chunks, prepared.embeddings, prepared.assignments)
        )
        write_centroids(out, prepared.centroids)

    pad_id = tokenizer.pad_token_id
    experts = expert_jobs(
        config,
        prepared.chunks,
        prepared.assignments,
        prepared.validation,
        prepared.val_assignments,
        pad_id,
        budget,
    )
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
    total = len(experts) + int(config.with_finetune) + int(config.continue_finetune)
    store = Path(config.adapter_store).expanduser() if config.adapter_store else None
    training = AdapterTraining(out, executor, total, progress, on_saved, store)
    with timer.stage("train"), training.bar:
        jobs = train_adapters(
            config, training, experts, (prepared.chunks, prepared.validation, pad_id, budget)
        )
    reused = sorted(training.reused)
    if reused:
        logger.info("resumed: kept %d finished adapter(s) %s", len(reused), reused)

    with timer.stage("quality_gate"):
        finetune = load_adapter(out / FINETUNE_DIR) if config.with_finetune else None
        health = expert_health(
            model, experts, training.records, finetune, from_finetune=config.branch_from is not None
        )

    with timer.stage("manifest"):
        manifest = build_manifest(
            out, config, prepared, model, encoder, jobs, training.records, data
        )
        disabled = apply_gate(manifest, health)
        for k in disabled:
            logger.warning("expert %d disabled by the quality gate: %s", k,
                           manifest.experts[k].disabled["reason"])  # fmt: skip
        manifest.build.update(
            config_hash=config_hash,
            stage_seconds=dict(timer.seconds),
            total_seconds=round(time.perf_counter() - started, 3),
            resumed_adapters=reused,
            budget=budget_info,
        )
        write_manifest(out, manifest)
    write_state(out, {"config_hash": config_hash, "status": "done", "budget": budget_info})
    return BuildResult(out, manifest, training.trained, reused)


def _budget(
    config: BuildConfig, state: dict, model, prepared: _Prepared, tokenizer
) -> tuple[int | None, dict | None]:
    """The experts' token budget and how it was set. ``budget_minutes`` is converted once, from
    a measured throughput, and the result kept in the state file for a resumed build."""
    if config.budget_tokens is not None:
        return config.budget_tokens, {"tokens": config.budget_tokens, "source": "budget_tokens"}
    if config.budget_minutes is None:
        return None, None
    if state.get("budget"):
        return int(state["budget"]["tokens"]), state["budget"]
    rate = measure_throughput(model, config, prepared.chunks, tokenizer.pad_token_id)
    tokens = max(2 * config.experts, int(config.budget_minutes * 60 * rate))
    logger.info(
        "budget: %.1f min at a measured %.1f tokens/s = %d tokens",
        config.budget_minutes,
        rate,
        tokens,
    )
    info = {
        "tokens": tokens,
        "source": "budget_minutes",
        "minutes": config.budget_minutes,
        "measured_tokens_per_second": round(rate, 2),
    }
    return tokens, info


def embedding_cache() -> Path:

    return ttmm_home() / "embeddings"
