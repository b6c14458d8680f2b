"""Build executors by name: where the LoRA training jobs of a build run (design §2 step 5).

A job is everything one adapter needs (its chunks' token ids, seed, training config, base model
location), so it runs anywhere: in this process (``sequential``) or as a Ray task (``ray``) that
loads the base model itself. Results come back to the driver, which writes them into the bank,
so Ray workers need no shared filesystem. Same job, same seed, same thread count: same adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ttmm.adapter import LoraAdapter
from ttmm.assets import load_base_model
from ttmm.build.train import LoraTrainConfig, TrainResult, train_lora
from ttmm.device import DEFAULT_DEVICE, device_type

logger = logging.getLogger(__name__)

FINETUNE_JOB = -1  # job id of the fine-tuning baseline; experts are 0..K-1
CONTINUED_JOB = -2  # the fine-tuning baseline continued for the experts' tokens (equal compute)


class ExecutorError(ValueError):
    """An executor name or setting that cannot be used."""


@dataclass(frozen=True)
class TrainJob:
    """One adapter to train: an expert (id >= 0) or the fine-tuning baseline (id -1)."""

    id: int
    token_ids: tuple[tuple[int, ...], ...]
    seed: int
    config: LoraTrainConfig
    base_model: str
    """Base model name or folder, loaded by the worker when it has no model at hand."""
    pad_token_id: int
    device: str = DEFAULT_DEVICE
    """Where a worker that loads the base model itself puts it (see :mod:`ttmm.device`)."""
    dtype: str = "float32"
    """The dtype it loads the base model in; adapters are float32 whatever it is."""
    init: LoraAdapter | None = None
    """Factors the LoRA starts from (branched experts, continued fine-tuning); None = fresh."""
    validation: tuple[tuple[int, ...], ...] = ()
    """Validation chunks scored before and after training (they train nothing)."""

    @property
    def name(self) -> str:
        if self.id == FINETUNE_JOB:
            return "fine-tuning baseline"
        if self.id == CONTINUED_JOB:
            return "fine-tuning continued"
        return f"expert {self.id}"


_MODELS: dict[tuple[str, str, str], torch.nn.Module] = {}  # a worker's base model, loaded once


def run_job(
    job: TrainJob, model: torch.nn.Module | None = None, progress: bool = False
) -> TrainResult:
    """Train one job's adapter on ``model``, or on the base model loaded by name."""
    if model is None:
        key = (job.base_model, job.device, job.dtype)
        if key not in _MODELS:
            _MODELS[key], _ = load_base_model(job.base_model, dtype=job.dtype, device=job.device)
        model = _MODELS[key]
    return train_lora(
        model,
        job.token_ids,
        job.config,
        seed=job.seed,
        progress=job.name if progress else False,
        pad_token_id=job.pad_token_id,
        init=job.init,
        validation=job.validation,
    )


OnResult = Callable[[TrainJob, TrainResult], None]


class SequentialExecutor:
    """Train the jobs one after the other in this process, on the driver's model."""

    name = "sequential"

    def __init__(self, model: torch.nn.Module | None = None, progress: bool = True, **_):
        self.model = model
        self.progress = progress

    def run(self, jobs: Sequence[TrainJob], on_result: OnResult) -> None:
        for job in jobs:
            on_result(job, run_job(job, self.model, progress=self.progress))


class RayExecutor:
    """Each job a Ray task with retries; a local Ray (``num_cpus``) unless ``address`` is set."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_task: int = 1,
        max_retries: int = 2,
        gpus_per_task: float = 1.0,
        **_,
    ):
        if cpus_per_task < 1:
            raise ExecutorError(f"ray cpus_per_task must be at least 1, got {cpus_per_task}")
        if gpus_per_task <= 0:
            raise ExecutorError(f"ray gpus_per_task must be above 0, got {gpus_per_task}")
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_task = cpus_per_task
        self.max_retries = max_retries
        self.gpus_per_task = gpus_per_task

    def run(self, jobs: Sequence[TrainJob], on_result: OnResult) -> None:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address, logging_level=logging.WARNING)
            else:
                ray.init(
                    num_cpus=self.num_cpus,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                )
        try:
            task = ray.remote(num_cpus=self.cpus_per_task, max_retries=self.max_retries)(run_job)
            pending = {
                task.options(num_gpus=self.gpus(job)).remote(self.placed(job)): job for job in jobs
            }
            logger.info("submitted %d training tasks to Ray", len(pending))
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    on_result(job, ray.get(ref))
        finally:
            if started_here:
                ray.shutdown()

    def gpus(self, job: TrainJob) -> float:
        """GPUs a job's task asks Ray for: ``gpus_per_task`` for a CUDA job, else none."""
        return self.gpus_per_task if device_type(job.device) == "cuda" else 0

    @staticmethod
    def placed(job: TrainJob) -> TrainJob:
        """The job as a Ray worker runs it, on the device it asked Ray for. ``auto`` is
        resolved here, on the driver: a task that asked for no GPU sees none, so it must not
        pick one itself. Ray hides all but the task's GPUs, so a CUDA job uses the worker's
        first visible device, whatever index the driver chose."""
        kind = device_type(job.device)
        return replace(job, device="cuda" if kind == "cuda" else kind)


EXECUTORS = {"sequential": SequentialExecutor, "ray": RayExecutor}


def make_executor(name: str, **options):
    """An executor by name (``sequential`` or ``ray``) with its options."""
    if name not in EXECUTORS:
        raise ExecutorError(f"executor {name!r} is unknown; choose one of {sorted(EXECUTORS)}")
    return EXECUTORS[name](**options)
