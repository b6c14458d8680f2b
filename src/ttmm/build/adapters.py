"""Training a build's adapters (design §2, train time, steps 5-6, and §7's branched experts).

Which adapters a build trains and in what order: the experts and the fine-tuning baseline in
one batch; or, when experts branch from the fine-tuning adapter, the baseline first and then
the experts started from it (and the equal-compute continuation of the baseline). An adapter
whose folder already holds a finished result of exactly the same job is kept, not retrained,
which is how a killed build resumes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ttmm.adapter import AdapterError, load_adapter, save_adapter
from ttmm.atomic import atomic_write_json
from ttmm.bank import FINETUNE_DIR
from ttmm.build.budget import finetune_job, job_digest, planned
from ttmm.build.executors import CONTINUED_JOB, TrainJob
from ttmm.build.faults import checkpoint
from ttmm.build.links import link_tree
from ttmm.build.manifest import adapter_dir
from ttmm.build.train import TrainResult

logger = logging.getLogger(__name__)

TRAINING_RECORD = "training.json"
"""Written into an adapter folder once it is complete; its ``digest`` names the job."""


def finished_record(out: Path, job: TrainJob, folder: Path | None = None) -> dict | None:
    """The training record of a complete adapter folder (``out``'s for this job, or
    ``folder``) for exactly this job, else None. Records of older builds, whose digest
    counted the thread count, are recognised too."""
    folder = folder or out / adapter_dir(job.id)
    try:
        record = json.loads((folder / TRAINING_RECORD).read_text())
        load_adapter(folder)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AdapterError):
        return None
    digest = record.get("digest")
    return record if digest in (job_digest(job), job_digest(job, legacy=True)) else None


class AdapterTraining:
    """Runs jobs on an executor, saves each adapter with its record, keeps finished ones."""

    def __init__(
        self,
        out: Path,
        executor,
        total: int,
        progress: bool,
        on_saved: Callable[[int], None] | None = None,
        store: Path | None = None,
    ):
        self.out, self.executor, self.on_saved = out, executor, on_saved
        self.store = store
        """Where fine-tuning adapters are shared between builds, by job digest (or None)."""
        self.records: dict[int, dict] = {}
        self.reused: list[int] = []
        self.trained: list[int] = []
        self.bar = tqdm(total=total, desc="adapters", disable=not progress)

    def run(self, phase: list[TrainJob]) -> None:
        """Train the jobs of a phase that no finished adapter folder already holds."""
        todo = []
        for job in phase:
            self._take_from_store(job)
            record = finished_record(self.out, job)
            if record is None:
                todo.append(job)
            else:
                self.records[job.id] = record
                self.reused.append(job.id)
                self.bar.update(1)
        self.executor.run(todo, self.save)
        self.trained.extend(job.id for job in todo)

    def save(self, job: TrainJob, result: TrainResult) -> None:
        folder = self.out / adapter_dir(job.id)
        save_adapter(result.adapter, folder)
        record = {
            "digest": job_digest(job),
            "seed": job.seed,
            "n_chunks": len(job.token_ids),
            "planned_tokens": planned(job),
            "n_tokens": result.n_tokens,
            "seconds": round(result.seconds, 3),
            "train_seconds": round(result.train_seconds, 3),
            "losses": result.losses,
            "n_validation_chunks": len(job.validation),
            "val_before": result.val_before,
            "val_after": result.val_after,
        }
        atomic_write_json(folder / TRAINING_RECORD, record, indent=None)
        self.records[job.id] = record
        self._put_in_store(job)
        logger.info(
            "%s: %d chunks, %d tokens, %.0f s, loss %.3f -> %.3f",
            job.name,
            len(job.token_ids),
            result.n_tokens,
            result.seconds,
            result.losses[0],
            result.losses[-1],
        )
        self.bar.update(1)
        if self.on_saved is not None:
            self.on_saved(job.id)
        checkpoint("adapter_saved")

    def _stored(self, job: TrainJob) -> Path | None:
        """The store's folder for this job: only fine-tuning jobs are shared (an expert's
        chunks depend on K)."""
        if self.store is None or job.id >= 0:
            return None
        return self.store / job_digest(job)

    def _take_from_store(self, job: TrainJob) -> None:
        stored = self._stored(job)
        if stored is None or finished_record(self.out, job, stored) is None:
            return
        if finished_record(self.out, job) is None:
            link_tree(stored, self.out / adapter_dir(job.id))
            logger.info("%s: linked from the adapter store %s", job.name, stored)

    def _put_in_store(self, job: TrainJob) -> None:
        stored = self._stored(job)
        if stored is not None and finished_record(self.out, job, stored) is None:
            link_tree(self.out / adapter_dir(job.id), stored)


def train_adapters(config, training: AdapterTraining, experts: list[TrainJob], data) -> list:
    """Train every adapter the build asks for; returns all jobs (experts first).

    ``data`` is what :func:`ttmm.build.budget.finetune_job` needs: ``(chunks, validation,
    pad_id, budget)``.
    """
    chunks, validation, pad_id, budget = data
    expert_total = sum(planned(job) for job in experts)
    if not config.with_finetune:
        training.run(experts)
        return list(experts)
    finetune = finetune_job(config, chunks, validation, pad_id, budget or expert_total)
    if config.branch_from is None:
        jobs = [*experts, finetune]
        training.run(jobs)  # experts and baseline are independent: one batch (parallel on Ray)
        later = []
    else:
        training.run([finetune])
        start = load_adapter(training.out / FINETUNE_DIR)
        jobs = [*(replace(job, init=start) for job in experts), finetune]
        later = jobs[: len(experts)]
    if config.continue_finetune:
        start = load_adapter(training.out / FINETUNE_DIR)
        continued = finetune_job(
            config, chunks, validation, pad_id, expert_total, init=start, job_id=CONTINUED_JOB
        )
        jobs.append(continued)
        later.append(continued)
    training.run(later)
    return jobs
