"""Growing a bank with new documents (issue 22): ``ttmm update PARENT --corpus SPEC --out NEW``.

The new documents go through the parent's own data stages (its split seed and fractions,
chunking, tokenizer and encoder), minus any document the parent already holds. Each new chunk
joins the expert of its nearest centroid, unless it is *novel*: its cosine similarity to every
centroid is below the similarity under which only ``novelty_quantile`` (5 %) of the parent's
own training chunks sit to their centroid. Novel chunks, when there are enough of them for an
expert (half the parent's median cluster size by default), are clustered into new experts,
about one per median cluster's worth of chunks; fewer join their nearest expert.

An existing expert that received new chunks is retrained *continued from its adapter* on the new
chunks plus a replay of its old ones (``replay`` old tokens per new token, a seeded sample;
1.0 by default), for as many training tokens per data token as the parent's experts had. Why
replay and not all old chunks: the adapter already learned its old chunks, so retraining on
all of them would cost as much as the original training for every touched expert, while no
replay at all lets the new text overwrite what the expert knew (catastrophic forgetting; the
replay mix is the standard remedy of continual learning). New experts start like the parent's
experts (fresh, or from the fine-tuning adapter in a branched bank). Touched centroids are
recomputed over their old and new chunks; the others stay bit for bit. The fine-tuning
baseline is kept unless ``refresh_finetune``, which continues it on all new chunks plus the
same replay. Every trained expert then goes through the quality gate
(:mod:`ttmm.quality_gate`).

Untouched experts are hard links to the parent's files (a copy only where the file system
refuses links), so their bytes and checksums are the parent's and they take no space. The
parent is only read: every write goes into ``out``, atomically, and ``manifest.json`` comes last.
A killed update resumes like a build (the state file holds the update's hash: the parent's
manifest digest and the options), keeping the experts it finished. The new manifest's
``lineage`` names the parent by folder and manifest digest and lists what changed
(``ttmm diff PARENT NEW`` prints it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml

from ttmm.adapter import load_adapter
from ttmm.assets import load_base_model
from ttmm.atomic import atomic_write_text, remove_staging
from ttmm.bank import (
    FINETUNE_CONTINUED_DIR,
    FINETUNE_DIR,
    Bank,
    BankManifest,
    expert_dir,
    manifest_digest,
    write_centroids,
    write_manifest,
)
from ttmm.build.adapters import AdapterTraining
from ttmm.build.budget import budgeted, data_tokens, train_job
from ttmm.build.chunks import (
    extend_split,
    read_chunks,
    read_split,
    read_test_documents,
    write_chunk_index,
)
from ttmm.build.cluster import centroids, cluster_embeddings, label_clusters, nearest_centroid
from ttmm.build.config import BuildConfig, BuildError
from ttmm.build.corpus import (
    Chunk,
    CorpusError,
    CorpusSpec,
    Split,
    domain_counts,
    read_corpora,
)
from ttmm.build.executors import FINETUNE_JOB, TrainJob, make_executor
from ttmm.build.faults import checkpoint
from ttmm.build.health import expert_health
from ttmm.build.links import link_folders
from ttmm.build.manifest import adapter_info
from ttmm.build.pipeline import (
    CONFIG_NAME,
    BuildResult,
    StageTimer,
    check_output,
    embed_chunks,
    embedding_cache,
    split_and_chunk,
    write_state,
    writes_into,
)
from ttmm.embed import Encoder
from ttmm.quality_gate import ExpertHealth, apply_gate

logger = logging.getLogger(__name__)

UPDATER = "ttmm update"


@dataclass(frozen=True)
class UpdateOptions:
    """What an update adds and how (everything but the parent and ``out``)."""

    corpora: tuple[str, ...]
    """Corpus specs of the new documents (as for ``ttmm build``)."""
    replay: float = 1.0
    """Old-chunk tokens replayed per new token when an existing expert is retrained."""
    novelty_quantile: float = 0.05
    """A new chunk is novel when its best centroid similarity is below this quantile of the
    parent's chunks' similarities to their own centroid."""
    min_new_expert_chunks: int | None = None
    """Novel chunks needed to create new experts (None: half the parent's median cluster size,
    at least 2); fewer join their nearest expert."""
    refresh_finetune: bool = False
    """Continue the fine-tuning baseline on the new chunks (plus replay) instead of keeping it."""
    base_model: str | None = None
    """Where the base model is now, when the parent's build_config no longer points at it."""
    device: str = "auto"
    """Where the base model and encoder run (not part of the update's identity)."""

    def __post_init__(self) -> None:
        if isinstance(self.corpora, str):
            object.__setattr__(self, "corpora", (self.corpora,))
        object.__setattr__(self, "corpora", tuple(self.corpora))
        if not self.corpora:
            raise BuildError("give the new documents: --corpus SPEC (repeatable)")
        if not self.replay >= 0:
            raise BuildError(f"replay must be >= 0 (old tokens per new token), got {self.replay}")
        if not 0.0 <= self.novelty_quantile < 1.0:
            raise BuildError(f"novelty_quantile must be in [0, 1), got {self.novelty_quantile}")
        if self.min_new_expert_chunks is not None and self.min_new_expert_chunks < 1:
            raise BuildError(
                f"min_new_expert_chunks must be >= 1, got {self.min_new_expert_chunks}"
            )
        for spec in self.corpora:
            CorpusSpec.parse(spec)

    def identity(self) -> dict:
        """The fields that determine the updated bank (placement left out)."""
        data = asdict(self)
        data["corpora"] = list(self.corpora)
        del data["base_model"], data["device"]
        return data


@dataclass
class _Plan:
    """The data side of an update, before anything is written."""

    chunks: list[Chunk]  # parent's training chunks, then the new ones
    embeddings: np.ndarray  # (n, dim) unit rows, same order
    assignments: np.ndarray  # (n,) expert of each chunk
    n_old: int
    centroids: np.ndarray  # (K', dim) the parent's rows, touched ones recomputed, new appended
    added: list[int]
    retrained: list[int]
    labels: dict[int, str]  # new labels of the touched and added experts
    validation: list[Chunk]
    val_assignments: np.ndarray
    split: Split
    validation_ids: list[str]
    near_duplicates: dict
    reports: dict
    novelty: dict


def run_update(
    parent: str | os.PathLike,
    options: UpdateOptions,
    out: str | os.PathLike,
    progress: bool = True,
    on_saved: Callable[[int], None] | None = None,
) -> BuildResult:
    """Write the bank ``parent`` grown by ``options.corpora`` into ``out`` (a new folder),
    resuming an interrupted update of the same parent and options. ``parent`` is never
    written to."""
    with writes_into(out):
        return _run_update(Path(parent).expanduser(), options, Path(out).expanduser(), progress,
                           on_saved)  # fmt: skip


def _parent_config(parent: Path) -> BuildConfig:
    path = parent / CONFIG_NAME
    if not path.is_file():
        raise BuildError(
            f"{parent} has no {CONFIG_NAME}: it was not made by `ttmm build` (imported banks "
            "carry no training data or recipe), so it cannot be updated; build it instead"
        )
    return BuildConfig.from_file(path)


def update_hash(digest: str, options: UpdateOptions) -> str:
    """The identity of an update's result: the parent's manifest digest and the options."""
    payload = json.dumps({"parent": digest, **options.identity()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _run_update(
    parent: Path,
    options: UpdateOptions,
    out: Path,
    progress: bool,
    on_saved: Callable[[int], None] | None,
) -> BuildResult:
    if out.resolve() == parent.resolve() or out.resolve().is_relative_to(parent.resolve()):
        raise BuildError(
            f"--out {out} is the parent bank {parent} (or inside it): an update writes a new "
            f"version and never changes its parent; choose a new folder, e.g. {parent}-v2"
        )
    bank = Bank.load(parent)
    config = _parent_config(parent)
    digest = manifest_digest(parent)
    identity = update_hash(digest, options)
    if check_output(out, identity) == "done":
        logger.info("%s is a finished update of %s with these options: nothing to do", out, parent)
        return BuildResult(out, Bank.load(out).manifest, [], [], nothing_to_do=True)

    timer = StageTimer()
    started = time.perf_counter()
    with timer.stage("load_model"):
        model, tokenizer = load_base_model(
            options.base_model or config.base_model, dtype=config.dtype, device=options.device
        )
        encoder = Encoder(config.encoder, device=options.device, cache_dir=embedding_cache())
    bank.check_compatible(model, encoder.dim)
    plan = _plan(config, options, bank, tokenizer, encoder, timer, progress)
    pad_id = tokenizer.pad_token_id
    jobs = _jobs(config, options, bank, plan, pad_id)

    # Only now, with the input known to be usable, does the update write anything.
    out.mkdir(parents=True, exist_ok=True)
    for path in remove_staging(out):
        logger.info("removed %s, left by an interrupted write", path)
    write_state(out, {"config_hash": identity, "status": "in_progress", "parent": digest})
    grown = replace(config, corpora=(*config.corpora, *options.corpora),
                    experts=len(plan.centroids))  # fmt: skip
    atomic_write_text(out / CONFIG_NAME, yaml.safe_dump(grown.to_dict(), sort_keys=False))
    refreshed = any(job.id == FINETUNE_JOB for job in jobs)
    with timer.stage("link"):
        kept = [k for k in range(bank.num_experts) if k not in plan.retrained]
        folders = [expert_dir(k) for k in kept]
        if bank.manifest.finetune is not None and not refreshed:
            folders.append(FINETUNE_DIR)
        if bank.manifest.finetune_continued is not None:
            folders.append(FINETUNE_CONTINUED_DIR)
        known = link_folders(parent, out, folders, bank.manifest.files)
    with timer.stage("write_index"):
        data = extend_split(out, read_split(parent), read_test_documents(parent), plan.split,
                            plan.validation_ids, plan.near_duplicates)  # fmt: skip
        data.update(write_chunk_index(out, plan.chunks, plan.embeddings, plan.assignments))
        write_centroids(out, plan.centroids)
    checkpoint("update_written")

    executor = make_executor("sequential", model=model, progress=progress)
    training = AdapterTraining(out, executor, len(jobs), progress, on_saved)
    with timer.stage("train"), training.bar:
        training.run(jobs)

    with timer.stage("quality_gate"):
        experts = [job for job in jobs if job.id >= 0]
        finetune = load_adapter(out / FINETUNE_DIR) if (out / FINETUNE_DIR).is_dir() else None
        measured = expert_health(model, experts, training.records, finetune)

    with timer.stage("manifest"):
        manifest = _manifest(bank, plan, jobs, training.records, out, data, options.corpora)
        health = [ExpertHealth.from_dict(info.health) for info in manifest.experts]
        for job, record in zip(experts, measured, strict=True):
            health[job.id] = record
        disabled = apply_gate(manifest, health)
        for k in disabled:
            logger.warning("expert %d disabled by the quality gate: %s", k,
                           manifest.experts[k].disabled["reason"])  # fmt: skip
        now = datetime.now(UTC).isoformat(timespec="seconds")
        manifest.lineage = {
            "parent": {
                "path": str(parent.resolve()),
                "manifest_sha256": digest,
                "experts": bank.num_experts,
            },  # fmt: skip
            "corpora": list(options.corpora),
            "options": options.identity(),
            "added": plan.added,
            "retrained": plan.retrained,
            "unchanged": len(kept),
            "disabled": disabled,
            "finetune": "refreshed" if refreshed else "kept",
            "novelty": plan.novelty,
            "documents": {
                "train": len(plan.split.train) - len(plan.validation_ids),
                "validation": len(plan.validation_ids),
                "test": len(plan.split.test),
            },
            "chunks": len(plan.chunks) - plan.n_old,
            "corpus_reports": plan.reports,
            "stage_seconds": dict(timer.seconds),
            "total_seconds": round(time.perf_counter() - started, 3),
            "update_hash": identity,
        }
        manifest.history.append(
            {
                "action": "update",
                "by": UPDATER,
                "at": now,
                "parent": digest,
                "corpora": list(options.corpora),
                "added": plan.added,
                "retrained": plan.retrained,
                "disabled": disabled,
            }  # fmt: skip
        )
        manifest.created = now
        write_manifest(out, manifest, known)
    write_state(out, {"config_hash": identity, "status": "done", "parent": digest})
    return BuildResult(out, manifest, training.trained, sorted(training.reused))


def _plan(config: BuildConfig, options, bank: Bank, tokenizer, encoder, timer, progress) -> _Plan:
    """Read, split, chunk and embed the new documents; assign them to experts (or new ones)."""
    parent = Path(bank.path)
    old_chunks, old_embeddings, old_assignments = read_chunks(parent)
    parent_split = read_split(parent)
    with timer.stage("read"):
        documents, reports = read_corpora(options.corpora)
    held = {i for parts in parent_split["domains"].values() for ids in parts.values() for i in ids}
    held |= set(parent_split.get("near_duplicates", {}))
    fresh = [d for d in documents if d.id not in held]
    if not fresh:
        raise CorpusError(
            f"all {len(documents)} documents of {', '.join(options.corpora)} are in {parent} "
            "already; an update needs documents the bank does not hold"
        )
    docs = split_and_chunk(config, fresh, tokenizer, timer, what="new ")
    new_chunks, validation = docs.chunks, docs.validation
    new_embeddings, val_embeddings = embed_chunks(config, encoder, docs, timer, progress)
    with timer.stage("assign"):
        K = bank.num_experts
        parent_rows = bank.centroids.numpy().astype(np.float32)  # (K, dim)
        own = np.einsum("nd,nd->n", old_embeddings, parent_rows[old_assignments])  # (n_old,)
        threshold = float(np.quantile(own, options.novelty_quantile))
        similarity = new_embeddings @ parent_rows.T  # (n_new, K)
        assignments = similarity.argmax(axis=1).astype(np.int64)
        novel = similarity.max(axis=1) < threshold
        typical = float(np.median(np.bincount(old_assignments, minlength=K)))
        needed = options.min_new_expert_chunks or max(2, int(typical) // 2)
        added: list[int] = []
        if novel.sum() >= needed:
            count = int(min(novel.sum(), max(1, round(novel.sum() / max(typical, 1.0)))))
            groups = cluster_embeddings(new_embeddings[novel], count, seed=config.seed)
            assignments[novel] = K + groups
            added = list(range(K, K + count))
        touched = sorted(set(assignments.tolist()))
        chunks = [*old_chunks, *new_chunks]
        embeddings = np.concatenate([old_embeddings, new_embeddings]).astype(np.float32)
        every = np.concatenate([old_assignments, assignments]).astype(np.int64)
        total = K + len(added)
        rows = np.concatenate([parent_rows, np.zeros((len(added), parent_rows.shape[1]), "f4")])
        rows[touched] = centroids(embeddings, every, total)[touched]
        every_label = label_clusters([c.text for c in chunks], every, total, config.label_terms)
    return _Plan(
        chunks=chunks,
        embeddings=embeddings,
        assignments=every,
        n_old=len(old_chunks),
        centroids=rows,
        added=added,
        retrained=[k for k in touched if k < K],
        labels={k: every_label[k] for k in touched},
        validation=validation,
        val_assignments=nearest_centroid(val_embeddings, rows),
        split=docs.split,
        validation_ids=[d.id for d in docs.validation_documents],
        near_duplicates=docs.near_duplicates,
        reports=reports,
        novelty={
            "quantile": options.novelty_quantile,
            "threshold": round(threshold, 6),
            "novel_chunks": int(novel.sum()),
            "min_new_expert_chunks": needed,
            "median_cluster_chunks": typical,
        },
    )


def _density(bank: Bank, plan: _Plan, config: BuildConfig, key: str) -> float:
    """Training tokens per data token the parent gave its experts (``expert_tokens``) or its
    fine-tuning adapter (``finetune_tokens``): what the update gives the adapters it trains."""
    trained = bank.manifest.build.get("training", {}).get(key)
    ids = [c.token_ids for c in plan.chunks[: plan.n_old]]
    return trained / data_tokens(ids, config.train) if trained else float(config.train.epochs)


def _replayed(old: list[Chunk], tokens: float, config: BuildConfig, seed: int) -> list[Chunk]:
    """A seeded sample of ``old`` chunks holding about ``tokens`` tokens (all if fewer)."""
    order = np.random.default_rng(seed).permutation(len(old))
    picked, total = [], 0
    for i in order:
        if total >= tokens:
            break
        picked.append(old[i])
        total += min(len(old[i].token_ids), config.train.max_seq_len)
    return picked


def _jobs(config: BuildConfig, options, bank: Bank, plan: _Plan, pad_id: int) -> list[TrainJob]:
    """One job per retrained or added expert, and the fine-tuning refresh if asked."""
    old, new = plan.chunks[: plan.n_old], plan.chunks[plan.n_old :]
    old_of, new_of = plan.assignments[: plan.n_old], plan.assignments[plan.n_old :]
    density = _density(bank, plan, config, "expert_tokens")
    start = bank.finetune_adapter() if config.branch_from is not None else None
    jobs = []
    for k in [*plan.retrained, *plan.added]:
        chunks = [new[i] for i in np.flatnonzero(new_of == k)]
        init = start
        if k < bank.num_experts:
            fresh = data_tokens([c.token_ids for c in chunks], config.train)
            members = [old[i] for i in np.flatnonzero(old_of == k)]
            chunks += _replayed(members, options.replay * fresh, config, config.seed + k)
            init = bank.read_expert(k)
        ids = [c.token_ids for c in chunks]
        size = data_tokens(ids, config.train)
        train = budgeted(config.train, max(2, round(density * size)), size)
        nearest = np.flatnonzero(plan.val_assignments == k)
        validation = [plan.validation[i].token_ids for i in nearest]
        jobs.append(train_job(config, k, ids, config.seed + k, train, pad_id, init, validation))
    if options.refresh_finetune:
        tuned = bank.finetune_adapter()
        if tuned is None:
            raise BuildError(
                f"{bank.path} has no fine-tuning adapter to refresh; drop --refresh-finetune "
                "(or build the parent with --with-finetune)"
            )
        fresh = data_tokens([c.token_ids for c in new], config.train)
        chunks = new + _replayed(
            old, options.replay * fresh, config, config.seed + len(plan.centroids)
        )
        ids = [c.token_ids for c in chunks]
        size = data_tokens(ids, config.train)
        density = _density(bank, plan, config, "finetune_tokens")
        train = budgeted(config.train, max(2, round(density * size)), size)
        validation = [c.token_ids for c in plan.validation]
        seed = config.seed + len(plan.centroids)
        jobs.append(train_job(config, FINETUNE_JOB, ids, seed, train, pad_id, tuned, validation))
    return jobs


def _manifest(
    bank: Bank, plan: _Plan, jobs, records: dict, out: Path, data: dict, corpora
) -> BankManifest:
    """The parent's manifest with the trained adapters' entries replaced or added."""
    manifest = BankManifest.from_dict(json.loads(json.dumps(bank.manifest.to_dict())))
    new_of = plan.assignments[plan.n_old :]
    for job in jobs:
        record = records[job.id]
        if job.id == FINETUNE_JOB:
            manifest.finetune = adapter_info(out, job, record, "all training chunks", plan.chunks)
            manifest.finetune.extra["initialised_from"] = "parent fine-tuning adapter"
            continue
        members = [plan.chunks[i] for i in np.flatnonzero(plan.assignments == job.id)]
        info = adapter_info(out, job, record, plan.labels[job.id], members)
        info.extra["new_chunks"] = int((new_of == job.id).sum())
        if job.id < bank.num_experts:
            info.extra["initialised_from"] = f"parent expert {job.id}"
            info.disabled = manifest.experts[job.id].disabled  # an operator's choice stays
            manifest.experts[job.id] = info
        else:
            manifest.experts.append(info)
    manifest.adapted_layers = {}  # recomputed from the experts' headers
    before = bank.manifest.data
    data.update(
        corpora=[*before.get("corpora", []), *corpora],
        chunks_per_domain=domain_counts(plan.chunks),
        validation_chunks_per_domain=dict(
            Counter(before.get("validation_chunks_per_domain", {}))
            + Counter(domain_counts(plan.validation))
        ),
    )
    manifest.data = {**bank.manifest.data, **data}
    return manifest
